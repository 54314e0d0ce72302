"""The prompt an LVLM's LLM sees after a pre-LLM reduction: the caller's prompt without the placeholders of the
dropped feature rows, every per-token input (ids, mask, labels, positions, token types) shrunk alike and
re-padded to one length, on the side the caller padded.

Host reads: exactly one per call, `read_layout`: the new length, the padding side, the placeholder count
(checked against the features) and the per-sample lengths for the stats come back in one `.tolist()`. The rest
stays on the device (no `nonzero`, no boolean indexing).

Which tokens stay (`kept_tokens`): the attended text tokens, and the placeholders of every kept feature row, attended
or not (each kept feature needs its placeholder, as in the unpatched model, which scatters features into
placeholders whatever the mask). The caller's padding is dropped and replaced by new pad slots: input_ids get the
pad token, labels -100 (ignored by the loss), every other per-token input 0 (attention_mask 0: not attended).
"""
from itertools import accumulate

import torch

IGNORE_INDEX = -100        # the label the loss of transformers skips


def original_positions(ids, mask, past_length, numbering):
    """Position ids [B, L] the unpatched model would give the caller's prompt when none are passed.

    numbering "forward": a model forward numbers tokens `arange(L) + past_length` whatever the padding;
    "generate": `generate` numbers attended tokens from the mask (`mask.cumsum(-1) - 1`, pads 0), `arange(L)` without
    a mask (`GenerationMixin._prepare_position_ids_for_generation`).
    """
    B, L = ids.shape
    if numbering == "generate" and mask is not None:
        return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    return (torch.arange(L, device=ids.device) + past_length).expand(B, L)


def kept_tokens(ids, mask, image_token_id, counts, kept_rows):
    """Which tokens of the caller's prompt the rebuilt prompt holds.

    ids, mask [B, L] (mask None: all attended); counts: feature rows per image (host ints), in prompt order;
    kept_rows: per image, the kept feature rows [k_i] (long). Returns (keep [B, L] bool, placeholders: 0-dim count
    of image placeholders in ids, for the check against sum(counts)).
    """
    offsets = accumulate([0] + counts[:-1])
    kept_row = torch.zeros(sum(counts), dtype=torch.bool, device=ids.device)
    kept_row[torch.cat([rows + offset for rows, offset in zip(kept_rows, offsets)])] = True
    is_image = ids == image_token_id
    text = ~is_image if mask is None else ~is_image & mask.bool()
    return text | (_by_placeholder(is_image, kept_row) & is_image), is_image.sum()


