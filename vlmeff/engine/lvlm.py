"""Visual-token reduction before the LLM of an LVLM: the wrapping of one instance's `forward` and `generate`.

When pixel values come in, the wrapper runs the model's own vision encoder, scores and reduces each image's
feature block (`_reduce_images`), rebuilds the prompt without the dropped placeholders (`prompt.py`: ids, mask,
labels, positions and every other per-token input, re-padded) and calls the original method with the reduced
features as `mm_encoder_outputs`. The LLM itself is untouched: it keeps its attention kernel, and its KV cache
holds only the kept tokens. At full budget nothing is rebuilt: the original method gets the caller's prompt.

`generate` hands back the caller's prompt (repeated like generate repeats it for beams / `num_return_sequences`)
followed by the new tokens, so `out[:, inputs["input_ids"].shape[1]:]` still slices the answer. A follow-up
turn that passes the returned cache (`cache=`, or the deprecated `past_key_values=`) continues on the reduced
prompt (`_continue_conversation`).

`patch.stats` describes the caller's last call of `forward` or `generate` (the forwards generate makes itself are
not calls of the caller). A call without images records no visual tokens (`visual_tokens` lists empty, `kept` and
`scores` empty) and equal patched / unpatched FLOPs and KV-cache bytes.

Host reads: a call with images reads the host once for its prompt (`prompt.read_layout`), plus, where a family
keeps its image layout in tensors, once for that layout (LLaVA-NeXT / OneVision `image_sizes`, Qwen-VL
`image_grid_thw`: host data, read as the model's own code reads it); a follow-up turn once to recognise the
previous prompt (`torch.equal`); a call without images once for its stats (the per-sample lengths, none without a
mask); the forwards inside generate none. VFlowOpt's recycling keeps a data-dependent number of rows per image:
those counts come back with the prompt's one read (blocks padded to a host-known bound until then).

VFlowOpt (`infoflow`) acts here and inside the LLM: this stage scores with the tower's context map (plus patch
entropy), keeps its budget (recycling on base-and-crops blocks) and leaves the kept rows' scores, laid over the
reduced prompt, in `Patch.visual_scores` for the in-LLM stage of the same call.
"""
import functools
import inspect
from itertools import accumulate

import torch

from ..flops import kv_cache_bytes, llm_prefill_flops
from ..pruners import resolve_keep
from ..layout import layout_constant, to_device
from ..pruners.diversity import instruction_relevance
from ..pruners.infoflow import grid_cells, importance, patch_entropy, recycle
from ..pruners.reduce import merge_groups
from ..registry import score_layer_range
from . import prompt
from .prompt import compaction
from .rows import reduce_rows, row_layout

# method -> what the capture scores
SCORERS = {"cls": "cls", "visionzip": "cls", "vispruner": "cls", "received": "received", "infoflow": "context"}
# methods that select by the similarity of the features the LLM receives (after the projector)
ON_LLM_FEATURES = ("divprune", "cdpruner")
CACHE_KWARGS = ("cache", "past_key_values")     # transformers v5's name for the KV cache, then the deprecated one


