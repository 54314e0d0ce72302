"""Visual-token reduction before the LLM of an LVLM.

The instance's `forward` and `generate` are wrapped: when pixel values come in, the wrapper runs the model's own
vision encoder, scores and reduces each image's feature block, removes the dropped image placeholders from the
prompt (ids, mask, positions and other per-token inputs, re-padded), and calls the original method with the
reduced features as `mm_encoder_outputs`. The LLM itself is untouched: it keeps its attention kernel, and its
KV cache holds only the kept tokens. `generate` returns the caller's original prompt followed by the new tokens,
so `out[:, inputs["input_ids"].shape[1]:]` still slices the answer.
"""
import functools
import inspect

import torch

from ..flops import kv_cache_bytes, llm_prefill_flops
from .rows import reduce_rows

POSITION_MODES = ("compact", "original")
SCORERS = {"cls": "cls", "visionzip": "cls", "received": "received"}   # method -> what the capture scores


class PreLLMReduction:
    def __init__(self, patch, adapter, method, keep, options):
        if keep is None:
            raise ValueError(f"method {method!r} needs keep (an int count per image or a ratio in (0, 1])")
        if options.get("layer") is not None:
            raise ValueError(f"layer={options['layer']!r}: on {adapter.family} the visual tokens are reduced at the "
                             f"tower's feature layer (tower layer {adapter.score_layer}); leave layer unset")
        positions = options.get("positions") or "compact"
        if positions not in POSITION_MODES:
            raise ValueError(f"positions={positions!r}; accepted: {', '.join(POSITION_MODES)}")
        self.patch, self.adapter, self.method, self.keep, self.options = patch, adapter, method, keep, options
        self.positions = "original" if adapter.mrope else positions
        self.score_layers = self._score_layers(options.get("score_layers"))

    @property
    def _merges(self):
        return self.options.get("reduce") == "merge" or self.method == "visionzip"

    def _score_layers(self, spec):
        last = self.adapter.score_layer
        if SCORERS.get(self.method) is None:
            return []
        if spec is None:
            return [last]
        start = spec if isinstance(spec, int) else spec[0]
        end = last if isinstance(spec, int) else spec[1] % (len(self.adapter.tower.layers))
        start %= len(self.adapter.tower.layers)
        if not start <= end <= last:
            raise ValueError(f"score_layers={spec!r}: need start <= end <= the feature layer's tower layer {last}")
        return list(range(start, end + 1))

    def install(self):
        a, p, model = self.adapter, self.patch, self.adapter.model
        self.capture = a.capture(p, SCORERS.get(self.method), self.score_layers, self._merges)
        forward, generate = model.forward, model.generate
        self.forward_signature = inspect.signature(forward)

        @functools.wraps(forward)
        def patched_forward(*args, **kwargs):
            kwargs = self._as_kwargs(args, kwargs)
            if kwargs.get("pixel_values") is None:
                return forward(**kwargs)
            return forward(**self.reduce_inputs(kwargs))

        @functools.wraps(generate)
        def patched_generate(*args, **kwargs):
            if args:                                   # generate(input_ids, ...)
                kwargs["input_ids"], args = args[0], args[1:]
            prompt = kwargs.get("input_ids")
            if kwargs.get("pixel_values") is not None:
                reduced = self.reduce_inputs(kwargs)
            else:
                reduced = self._continue_conversation(kwargs)
            out = generate(*args, **reduced)
            if reduced is kwargs:
                return out
            # hand back the caller's prompt followed by the new tokens
            sequences = out if torch.is_tensor(out) else out.sequences
            sequences = torch.cat([prompt, sequences[:, reduced["input_ids"].shape[1]:]], dim=1)
            if torch.is_tensor(out):
                return sequences
            out.sequences = sequences
            return out

        p.override(model, "forward", patched_forward)
        p.override(model, "generate", patched_generate)

    def _continue_conversation(self, kwargs):
        """A follow-up turn on the KV cache of a reduced prompt: the caller's ids start with the full prompt of
        the last reduced call, the cache holds its reduced form, so swap that prefix for the reduced one.
        Returns kwargs unchanged when the call is not such a continuation."""
        last, ids = getattr(self, "last_prompt", None), kwargs.get("input_ids")
        if last is None or kwargs.get("past_key_values") is None or ids is None:
            return kwargs
        full, reduced, reduced_mask, reduced_positions = last
        L = full.shape[1]
        if ids.shape[0] != full.shape[0] or ids.shape[1] < L or not torch.equal(ids[:, :L], full):
            return kwargs
        kwargs = dict(kwargs, input_ids=torch.cat([reduced, ids[:, L:]], dim=1))
        mask = kwargs.get("attention_mask")
        if mask is not None or reduced_mask is not None:
            head = torch.ones_like(reduced) if reduced_mask is None else reduced_mask
            tail = torch.ones_like(ids[:, L:]) if mask is None else mask[:, L:]
            kwargs["attention_mask"] = torch.cat([head.to(tail.dtype), tail], dim=1)
        for name, head in getattr(self, "last_extras", {}).items():     # e.g. token_type_ids: same prefix swap
            value = kwargs.get(name)
            if torch.is_tensor(value) and value.shape[-2:] == ids.shape:
                kwargs[name] = torch.cat([head.to(value.dtype), value[..., L:]], dim=-1)
        if reduced_positions is not None and kwargs.get("position_ids") is None:
            # the cache holds original positions: continue the caller's numbering after the prompt
            valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
            tail = (valid.long().cumsum(-1) - 1).masked_fill(~valid, 0)[..., L:]
            if reduced_positions.dim() == 3:   # M-RoPE (3, B, L): text continues past the prompt's largest position
                tail = tail + (reduced_positions.amax(dim=(0, 2)) + 1 - valid[:, :L].sum(-1))[:, None]
            kwargs["position_ids"] = torch.cat([reduced_positions, tail.expand(*reduced_positions.shape[:-1], -1)], -1)
        return kwargs

    def _as_kwargs(self, args, kwargs):
        names = [n for n, prm in self.forward_signature.parameters.items() if prm.kind == prm.POSITIONAL_OR_KEYWORD]
        return {**dict(zip(names, args)), **kwargs}

    # -- the reduction ------------------------------------------------------------------------------------------
    def reduce_inputs(self, kwargs):
        """kwargs of a forward/generate call with pixel values -> kwargs with reduced features and prompt."""
        a = self.adapter
        ids = kwargs.get("input_ids")
        if ids is None:
            raise ValueError("vlmeff finds image placeholders in input_ids; pass input_ids, not inputs_embeds")
        kwargs = dict(kwargs)
        image_kwargs = {k: kwargs.pop(k) for k in a.image_kwargs if k in kwargs}
        if a.reduces_before_projector:
            kept_features, counts, kept_rows = a.encode_reduced(image_kwargs, self._reduce_images)
        else:
            features = a.encode(image_kwargs)
            kept_features, kept_rows = self._reduce_images(features)
            counts = [f.shape[0] for f in features]
        keep = self._keep_mask(ids, counts, kept_rows)
        lengths_before = _lengths(ids, kwargs.get("attention_mask"))
        kwargs = self._shrink(kwargs, keep)
        kwargs["mm_encoder_outputs"] = a.encoder_outputs(kept_features)
        self.last_prompt = (ids, kwargs["input_ids"], kwargs.get("attention_mask"), kwargs.get("position_ids"))
        self.last_extras = {n: v for n, v in kwargs.items() if n not in ("input_ids", "attention_mask", "position_ids")
                            and torch.is_tensor(v) and v.dim() >= 2 and v.shape[-2:] == kwargs["input_ids"].shape}
        lengths = _lengths(kwargs["input_ids"], kwargs.get("attention_mask"))
        self._record(counts, kept_features, kept_rows, lengths_before, lengths)
        return kwargs

    def _reduce_images(self, features):
        """Per image: reduced features [k_i, D] and the feature rows [k_i] whose placeholders stay. Images with
        the same row count and protected rows are reduced together in one batch."""
        protected = self.adapter.protected_rows(features)
        groups = {}
        for i, (f, prot) in enumerate(zip(features, protected)):
            grids = self.adapter.image_grids(i, prot) if self.method == "pool" else None
            groups.setdefault((f.shape[0], prot.cpu().numpy().tobytes(), grids), []).append(i)
        scores = self.capture.scores()
        metric = self.capture.metric() if self._merges else None
        kept, rows = [None] * len(features), [None] * len(features)
        for (_, _, grids), members in groups.items():
            x = torch.stack([features[i] for i in members])
            out, _, kept_rows = reduce_rows(self.method, self.options, x, self.keep, protected[members[0]],
                                            _stack(scores, members), _stack(metric, members), grids)
            for j, i in enumerate(members):
                kept[i], rows[i] = out[j], kept_rows[j]
        self.last_scores = [None if scores is None else scores[i] for i in range(len(features))]
        return kept, rows

    def _keep_mask(self, ids, counts, kept_slots):
        """[B, L] bool: text tokens and the placeholders of kept feature rows."""
        is_image = ids == self.adapter.image_token_id
        positions = is_image.flatten().nonzero().squeeze(1)
        if positions.numel() != sum(counts):
            raise ValueError(f"the prompt has {positions.numel()} image placeholders but the images give "
                             f"{sum(counts)} features; build inputs with the model's processor")
        keep = ~is_image.flatten()
        for run, rows in zip(positions.split(counts), kept_slots):
            keep[run[rows]] = True
        return keep.view_as(ids)

    def _shrink(self, kwargs, keep):
        """Drop the tokens where keep is False from every per-token input, re-padding rows to one length."""
        ids = kwargs["input_ids"]
        B, L = ids.shape
        mask = kwargs.get("attention_mask")
        valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        if self.positions == "original" and kwargs.get("position_ids") is None and not self.adapter.mrope:
            kwargs["position_ids"] = (valid.long().cumsum(-1) - 1).masked_fill(~valid, 0)
        if self.adapter.mrope and kwargs.get("position_ids") is None:
            kwargs["position_ids"] = self.adapter.positions(kwargs)
        keep = keep & valid
        if bool(keep.eq(valid).all()):
            return kwargs                              # nothing removed: the prompt stays as it is
        lengths = keep.sum(dim=1)
        new_len = int(lengths.max())
        left = mask is None or not bool((mask[:, -1] == 0).any())
        order = keep.long().argsort(dim=1, descending=True, stable=True)          # kept tokens first, in order
        rank = torch.arange(new_len, device=ids.device).expand(B, -1)
        if left:
            rank = rank - (new_len - lengths)[:, None]
        filled = (rank >= 0) & (rank < lengths[:, None])
        src = order.gather(1, rank.clamp(0, L - 1))
        for name, value in list(kwargs.items()):
            if torch.is_tensor(value) and value.dim() >= 2 and value.shape[-2:] == (B, L) and name != "attention_mask":
                gathered = value.gather(-1, src.expand(*value.shape[:-2], B, new_len))
                pad = self.adapter.pad_token_id if name == "input_ids" else 0
                kwargs[name] = gathered.masked_fill(~filled.expand_as(gathered), pad)
        needs_mask = mask is not None or bool((lengths != new_len).any())
        kwargs["attention_mask"] = filled.to(mask.dtype if mask is not None else torch.long) if needs_mask else None
        return kwargs

    def _record(self, counts, kept, rows, lengths_before, lengths):
        cfg, nbytes = self.adapter.text_config, kept[0].element_size()
        stats = {
            "visual_tokens": {"input": counts, "before LLM": [k.shape[0] for k in kept]},
            "prefill_flops": sum(llm_prefill_flops(cfg, n) for n in lengths),
            "prefill_flops_unpatched": sum(llm_prefill_flops(cfg, n) for n in lengths_before),
            "kv_cache_bytes": sum(kv_cache_bytes(cfg, n, nbytes) for n in lengths),
            "kv_cache_bytes_unpatched": sum(kv_cache_bytes(cfg, n, nbytes) for n in lengths_before),
            "kept": rows,                   # per image: the feature rows kept (for plots of kept patches)
            "scores": self.last_scores,     # per image: the feature rows' scores, None for score-free methods
        }
        stats["flops"], stats["flops_unpatched"] = stats["prefill_flops"], stats["prefill_flops_unpatched"]
        self.patch.stats = stats
        self.capture.clear()


def _lengths(ids, mask):
    """Tokens per sample of a (padded) prompt."""
    return [ids.shape[1]] * ids.shape[0] if mask is None else mask.sum(dim=1).tolist()


def _stack(per_image, members):
    """Stack the entries of `members` from a per-image tensor or list, None stays None."""
    return None if per_image is None else torch.stack([per_image[i] for i in members])