def instruction_vectors(ids, mask, image_token_id, table, starts):
    """Per image, the mean LLM input embedding of its sample's prompt tokens other than image placeholders (the
    attended ones): [n_img, D] float32, zero for a prompt of placeholders only (CDPruner's instruction, as
    OpenVINO GenAI ports it to models without a text tower).

    ids, mask [B, L] (mask None: all attended); table: the input embeddings' weight [V, D] (read directly: a call
    of the module would run its hooks, and a scaled embedding such as Gemma 3's scales every vector alike, which
    no cosine sees); starts: [n_img] int64 on ids' device, the 1-based ordinal of each image's first placeholder
    among all of them, row-major (a cached tensor: host ints would cost a copy per call). An image's sample is found
    on the device (the row of that placeholder): no host read.
    """
    is_image = ids == image_token_id
    text = ~is_image if mask is None else ~is_image & mask.bool()
    text = text.float()
    totals = (text[:, None] @ table[ids].float()).squeeze(1)                       # [B, D]
    mean = totals / text.sum(dim=1, keepdim=True).clamp_min(1)
    first = torch.searchsorted(is_image.flatten().cumsum(0), starts)              # flat column of each first one
    return mean[first // ids.shape[1]]


def at_placeholders(ids, image_token_id, values):
    """values [P] (one per image placeholder of ids [B, L], in prompt order, row-major) laid out over the prompt:
    [B, L] float, 0 off the placeholders. A gather: no host read."""
    is_image = ids == image_token_id
    return torch.where(is_image, _by_placeholder(is_image, values), 0).float()


def _by_placeholder(is_image, values):
    """values [P] per image placeholder at the prompt's columns [B, L]: the j-th placeholder (row-major) takes
    values[j]; the other columns whatever they gather (callers mask them)."""
    ordinal = (is_image.flatten().cumsum(0) - 1).clamp(0, max(values.numel() - 1, 0))
    return values[ordinal].view_as(is_image)


def read_layout(keep, mask, placeholders, extra=None):
    """The one host read of a rebuild: (placeholders, new length, right-padded, lengths before, lengths after, the
    values of `extra`).

    keep [B, L] bool from `kept_tokens`, mask [B, L] or None. Lengths are attended tokens per sample (host lists);
    right-padded: some sample that starts attended ends with padding (a sample with no attended token pads either way).
    extra: a [E] long tensor read along (VFlowOpt's recycled row counts per image), or None (an empty list back).
    """
    B, L = keep.shape
    valid = torch.ones_like(keep) if mask is None else mask.bool()
    right = (~valid[:, -1] & valid[:, 0]).any()
    extra = keep.new_zeros(0, dtype=torch.long) if extra is None else extra.long()
    values = torch.cat([torch.stack([placeholders, keep.sum(1).amax(), right]).long(), valid.sum(1),
                        (keep & valid).sum(1), extra]).tolist()
    return values[0], values[1], bool(values[2]), values[3:3 + B], values[3 + B:3 + 2 * B], values[3 + 2 * B:]


def shrink(kwargs, keep, new_length, right, pad_token_id):
    """kwargs with every per-token input ([..., B, L] tensors: input_ids, attention_mask, labels, position_ids
    [B, L] or [3, B, L], token type ids, ...) reduced to the tokens where keep [B, L] is True, in order, re-padded
    to new_length on the left (or the right when `right`). The mask is always returned ([B, new_length]): it marks
    the new pad slots."""
    ids = kwargs["input_ids"]
    B, L = ids.shape
    if kwargs.get("attention_mask") is None:
        kwargs["attention_mask"] = torch.ones_like(ids)
    source, filled = compaction(keep, new_length, right)
    for name, value in list(kwargs.items()):
        if torch.is_tensor(value) and value.dim() >= 2 and value.shape[-2:] == (B, L):
            lead = value.shape[:-2]
            gathered = value.gather(-1, source.expand(*lead, B, new_length))
            kwargs[name] = gathered.masked_fill(~filled.expand(*lead, B, new_length), pad_value(name, pad_token_id))
    return kwargs


def compaction(keep, new_length, right=False):
    """The kept columns of each row, in order, packed into new_length slots.

    keep [B, L] bool, at most new_length True per row. Returns (source [B, new_length] long: the column each slot
    takes, 0 for a new pad slot; filled [B, new_length] bool: the slot holds a kept column). The pad slots of a
    row with fewer kept columns come first (last when `right`).
    """
    B, L = keep.shape
    column = keep.long().cumsum(1) - 1                     # slot of each kept token among its sample's kept tokens
    if not right:
        column = column + new_length - keep.sum(1, keepdim=True)
    # dropped tokens all land in one spare column past the end, cut off below
    column = column.masked_fill(~keep, new_length)
    source = column.new_zeros(B, new_length + 1).scatter_(1, column, torch.arange(L, device=keep.device).expand(B, L))
    filled = keep.new_zeros(B, new_length + 1).scatter_(1, column, keep)
    return source[:, :new_length], filled[:, :new_length]


def pad_value(name, pad_token_id):
    """What a new pad slot of the per-token input `name` holds."""
    return {"input_ids": pad_token_id, "labels": IGNORE_INDEX}.get(name, 0)