class PreLLMReduction:
    def __init__(self, patch, adapter, method, keep, options):
        if keep is None:
            raise ValueError(f"method {method!r} needs keep (an int count per image or a ratio in (0, 1])")
        # option types and ranges (layer None, positions, score_layers within the tower) were checked by the registry
        self.patch, self.adapter, self.method, self.keep, self.options = patch, adapter, method, keep, options
        self.positions = "original" if adapter.mrope else options.get("positions") or "compact"
        self.score_layers = self._score_layers(options.get("score_layers"))
        self.entropy_weight = options.get("entropy_weight", 0.0)
        if self.entropy_weight and not adapter.pixel_patch_rows:
            raise ValueError(f"method {method!r}: entropy_weight={self.entropy_weight!r} reads patch entropy from "
                             f"pixel values laid out one tower patch per feature row (LLaVA); {adapter.family} lays "
                             "them out otherwise: use entropy_weight=0 (every released VFlowOpt setting)")
        self.entropy = None            # VFlowOpt: this call's patch entropy [n_img, patches], when weighted
        recycle = options.get("recycle")
        self.recycles = method == "infoflow" and (adapter.multi_view if recycle is None else recycle)
        if self.recycles and adapter.stacked_features:
            raise ValueError(f"method {method!r}: recycle=True keeps a different number of rows per image, which "
                             f"{adapter.family} cannot take (its images or tiles are one stacked tensor of one size); "
                             "use recycle=False or None")
        self.recycled_counts = None    # VFlowOpt with recycling: this call's kept rows per image [n_img], on device
        self.relevant = method == "cdpruner" and options["relevance"] == "input_embeddings"
        self.call_prompt = None        # CDPruner's relevance: this call's (ids, mask) while its images are reduced
        self.last_prompt = None        # (caller's ids, reduced ids, mask, positions) of the last call with images
        self.last_extras = {}          # its other reduced per-token inputs, e.g. token_type_ids
        self._generating = False       # inside our generate: its own forwards are not the caller's calls

    @property
    def _merges(self):
        return self.options.get("reduce") == "merge" or self.method == "visionzip"

    def _score_layers(self, spec):
        if SCORERS.get(self.method) is None:
            return []
        return score_layer_range(spec, self.adapter.score_layer, len(self.adapter.tower.layers))

    # -- the wrappers ---------------------------------------------------------------------------------------------
    def install(self):
        model = self.adapter.model
        self.capture = self.adapter.capture(self.patch, SCORERS.get(self.method), self.score_layers, self._merges)
        forward, generate = model.forward, model.generate
        names = [n for n, p in inspect.signature(forward).parameters.items() if p.kind == p.POSITIONAL_OR_KEYWORD]

        @functools.wraps(forward)
        def patched_forward(*args, **kwargs):
            kwargs = {**dict(zip(names, args)), **kwargs}
            if self._generating:               # a step of our generate: its prompt is reduced already
                return forward(**kwargs)
            with self.patch.calling():         # a call that fails leaves no stats of an earlier one
                if kwargs.get("pixel_values") is None:
                    self._record_text_only(kwargs)
                    return forward(**kwargs)
                return forward(**self.reduce_inputs(kwargs, numbering="forward"))

        @functools.wraps(generate)
        def patched_generate(*args, **kwargs):
            if args:                                   # generate(input_ids, ...)
                kwargs["input_ids"], args = args[0], args[1:]
            caller_ids = kwargs.get("input_ids")
            with self.patch.calling():
                if kwargs.get("pixel_values") is not None:
                    reduced = self.reduce_inputs(kwargs, numbering="generate")
                else:
                    reduced = self._continue_conversation(kwargs)
                    self._record_text_only(reduced)
                self._generating = True
                try:
                    out = generate(*args, **reduced)
                finally:
                    self._generating = False
            if reduced.get("input_ids") is caller_ids:
                return out
            return with_caller_prompt(out, caller_ids, reduced["input_ids"].shape[1])

        self.patch.override(model, "forward", patched_forward)
        self.patch.override(model, "generate", patched_generate)

    def _continue_conversation(self, kwargs):
        """A follow-up turn on the KV cache of a reduced prompt: the caller's ids start with the full prompt of
        the last reduced call, the cache holds its reduced form, so swap that prefix for the reduced one.
        Returns kwargs unchanged when the call is not such a continuation."""
        ids = kwargs.get("input_ids")
        if self.last_prompt is None or ids is None or all(kwargs.get(n) is None for n in CACHE_KWARGS):
            return kwargs
        full, reduced, reduced_mask, reduced_positions = self.last_prompt
        L = full.shape[1]
        if ids.shape[0] != full.shape[0] or ids.shape[1] < L or not torch.equal(ids[:, :L], full):
            return kwargs
        kwargs = dict(kwargs, input_ids=torch.cat([reduced, ids[:, L:]], dim=1))
        mask = kwargs.get("attention_mask")
        if mask is not None or reduced_mask is not None:
            head = torch.ones_like(reduced) if reduced_mask is None else reduced_mask
            tail = torch.ones_like(ids[:, L:]) if mask is None else mask[:, L:]
            kwargs["attention_mask"] = torch.cat([head.to(tail.dtype), tail], dim=1)
        for name, head in self.last_extras.items():     # e.g. token_type_ids: the same prefix swap
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

    # -- the reduction ------------------------------------------------------------------------------------------
    def reduce_inputs(self, kwargs, numbering):
        """kwargs of a forward (numbering "forward") or generate ("generate") call with pixel values -> kwargs
        with reduced features (`mm_encoder_outputs`) and the rebuilt prompt. Reads the host once."""
        a = self.adapter
        ids = kwargs.get("input_ids")
        if ids is None:
            raise ValueError("vlmeff finds image placeholders in input_ids; pass input_ids, not inputs_embeds")
        kwargs = dict(kwargs)
        image_kwargs = {k: kwargs.pop(k) for k in a.image_kwargs if k in kwargs}
        self.call_prompt = (ids, kwargs.get("attention_mask"))
        if self.entropy_weight:
            o, pixels = self.options, image_kwargs["pixel_values"]
            # the normalisation's constants reach the device once (a copy per call would wait for the stream)
            mean, std = (layout_constant(("pixel normalisation", tuple(v)), pixels,
                                         lambda v=v: torch.tensor(v, dtype=torch.float32, device=pixels.device))
                         for v in (o["image_mean"], o["image_std"]))
            self.entropy = patch_entropy(pixels, a.tower.patch_size, o["entropy"], mean, std)
        if a.reduces_before_projector:
            kept_features, counts, kept_rows = a.encode_reduced(image_kwargs, self._reduce_images)
        else:
            features = a.encode(image_kwargs)
            kept_features, kept_rows = self._reduce_images(features)
            counts = [f.shape[0] for f in features]
        mask = kwargs.get("attention_mask")
        keep, placeholders = prompt.kept_tokens(ids, mask, a.image_token_id, counts, kept_rows)
        placeholders, new_length, right, lengths_before, lengths, recycled = prompt.read_layout(
            keep, mask, placeholders, self.recycled_counts)
        if self.recycled_counts is not None:       # blocks padded to their group's longest (repeated kept rows)
            kept_features = [f[:n] for f, n in zip(kept_features, recycled)]
            kept_rows = [r[:n] for r, n in zip(kept_rows, recycled)]
            self.recycled_counts = None
        if placeholders != sum(counts):
            raise ValueError(f"the prompt has {placeholders} image placeholders but the images give "
                             f"{sum(counts)} features; build inputs with the model's processor")
        if a.mrope and kwargs.get("position_ids") is None:
            kwargs["position_ids"] = a.positions(kwargs)
        if sum(k.shape[0] for k in kept_features) < sum(counts):       # some placeholder goes
            if self.positions == "original" and kwargs.get("position_ids") is None:
                kwargs["position_ids"] = prompt.original_positions(ids, mask, _past_length(kwargs), numbering)
            kwargs = prompt.shrink(kwargs, keep, new_length, right, a.pad_token_id)
        kwargs["mm_encoder_outputs"] = a.encoder_outputs(kept_features)
        self.last_prompt = (ids, kwargs["input_ids"], kwargs.get("attention_mask"), kwargs.get("position_ids"))
        self.last_extras = {n: v for n, v in kwargs.items() if n not in ("input_ids", "attention_mask", "position_ids")
                            and torch.is_tensor(v) and v.dim() >= 2 and v.shape[-2:] == kwargs["input_ids"].shape}
        self._record(counts, [k.shape[0] for k in kept_features], kept_rows, lengths_before, lengths)
        if self.method == "infoflow":        # the LLM's stages rank by the same scores (`InLLMReduction`)
            # protected rows (LLaVA-NeXT's newlines) score 1 there, as the reference hands them on: they stay
            handed = [s.masked_fill(row_layout(s.shape[0], p).mask(s.device), 1.0)
                      for s, p in zip(self.last_scores, self.last_protected)]
            kept_scores = torch.cat([s[r] for s, r in zip(handed, kept_rows)])
            self.patch.visual_scores = prompt.at_placeholders(kwargs["input_ids"], a.image_token_id, kept_scores)
        return kwargs

    def _reduce_images(self, features, project=None):
        """Per image: reduced features [k_i, D] and the feature rows [k_i] whose placeholders stay. Images of one
        layout (`adapter.layout_key`, known on the host) are reduced together in one batch. project: maps blocks
        to the LLM's input space where they are not there yet (LLaVA reduces the projector's input)."""
        a = self.adapter
        protected = self.last_protected = a.protected_rows(features)
        groups = {}
        for i in range(len(features)):
            groups.setdefault(a.layout_key(i, features), []).append(i)
        scores = self._scores(features)
        self.last_scores = [None if scores is None else scores[i] for i in range(len(features))]
        self.last_groups = None        # traced below when the patch tracks merges (VFlowOpt's recycling: not traced)
        if self.recycles:
            return self._recycle_images(features, scores, protected, groups)
        metric = self.capture.metric() if self._merges else None
        made = {}                      # CDPruner's instructions, made once per call when a block is reduced
        kept, rows = [None] * len(features), [None] * len(features)
        if self.patch.track_merges:
            self.last_groups = [None] * len(features)
        for members in groups.values():
            first = members[0]
            grids = pool_layout(a.image_grids(first, protected[first]), self.keep) if self.method == "pool" else None
            x = torch.stack([features[i] for i in members])
            group_scores, group_metric = _stack(scores, members), _stack(metric, members)
            if self.method == "vispruner":           # de-duplicates the rows it reduces (LLaVA: the tower's)
                group_metric = x
            elif self.method in ON_LLM_FEATURES and _reduces(self.keep, x.shape[1], protected[first]):
                group_metric = a.input_features(x if project is None else project(x))
                if self.relevant:
                    group_scores = self._relevance(features, members, group_metric, made)
            out, _, kept_rows = reduce_rows(self.method, self.options, x, self.keep, protected[first],
                                            group_scores, group_metric, grids)
            for j, i in enumerate(members):
                kept[i], rows[i] = out[j], kept_rows[j]
            if self.last_groups is not None:
                traced = merge_groups(lambda ident: reduce_rows(self.method, self.options, ident, self.keep,
                                                                protected[first], group_scores, group_metric,
                                                                grids)[0], *x.shape[:2], x.device)
                for j, i in enumerate(members):
                    self.last_groups[i] = traced[j]
        return kept, rows

    def _relevance(self, features, members, metric, made):
        """CDPruner's relevance [n, N] of the images `members` (blocks `metric` [n, N, C] in the LLM's input space)
        to their prompts' instructions, which are made once per call (`made`); also the images' stats scores."""
        if "instructions" not in made:
            made["instructions"] = self._instructions(features)
        relevance = instruction_relevance(metric, _stack(made["instructions"], members))
        for j, i in enumerate(members):
            self.last_scores[i] = relevance[j]
        return relevance

    def _instructions(self, features):
        """CDPruner's instruction per image [n_img, D] (`prompt.instruction_vectors`) for this call's prompt."""
        ids, mask = self.call_prompt
        firsts = tuple(accumulate([1] + [f.shape[0] for f in features[:-1]]))
        starts = layout_constant(("first placeholders", firsts), ids,
                                 lambda: to_device(torch.tensor(firsts), ids.device))
        return prompt.instruction_vectors(ids, mask, self.adapter.image_token_id,
                                          self.adapter.model.get_input_embeddings().weight, starts)

    def _recycle_images(self, features, scores, protected, groups):
        """VFlowOpt with recycling (`vlmeff.pruners.infoflow.recycle`), each layout group in one batch: the
        candidates of removal are the reduce + floor(N / m^2) lowest-scored of an image's unprotected rows, N its
        rows (as the reference counts them: newline rows included; reduce = round(N (1 - keep)) for a ratio, the
        unprotected rows less keep for a count), grouped by m x m cells of its grids (`adapter.image_grids`: the
        base view, then the crops).
        Per image: the block [K, D] and its rows [K], K the longest of its group, the rows past its own count
        repeating its first kept row; the counts are read with the prompt layout (`self.recycled_counts`)."""
        a, m = self.adapter, self.options["grid"]
        kept, rows, counts = [None] * len(features), [None] * len(features), [None] * len(features)
        for members in groups.values():
            first = members[0]
            x = torch.stack([features[i] for i in members])
            s = _stack(scores, members)
            n, N = s.shape
            layout = row_layout(N, protected[first])
            free = layout.free_indices(x.device)
            grids = a.image_grids(first, protected[first])
            cells, cell_count = layout_constant(("infoflow cells", tuple(grids), m), x,
                                                lambda: grid_cells(grids, m, x.device))
            F_ = N - layout.count
            candidates = min(F_, _removed(self.keep, N, F_) + int(N / (m * m)))
            folded, keep_free = recycle(x[:, free], s[:, free], cells, cell_count, candidates)
            x = x.index_copy(1, free, folded)
            keep = torch.ones_like(s, dtype=torch.bool).index_copy(1, free, keep_free)
            longest = layout.count + F_ - candidates + min(cell_count, candidates)     # a host bound on the count
            source, filled = compaction(keep, longest, right=True)
            source = torch.where(filled, source, source[:, :1])
            out = x.gather(1, source[..., None].expand(-1, -1, x.shape[2]))
            for j, i in enumerate(members):
                kept[i], rows[i], counts[i] = out[j], source[j], keep[j].sum()
        self.recycled_counts = torch.stack(counts)
        return kept, rows

    def _scores(self, features):
        """Per-image scores of the feature rows from the capture; VFlowOpt's context map at its threshold, plus its
        weighted patch-entropy term (prefix rows, e.g. [CLS], get none: they are protected)."""
        if self.method != "infoflow":
            return self.capture.scores()
        context = self.capture.scores(threshold=self.options["threshold"])
        if not self.entropy_weight:
            return context
        prefix = features[0].shape[0] - self.entropy.shape[1]
        entropy = torch.nn.functional.pad(self.entropy.to(context.device), (prefix, 0), value=float("-inf"))
        return importance(context, entropy, self.entropy_weight)

    # -- stats ----------------------------------------------------------------------------------------------------
    def _record(self, counts, kept_counts, rows, lengths_before, lengths):
        cfg = self.adapter.text_config
        # the KV cache holds the LLM's dtype (its input embeddings'), whatever the tower or projector computes in
        nbytes = self.adapter.model.get_input_embeddings().weight.element_size()
        stats = {
            "visual_tokens": {"input": counts, "before LLM": kept_counts},
            "prefill_flops": sum(llm_prefill_flops(cfg, n) for n in lengths),
            "prefill_flops_unpatched": sum(llm_prefill_flops(cfg, n) for n in lengths_before),
            "kv_cache_bytes": sum(kv_cache_bytes(cfg, n, nbytes) for n in lengths),
            "kv_cache_bytes_unpatched": sum(kv_cache_bytes(cfg, n, nbytes) for n in lengths_before),
            "kept": rows,                   # per image: the feature rows kept (for plots of kept patches)
            "scores": self.last_scores,     # per image: the feature rows' scores, None for score-free methods
        }
        if self.last_groups is not None:
            stats["groups"] = self.last_groups      # per image: each feature row's output token, -1 dropped
            stats["views"] = [self._views(i) for i in range(len(self.last_groups))]
        stats["flops"], stats["flops_unpatched"] = stats["prefill_flops"], stats["prefill_flops_unpatched"]
        self.patch.stats = stats
        self.capture.clear()

    def _views(self, i):
        """Image i's views for pictures of its rows: [((h, w), the feature rows of that grid in raster order)], the
        unprotected rows split by `adapter.image_grids` (LLaVA-NeXT: the base view, then the unpadded crops)."""
        protected = self.last_protected[i]
        free = torch.nonzero(~protected)[:, 0]            # a CPU mask: no device read
        try:
            grids = self.adapter.image_grids(i, protected)
        except ValueError:                                # rows in no grid (e.g. Gemma 3 reduced otherwise)
            return []
        views, start = [], 0
        for h, w in grids:
            views.append(((h, w), free[start:start + h * w]))
            start += h * w
        return views

    def _record_text_only(self, kwargs):
        """Stats of a call without images: no visual tokens, the prompt as the caller gave it."""
        mask, tokens = kwargs.get("attention_mask"), kwargs.get("input_ids")
        if tokens is None:
            tokens = kwargs.get("inputs_embeds")
        if tokens is None:
            return
        B, L = tokens.shape[:2]
        lengths = [L] * B if mask is None or mask.dim() != 2 else mask.sum(dim=1).tolist()
        self.last_scores, self.last_groups = [], None
        self._record([], [], [], lengths, lengths)


def _reduces(keep, n, protected):
    """Whether a budget removes rows of a block of n rows (protected: its bool [n] mask or prefix count)."""
    free = n - row_layout(n, protected).count
    return resolve_keep(keep, free) < free


def _removed(keep, n, free):
    """VFlowOpt's reduce: rows to remove from a block of n rows (free of them unprotected) for a ratio keep,
    round(n (1 - keep)) as the reference; for a count, the free rows less it."""
    if isinstance(keep, float):
        return min(free, round(n * (1 - keep)))
    return free - resolve_keep(keep, free)


def pool_layout(grids, keep):
    """The grids `pool` reduces an image's free rows as: its own grids, each pooled apart, or, when the budget is
    below one token per grid, all free rows jointly as one 1 x n row pooled into contiguous runs (base view and
    crops alike), so that every budget >= 1 is met."""
    total = sum(h * w for h, w in grids)
    if len(grids) > 1 and resolve_keep(keep, total) < len(grids):
        return ((1, total),)
    return grids


def with_caller_prompt(out, caller_ids, reduced_length):
    """generate's output (ids [B * n, L' + T] or an output with `.sequences`) with the reduced prompt of every row
    swapped for the caller's (ids [B, L]), repeated as generate expands it (n rows per sample, in order)."""
    sequences = out if torch.is_tensor(out) else out.sequences
    expanded = caller_ids.repeat_interleave(sequences.shape[0] // caller_ids.shape[0], dim=0)
    sequences = torch.cat([expanded, sequences[:, reduced_length:]], dim=1)
    if torch.is_tensor(out):
        return sequences
    out.sequences = sequences
    return out


def _past_length(kwargs):
    """Tokens already in the KV cache the call passes (0 without one)."""
    cache = next((kwargs[n] for n in CACHE_KWARGS if kwargs.get(n) is not None), None)
    return 0 if cache is None else cache.get_seq_length()


def _stack(per_image, members):
    """Stack the entries of `members` from a per-image tensor or list, None stays None."""
    return None if per_image is None else torch.stack([per_image[i] for i in members])
