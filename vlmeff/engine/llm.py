"""Visual-token pruning inside the LLM (FastV, PyramidDrop, Attention Debiasing, TransPrune, VFlowOpt's LLM stages): the
decoder runs on every token up to a stage layer K, then only on the tokens kept, with the model's own attention kernel.

Hooks on this instance only:
- the VLM's base model (pre-hook): which prompt columns hold visual tokens (`input_ids` == the image / video token);
  for VFlowOpt also the tower's scores of those tokens, which its pre-LLM stage left in `Patch.visual_scores`;
- the language model (pre-hook, hook): a call starts and ends. A call on an empty or absent cache with visual tokens
  is a prefill and is pruned; a call on a cache this engine pruned (decoding, a follow-up turn) only needs the
  stage masks of that cache, grown by the new columns; any other call runs as unpatched;
- the q / k projections of each scoring layer (hooks): what the layer computes anyway, turned into the one
  attention row a scorer needs (`DecoderAdapter.query_key`, `attention_rows`): never an N x N matrix;
- TransPrune: the attention and MLP of each accumulating layer (hooks): their input and output, turned into token
  transition variation (`vlmeff.pruners.transition`) and summed per column; its instruction-guided attention takes
  the rows of the instruction tokens after the image from the stage layer's own q / k (`causal_rows_mean`);
- every decoder layer from the first stage on (pre-hook): at a stage layer, hidden states and (cos, sin) are
  gathered to the kept columns; every layer of a stage gets that stage's causal mask, built by the model's own
  `create_causal_mask` for the stage's (shorter) cache layers with `layer_idx`, so the cache of layer i holds the
  tokens layer i saw. Positions are the original ones (kept tokens keep their rotary angles), or with TransPrune's
  `positions="renumber"` (its reference) each kept token's original position less the visual tokens dropped before
  it, new tokens' positions less all dropped ones: (cos, sin) from the model's rotary embedding at those positions;
- the final norm (hook): the kept columns are spread back over the prompt, each position carrying the state of the
  last kept position at or before it (the prediction of the next kept token, exactly as in the reduced sequence), so
  logits keep the caller's shape and `generate`'s last-column logits are unchanged in meaning;
- `forward` with `labels`: labels of dropped tokens become -100 (a clone; the caller's tensor is untouched), so the
  loss is the reduced sequence's; `generate`: the scoring query stays the last token of the caller's prompt when
  generate recomputes without a cache, so `use_cache=False` gives the cached result.

Stage layout: the kept columns of every sample in order, padded on the left to the longest sample with new pad slots
(attention mask 0). Layers before the first stage keep their full-length cache, so `cache.get_seq_length()` (layer 0)
and generate's positions stay those of the caller's prompt.

Host reads: a prefill reads the host once (per-sample visual-token and prompt lengths, which fix the stage lengths);
decoding steps and follow-up turns none. Unsupported, with a clear error: assisted / prompt-lookup decoding (they
crop the cache by the first layer's length), caches other than `DynamicCache`, pre-built 4-D masks.
"""
import functools
import inspect
import numbers
import weakref
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask

from ..flops import kv_cache_bytes, llm_prefill_flops, stage_drops, staged_kv_cache_bytes, staged_prefill_flops
from ..kernels.attention_rows import attention_rows, causal_rows_mean
from ..layout import layout_constant
from ..pruners.dart import duplication_aware_keep, key_l1_norms, pivot_shares
from ..pruners.debias import PAD_THRESHOLD, pad_fill, padding_shares, recency_reweighter
from ..pruners.select import resolve_keep
from ..pruners.sparsevlm import dpc_knn_merge, recycled_counts, select_raters
from ..pruners.stages import default_accumulation, plan_stages
from ..pruners.transition import transition_scores, transition_variation
from .prompt import IGNORE_INDEX, compaction

CACHE_KWARGS = ("cache", "past_key_values")


class InLLMReduction:
    """The engine of methods that act inside the LLM: the method's stages (`vlmeff.pruners.stages.plan_stages`,
    layers increasing); for `debiased`, `reweight(scores, ordinals, stage_index)`, which adjusts the raw scores
    before ranking (`vlmeff.pruners.debias`); for `transition`, TransPrune's score (`vlmeff.pruners.transition`)."""

    def __init__(self, patch, adapter, method, keep, options):
        self.patch, self.adapter = patch, adapter
        self.decoder = adapter.decoder
        # option types and ranges, the layers included, were checked by the registry on this model
        self.stages = plan_stages(method, keep, options, self.decoder.depth, first_prunable_layer(adapter))
        self.reweight = recency_reweighter(options) if method == "debiased" else None
        # Attention Debiasing's padding suppression: only where the pixel values are one image per feature block
        # (LLaVA); the other families' processors never pad an image to a square
        self.padding = (method == "debiased" and options["padding"] == "pixels" and adapter.pixel_patch_rows)
        if self.padding:
            self.pad_threshold = options["pad_threshold"]
            self.pad_key = ("square padding", tuple(options["image_mean"]), tuple(options["image_std"]))
        self.content = None                    # [n_visual] bool of the base-model call running: not padding
        self.transition = method == "transition"
        # DART: pivots by the keys of the layer before its stage, then the tokens least similar to them
        self.dart = method == "dart"
        self.pivots = (options["image_pivots"], options["text_pivots"], options["split"]) if self.dart else None
        # SparseVLM: raters from the LLM's input, each stage ranked by their attention at the layer before it, part
        # of the pruned tokens recycled into merged ones
        self.sparse = method == "sparsevlm"
        self.recycle = self.sparse and options["recycle"]
        # VFlowOpt: the stages rank by the tower's scores, handed over by the pre-LLM stage (`Patch.visual_scores`)
        self.given = method == "infoflow"
        self.given_now = None                  # those scores for the base-model call running, [B, L]
        self.score = options.get("score", "both")
        self.renumber = options.get("positions") == "renumber"
        # TTV from the accumulating layers before the last stage (later ones would rank nothing)
        self.accumulate = [] if not self.transition or self.score == "iga" else [
            i for i in options["accumulate"] if i < self.stages[-1].layer]
        config = adapter.model.config
        # VFlowOpt's tower scores cover images only (videos are not reduced before the LLM): it leaves videos be
        tokens = ("image_token_id",) if self.given else ("image_token_id", "video_token_id")
        self.visual_ids = [i for i in (getattr(config, name, None) for name in tokens) if i is not None]
        self.first = self.stages[0].layer
        self.call = None                       # the state of the language-model call running now
        self.visual = None                     # [B, L] bool of the base-model call running, for its LM call only
        self.labels = None                     # the clone of the running forward's labels
        self.prompt_columns = None             # inside generate: the caller's prompt length
        self.pruned_caches = weakref.WeakKeyDictionary()     # cache -> _CacheState
        self.captured = {}                     # layer -> {"q", "k", "rope"} of the scoring layers, this call

    # -- installation -------------------------------------------------------------------------------------------
    def install(self):
        patch, dec = self.patch, self.decoder
        patch.hook(self.adapter.model.model.register_forward_pre_hook(self._base_model_call, with_kwargs=True))
        patch.hook(dec.model.register_forward_pre_hook(self._language_model_call, with_kwargs=True))
        patch.hook(dec.model.register_forward_hook(self._language_model_done))
        patch.hook(dec.norm.register_forward_hook(self._spread_back))
        previous_scorers = {s.score_layer for s in self.stages if s.score_layer < s.layer}
        for i in previous_scorers:
            attn = dec.attention(i)
            if not self.dart:                           # DART reads the keys only
                patch.hook(attn.q_proj.register_forward_hook(self._keeper(i, "q")))
            patch.hook(attn.k_proj.register_forward_hook(self._keeper(i, "k")))
        for i in self.accumulate:
            layer = dec.layers[i]
            patch.hook(layer.self_attn.register_forward_hook(self._sublayer_done, with_kwargs=True))
            patch.hook(layer.mlp.register_forward_hook(self._sublayer_done, with_kwargs=True))
        for i in sorted(previous_scorers | set(range(self.first, dec.depth))):
            patch.hook(dec.layers[i].register_forward_pre_hook(functools.partial(self._layer_call, i),
                                                               with_kwargs=True))
        self._wrap_entry_points()

    def _wrap_entry_points(self):
        model, patch = self.adapter.model, self.patch
        forward, generate = model.forward, model.generate
        names = [n for n, p in inspect.signature(forward).parameters.items() if p.kind == p.POSITIONAL_OR_KEYWORD]

        @functools.wraps(forward)
        def patched_forward(*args, **kwargs):
            kwargs = {**dict(zip(names, args)), **kwargs}
            labels = kwargs.get("labels")
            with patch.calling():
                if labels is None or self.labels is not None:
                    return forward(**kwargs)
                self.labels = kwargs["labels"] = labels.clone()
                try:
                    return forward(**kwargs)
                finally:
                    self.labels = None

        @functools.wraps(generate)
        def patched_generate(*args, **kwargs):
            for name in ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit"):
                if kwargs.get(name) is not None:
                    raise ValueError(f"generate({name}=...) is not supported with pruning inside the LLM: assisted "
                                     "decoding crops the cache by the first layer's length, which pruned layers do not "
                                     "share. Use greedy, sampling or beam search")
            ids = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs"))   # generate(inputs=...) too
            outer = self.prompt_columns is None
            if outer and ids is not None:
                self.prompt_columns = ids.shape[1]
            try:
                with patch.calling():
                    return generate(*args, **kwargs)
            finally:
                if outer:
                    self.prompt_columns = None

        patch.override(model, "forward", patched_forward)
        patch.override(model, "generate", patched_generate)

    # -- hooks ----------------------------------------------------------------------------------------------------
    def _base_model_call(self, module, args, kwargs):
        ids = args[0] if args else kwargs.get("input_ids")
        self.visual = None
        if ids is None:
            if kwargs.get("pixel_values") is not None:
                raise ValueError("vlmeff finds visual tokens in input_ids; pass input_ids, not inputs_embeds")
            return
        visual = ids == self.visual_ids[0]
        for other in self.visual_ids[1:]:
            visual = visual | (ids == other)
        self.visual = visual
        pixels = kwargs.get("pixel_values")
        self.content = None if not self.padding or pixels is None else self._content_tokens(pixels)
        if self.given:
            self.given_now = _given_scores(self.patch.visual_scores, ids.shape)

    def _language_model_call(self, module, args, kwargs):
        self.call, self.captured = None, {}
        visual, self.visual = self.visual, None        # consumed: a later direct call of the LM is not this prompt's
        content, self.content = self.content, None
        given, self.given_now = self.given_now, None
        cache = next((kwargs[n] for n in CACHE_KWARGS if kwargs.get(n) is not None), None)
        if cache is not None and not isinstance(cache, DynamicCache):
            raise ValueError(f"pruning inside the LLM needs a DynamicCache (per-layer lengths); got "
                             f"{type(cache).__name__}. Drop cache_implementation= or pass a DynamicCache")
        mask = kwargs.get("attention_mask")
        if mask is not None and (not torch.is_tensor(mask) or mask.dim() != 2):
            raise ValueError("pruning inside the LLM needs the 2-D attention mask (batch, length); got a pre-built "
                             f"{getattr(mask, 'dim', lambda: type(mask).__name__)()}-D mask")
        state = self.pruned_caches.get(cache) if cache is not None else None
        if state is not None:
            # layer 0 keeps the caller's full history: the stage masks grow by the columns it has after this call
            past = cache.get_seq_length()
            total = past + _embeds(args, kwargs).shape[1]
            self.call = _Call(cache=cache, state=state, mask=mask, length=total)
            if self.renumber:
                self.call.positions = _positions(args, kwargs, past)
            return
        past = 0 if cache is None else cache.get_seq_length()
        if past or visual is None or visual.shape != _embeds(args, kwargs).shape[:2]:
            return
        self.call = self._plan(visual, mask, cache, kwargs.get("inputs_embeds"), content)
        if self.call is not None and self.given:
            if given is None:
                raise ValueError("infoflow ranks the LLM's visual tokens by the vision tower's scores, which come with "
                                 "a call of the model itself (forward or generate with pixel values); this call of "
                                 "the language model has visual tokens but no such scores")
            self.call.given = given
        if self.call is not None and self.renumber:
            self.call.positions = _positions(args, kwargs, 0).expand(visual.shape)

    def _language_model_done(self, module, args, out):
        call, self.call = self.call, None
        self.captured = {}
        if call is None or call.state is not None:
            return
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        if cache is not None and call.masks2d:
            self.pruned_caches[cache] = _CacheState(length=call.length, masks2d=call.masks2d,
                                                    shifts=call.stage_shifts)

    def _keeper(self, layer, name):
        def hook(module, args, out):
            call = self.call
            if call is not None and call.state is None and call.stage < len(self.stages):
                self.captured[layer][name] = out        # the layer's pre-hook opened its entry
        return hook

    def _sublayer_done(self, module, args, kwargs, out):
        """TransPrune: add the token transition variation of an accumulating layer's attention or MLP (input: the
        normed hidden states; output before the residual add) to the call's running sum, in the current layout."""
        call = self.call
        if call is None or call.state is not None or call.stage >= len(self.stages):
            return
        x = args[0] if args else kwargs["hidden_states"]
        y = out[0] if isinstance(out, tuple) else out
        variation = transition_variation(x, y, call.valid_now)
        call.ttv = variation if call.ttv is None else call.ttv + variation

    def _layer_call(self, i, module, args, kwargs):
        call = self.call
        if call is None:
            return None
        if call.state is not None:                     # decoding / a follow-up turn on a pruned cache
            return self._continue(i, call, args, kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        args = args[1:] if args else ()
        stage = call.stage
        if stage < len(self.stages) and self.stages[stage].layer == i:
            hidden = self._prune(call, hidden, kwargs)
        if call.masks2d:                              # some stage changed the layout
            kwargs.update(attention_mask=call.mask4d, position_embeddings=call.rope, position_ids=None)
        if call.stage < len(self.stages) and i == self.stages[call.stage].score_layer < self.stages[call.stage].layer:
            self.captured[i] = {"rope": kwargs["position_embeddings"]}
        return (hidden, *args), kwargs

    def _spread_back(self, module, args, out):
        call = self.call
        if call is None or call.state is not None or not call.masks2d:
            return None
        return out.gather(1, call.back[..., None].expand(-1, -1, out.shape[-1]))

    # -- prefill ------------------------------------------------------------------------------------------------
    def _content_tokens(self, pixels):
        """[n_img * N] bool, image by image in the order of their placeholders: the visual tokens whose patch is at
        most `pad_threshold` square padding (`padding_shares`); a [CLS] row the features keep is content."""
        fill, tolerance = layout_constant(self.pad_key, pixels, lambda: tuple(
            t.to(pixels.device) for t in pad_fill(*self.pad_key[1:])))
        content = padding_shares(pixels, self.adapter.tower.patch_size, fill, tolerance) <= self.pad_threshold
        if self.adapter.feature_prefix:
            content = torch.nn.functional.pad(content, (self.adapter.feature_prefix, 0), value=True)
        return content.reshape(-1)

    def _plan(self, visual, mask, cache, embeds, content=None):
        """The call state of a prefill: the one host read (visual tokens and prompt length per sample) fixes the
        kept counts and stage lengths. embeds: the LLM's input [B, L, D] (the base model embeds the prompt first);
        content: `_content_tokens` of the call's images, None without padding suppression."""
        B, L = visual.shape
        valid = torch.ones_like(visual) if mask is None else mask.bool()
        # where the scoring query sits: the last attended column of the caller's prompt
        columns = torch.arange(L, device=visual.device)
        in_prompt = valid if self.prompt_columns is None else valid & (columns < self.prompt_columns)
        if self.prompt_columns is not None:
            # generate without a cache re-reads its own tokens: one that happens to be a placeholder id is no visual
            # token (the cached run never prunes generated tokens)
            visual = visual & (columns < self.prompt_columns)
        query = torch.where(in_prompt, columns, -1).amax(1).clamp(min=0)     # an all-padding row: column 0
        counted = [visual.sum(1), valid.sum(1)]
        if content is not None:        # each visual column's token, in placeholder order (no host read: a gather;
            # the model itself checks that the placeholders match the images' tokens)
            order = (visual.reshape(-1).long().cumsum(0) - 1).clamp(0, max(content.numel() - 1, 0))
            content = visual & content[order].reshape(B, L) if content.numel() else visual & False
            counted.append(content.sum(1))
        if self.dart:                  # DART's text pivots: the prompt tokens after the last visual one
            last_visual = torch.where(visual, columns, -1).amax(1, keepdim=True)
            text = valid & ~visual & (columns > last_visual) & (columns <= query[:, None])
            counted.append(text.sum(1))
        if (self.transition and self.score != "ttv") or self.sparse:
            start, rows = _instruction_span(visual, query)
            counted.append(rows.amax()[None])              # the instruction rows' count is a shape: read with these
        values = torch.cat(counted).tolist()
        n_visual, n_valid = values[:B], values[B:2 * B]
        if not any(n_visual):
            self._record_unpruned(n_valid)
            return None
        n_content = None
        if content is not None:
            n_content, values = values[2 * B:3 * B], values[:2 * B] + values[3 * B:]
        kept = []                                  # per stage, visual tokens kept per sample (host ints)
        top = []                                   # SparseVLM: of those, the top-ranked; the others are recycled
        recycled = []                              # SparseVLM: per stage and sample, (candidates, clusters)
        for stage in self.stages:
            previous = kept[-1] if kept else n_visual
            kept.append([min(p, _resolve(stage.keep, n)) for p, n in zip(previous, n_visual)])
            if n_content is not None and len(kept) == 1:       # the reference's budget shrinks to the content
                kept[0] = [min(k, c) for k, c in zip(kept[0], n_content)]
            if self.sparse:
                top.append(kept[-1])
                recycled.append([recycled_counts(p - k) if self.recycle else (0, 0) for p, k in zip(previous, top[-1])])
                kept[-1] = [k + c for k, (_, c) in zip(top[-1], recycled[-1])]
        if self.dart:                  # one stage; "reference" splits may keep a few more than the budget
            plans = [pivot_shares(k, n, t, *self.pivots) for k, n, t in zip(kept[0], n_visual, values[2 * B:3 * B])]
            kept[0] = [total for _, _, total in plans]
            # per sample: image pivots, text pivots (host-known: the text count was read above), shares per slot
            dart = (torch.tensor([[pi, min(self.pivots[1], t), *shares] for (pi, shares, _), t in
                                  zip(plans, values[2 * B:3 * B])], device=visual.device),
                    [max(column) for column in zip(*(shares for _, shares, _ in plans))])
        # the kept counts go to the device now, while the read above has emptied its queue: a host-to-device copy
        # inside the decoder loop would wait for the layers queued before it
        planned = [kept]
        if self.sparse:
            planned += [top] + [[[r[j] for r in stage] for stage in recycled] for j in range(2)]
        planned = torch.tensor(planned, device=visual.device)
        counts = planned[0]
        call = _Call(counts=counts, cache=cache, mask=mask, visual=visual, valid=valid, query=query, n_visual=n_visual,
                     n_valid=n_valid, kept=kept, length=L, labels=self.labels)
        call.content = content
        if self.renumber:            # per stage, the visual tokens dropped so far: new tokens' position shift
            call.shifts = torch.tensor(n_visual, device=visual.device) - counts
        if self.transition and self.score != "ttv":
            call.instruction = _instruction_rows(start, rows, query, values[-1])
        if self.sparse:
            columns, weight = _instruction_rows(start, rows, query, values[-1])
            call.raters = (columns, select_raters(embeds, visual, columns, weight > 0))
            call.sparse = _SparsePlan(top=planned[1], candidates=planned[2], clusters=planned[3], top_host=top,
                                      widths=[tuple(max(column) for column in zip(*stage)) for stage in recycled])
        if self.dart:
            call.dart = (text, *dart)
        return call

    def _prune(self, call, hidden, kwargs):
        """Score, select and gather the input of the current stage's layer; returns the pruned hidden states."""
        s = call.stage
        stage = self.stages[s]
        rope = call.rope if call.masks2d else kwargs["position_embeddings"]
        kept = call.kept[s]
        previous = call.kept[s - 1] if s else call.n_visual
        # DART selects rather than ranks: no scores to record
        scores = None if self.dart else self._scores(call, stage, hidden, rope)
        call.scores.append(StageScores(scores, call.visual_now, call.visual, call.origin))
        if kept == previous:              # nothing to drop (full budget): the layout, masks and cache stay
            return self._next_stage(call, hidden)
        if self.dart:
            kept_visual = self._dart_keep(call, stage, hidden)
        else:
            if self.reweight is not None:
                scores = self.reweight(scores, call.scores[-1].ordinals, s)
            if call.content is not None and s == 0:             # padding tokens score 0 (the first stage's layout)
                scores = scores * call.content
            k = call.sparse.top[s] if self.sparse else call.counts[s]
            k_max = max(call.sparse.top_host[s] if self.sparse else kept)    # host ints
            kept_visual = torch.zeros_like(call.visual_now)
            if k_max:
                top = scores.masked_fill(~call.visual_now, float("-inf")).topk(k_max, dim=1).indices
                kept_visual.scatter_(1, top, torch.arange(k_max, device=hidden.device) < k[:, None])
            if self.recycle:
                hidden = self._recycle(call, s, scores, kept_visual, hidden)
        B = call.visual_now.shape[0]
        keep = ~call.visual_now | kept_visual
        if call.filled_now is not None:
            keep = keep & call.filled_now
        call.columns = [c - (p - n) for c, p, n in zip(call.columns, previous, kept)]
        new_length = max(call.columns)
        source, filled = compaction(keep, new_length)
        call.advance(source, filled, new_length)
        if call.labels is not None:
            # dropped tokens are no targets, nor is each row's first column left: nothing precedes it
            first = call.alive & (call.alive.long().cumsum(1) == 1)
            call.labels.masked_fill_(~call.alive | first, IGNORE_INDEX)
        pruned = _gather_rows(hidden, source)
        if call.ttv is not None:
            call.ttv = _gather_rows(call.ttv, source)
        if self.renumber:
            # the original position less the visual tokens dropped before it (pad slots: whatever they gather)
            dropped = (call.visual & ~call.alive).long().cumsum(1)
            positions = (call.positions - dropped).gather(1, call.origin)
            call.rope = self.decoder.model.rotary_emb(pruned, positions)
        else:
            cos, sin = rope
            call.rope = tuple(_gather_rows(t.expand(B, -1, -1), source) for t in (cos, sin))
        call.mask2d = call.valid_now.long()
        no_padding = call.mask is None and min(call.columns) == new_length
        # with a padding mask, materialise it: skipping it (sdpa's is_causal) would first read the host (mask.all())
        call.mask4d = create_causal_mask(config=self.decoder.config, inputs_embeds=pruned,
                                         attention_mask=None if no_padding else call.mask2d, cache=call.cache,
                                         layer_idx=stage.layer, allow_is_causal_skip=no_padding)
        call.masks2d.append((stage.layer, call.mask2d))
        if self.renumber:
            call.stage_shifts.append(call.shifts[s])
        return self._next_stage(call, pruned)

    def _recycle(self, call, s, scores, kept_visual, hidden):
        """SparseVLM's recycling at stage s: the highest-scored pruned tokens (`recycled_counts`) cluster by DPC-kNN
        on their hidden states (the output of the layer before the stage) and each cluster's mean takes its centre's
        column, which is kept (`kept_visual` [B, L_now] updated). Returns the hidden states with the merged tokens."""
        plan = call.sparse
        candidates, clusters = plan.candidates[s], plan.clusters[s]
        widest, most = plan.widths[s]
        if not most:
            return hidden
        pruned = call.visual_now & ~kept_visual
        columns = scores.masked_fill(~pruned, float("-inf")).topk(widest, dim=1).indices      # descending score
        centres, merged = dpc_knn_merge(_gather_rows(hidden, columns), candidates, clusters, most)
        centres = columns.gather(1, centres)                                                 # distinct columns
        live = torch.arange(most, device=hidden.device) < clusters[:, None]
        kept_visual.scatter_(1, centres, live | kept_visual.gather(1, centres))
        merged = torch.where(live[..., None], merged.to(hidden.dtype), _gather_rows(hidden, centres))
        return hidden.scatter(1, centres[..., None].expand(-1, -1, hidden.shape[-1]), merged)

    def _next_stage(self, call, hidden):
        call.stage += 1
        if call.stage == len(self.stages):
            self._record(call)
        return hidden

    def _scores(self, call, stage, hidden, rope):
        """[B, L_now] attention of the query row to every column of the current layout (visual columns ranked);
        TransPrune's score for `transition`."""
        if self.transition:
            return self._transition_scores(call, stage, hidden, rope)
        if self.sparse:
            return self._rater_scores(call, stage)
        if self.given:
            return call.given if call.origin is None else call.given.gather(1, call.origin)
        dec = self.decoder
        query = call.query_now
        if stage.score_layer < stage.layer:
            captured = self.captured[stage.score_layer]
            q_out, k_out, rope = captured["q"], captured["k"], captured["rope"]
            q_out = _gather_rows(q_out, query[:, None])
        else:
            layer = dec.layers[stage.layer]
            normed = layer.input_layernorm(hidden)
            attn = dec.attention(stage.layer)
            q_out, k_out = attn.q_proj(_gather_rows(normed, query[:, None])), attn.k_proj(normed)
        B = hidden.shape[0]
        cos, sin = (t.expand(B, -1, -1) for t in rope)
        q_rope = (_gather_rows(cos, query[:, None]), _gather_rows(sin, query[:, None]))
        q, k = dec.query_key(stage.score_layer, q_out, k_out, q_rope, (cos, sin))
        columns = torch.arange(k.shape[2], device=k.device)
        key_mask = call.valid_now & (columns <= query[:, None])
        return attention_rows(q, k, dec.attention(stage.score_layer).scaling, mean_rows=True, key_mask=key_mask)

    def _dart_keep(self, call, stage, hidden):
        """DART at its (single) stage, on the caller's layout: pivots by the L1 norm of the previous layer's
        post-RoPE keys, similarity of the stage layer's input through the final norm (as the reference). [B, L]."""
        dec = self.decoder
        captured = self.captured[stage.score_layer]
        B = hidden.shape[0]
        keys = dec.key(stage.score_layer, captured["k"], tuple(t.expand(B, -1, -1) for t in captured["rope"]))
        text, plan, widths = call.dart
        image_slots = self.pivots[0]
        # the norm's own forward: its hook (`_spread_back`) is for the model's output, not this read
        return duplication_aware_keep(dec.norm.forward(hidden), key_l1_norms(keys), call.visual, text,
                                      plan[:, 0], plan[:, 1], plan[:, 2:], widths, image_slots)

    def _rater_scores(self, call, stage):
        """SparseVLM: the raters' attention rows at the layer before the stage (head mean, then the mean over the
        raters), from that layer's captured q / k: [B, L_now]."""
        dec = self.decoder
        captured = self.captured[stage.score_layer]
        rows, weight = call.raters
        rows = rows if call.origin is None else call.back.gather(1, rows)
        B = captured["k"].shape[0]
        cos, sin = (t.expand(B, -1, -1) for t in captured["rope"])
        q, k = dec.query_key(stage.score_layer, _gather_rows(captured["q"], rows), captured["k"],
                             (_gather_rows(cos, rows), _gather_rows(sin, rows)), (cos, sin))
        return causal_rows_mean(q, k, dec.attention(stage.score_layer).scaling, rows, weight, call.valid_now)

    def _transition_scores(self, call, stage, hidden, rope):
        """TransPrune: the summed TTV so far plus the stage layer's instruction-guided attention [B, L_now]: the
        head-mean, row-mean causal attention of the instruction tokens after the image (their rows only)."""
        iga = None
        if call.instruction is not None:
            dec = self.decoder
            rows, weight = call.instruction
            rows = rows if call.origin is None else call.back.gather(1, rows)
            normed = dec.layers[stage.layer].input_layernorm(hidden)
            attn = dec.attention(stage.layer)
            B = hidden.shape[0]
            cos, sin = (t.expand(B, -1, -1) for t in rope)
            q, k = dec.query_key(stage.layer, attn.q_proj(_gather_rows(normed, rows)), attn.k_proj(normed),
                                 (_gather_rows(cos, rows), _gather_rows(sin, rows)), (cos, sin))
            iga = causal_rows_mean(q, k, attn.scaling, rows, weight, call.valid_now)
        return transition_scores(call.ttv, iga, call.visual_now, self.score)

    # -- decoding on a pruned cache --------------------------------------------------------------------------------
    def _continue(self, i, call, args, kwargs):
        stage = _stage_of(i, call.state.masks2d)
        if stage is None:
            return None
        if stage not in call.masks4d:
            hidden = args[0] if args else kwargs["hidden_states"]
            layer, head = call.state.masks2d[stage]
            tail = (head.new_ones(hidden.shape[0], call.length - call.state.length) if call.mask is None
                    else call.mask[:, call.state.length:].to(head.dtype))
            call.masks4d[stage] = create_causal_mask(config=self.decoder.config, inputs_embeds=hidden,
                                                     attention_mask=torch.cat([head, tail], dim=1), cache=call.cache,
                                                     layer_idx=layer, allow_is_causal_skip=False)
        kwargs["attention_mask"] = call.masks4d[stage]
        if self.renumber:
            if stage not in call.ropes:
                hidden = args[0] if args else kwargs["hidden_states"]
                shift = call.state.shifts[stage]
                call.ropes[stage] = self.decoder.model.rotary_emb(hidden, call.positions - shift[:, None])
            kwargs.update(position_embeddings=call.ropes[stage], position_ids=None)
        return args, kwargs

    # -- stats ------------------------------------------------------------------------------------------------------
    def _record(self, call):
        """Stats of the call's first prefill (generate without a cache prefills at every step: the prompt's)."""
        if "llm_stages" in self.patch.stats:
            return
        cfg = self.decoder.config
        stats = self.patch.stats
        tokens = stats.setdefault("visual_tokens", {})
        tokens["LLM input"] = call.n_visual
        for stage, now in zip(self.stages, call.kept):
            tokens[f"after LLM layer {stage.layer}"] = now
        per_sample = [stage_drops(n, [(stage.layer, kept[b]) for stage, kept in zip(self.stages, call.kept)])
                      for b, n in enumerate(call.n_visual)]
        nbytes = self.adapter.model.get_input_embeddings().weight.element_size()
        stats.setdefault("prefill_flops_unpatched", sum(llm_prefill_flops(cfg, n) for n in call.n_valid))
        stats.setdefault("flops_unpatched", stats["prefill_flops_unpatched"])
        stats.setdefault("kv_cache_bytes_unpatched", sum(kv_cache_bytes(cfg, n, nbytes) for n in call.n_valid))
        stats["prefill_flops"] = stats["flops"] = sum(
            staged_prefill_flops(cfg, n, d) for n, d in zip(call.n_valid, per_sample))
        stats["kv_cache_bytes"] = sum(staged_kv_cache_bytes(cfg, n, d, nbytes)
                                      for n, d in zip(call.n_valid, per_sample))
        # per stage: (layer, visual tokens per sample from that layer on), for per-example accounting (eval)
        stats["llm_stages"] = [(stage.layer, now) for stage, now in zip(self.stages, call.kept)]
        stats["llm_kept"] = call.alive          # [B, L] bool: the prompt columns that reach the last layer
        stats["llm_scores"] = call.scores       # per stage: `StageScores` (raw scores, visual columns, ordinals)

    def _record_unpruned(self, n_valid):
        """Stats of a prefill without visual tokens: nothing pruned."""
        stats = self.patch.stats
        if "llm_stages" in stats:
            return
        stats.setdefault("visual_tokens", {})["LLM input"] = [0] * len(n_valid)
        cfg, nbytes = self.decoder.config, self.adapter.model.get_input_embeddings().weight.element_size()
        flops = sum(llm_prefill_flops(cfg, n) for n in n_valid)
        cache = sum(kv_cache_bytes(cfg, n, nbytes) for n in n_valid)
        stats.setdefault("prefill_flops_unpatched", flops)
        stats.setdefault("flops_unpatched", flops)
        stats.setdefault("kv_cache_bytes_unpatched", cache)
        stats["prefill_flops"], stats["flops"], stats["kv_cache_bytes"] = flops, flops, cache
        stats["llm_stages"] = []


@dataclass(frozen=True)
class StageScores:
    """What a stage ranked (`Patch.stats["llm_scores"]`, one per stage): `scores` [B, L_s] the query row's raw
    attention over the stage's layout, `visual` [B, L_s] its visual columns, `ordinals` (computed when read)."""

    scores: torch.Tensor
    visual: torch.Tensor
    visual_input: torch.Tensor             # [B, L] the visual columns at the LLM's input
    origin: object                         # [B, L_s] the input column of each stage column, None: the same layout

    @property
    def ordinals(self):
        """[B, L_s] each visual column's raster index within its image at the LLM input (its run of visual tokens,
        an image's block of placeholders), as the reference indexes the 576 tokens of an image."""
        visual = self.visual_input
        columns = torch.arange(visual.shape[1], device=visual.device)
        starts = visual & ~torch.nn.functional.pad(visual[:, :-1], (1, 0))
        ordinals = columns - torch.where(starts, columns, 0).cummax(1).values
        return ordinals if self.origin is None else ordinals.gather(1, self.origin)


@dataclass(frozen=True)
class _SparsePlan:
    """SparseVLM's counts for a prefill, per stage s and sample: `top` [S, B] the top-ranked tokens kept,
    `candidates` / `clusters` [S, B] the pruned tokens recycled and the merged tokens they make (`recycled_counts`),
    on the device; `top_host` the same top counts on the host, `widths` per stage the host maxima of candidates and
    clusters over the samples (the shapes of the recycling)."""

    top: torch.Tensor
    candidates: torch.Tensor
    clusters: torch.Tensor
    top_host: list
    widths: list


@dataclass
class _CacheState:
    """What a pruned cache needs on later calls: the prompt's column count and, per stage, (first layer, the 2-D
    mask of the stage layout [B, L_s]); with renumbered positions, per entry of masks2d [B] the visual tokens dropped
    up to that stage."""

    length: int
    masks2d: list
    shifts: object = None


class _Call:
    """The state of one language-model call. A prefill tracks the current layout (after the stages so far): `origin`
    (the caller's column of each current column) and `filled_now` (not a new pad slot), both None while the caller's
    layout stands; `visual_now`, `valid_now` and `query_now` in it; `alive` / `back` over the caller's columns. A call
    on a pruned cache (`state`) caches the stage masks it builds."""

    def __init__(self, cache, mask, state=None, visual=None, valid=None, query=None, n_visual=None, n_valid=None,
                 kept=None, length=None, labels=None, counts=None):
        self.cache, self.mask, self.state, self.length = cache, mask, state, length
        self.masks4d, self.ropes = {}, {}
        # renumbered positions: the call's position ids; per stage [S, B] the visual tokens dropped so far, and
        # those of the stages that changed the layout (one per masks2d entry), which later calls shift by
        self.positions = self.shifts = None
        self.stage_shifts = []
        if state is not None:
            return
        self.visual, self.valid, self.query, self.labels = visual, valid, query, labels
        self.n_visual, self.n_valid, self.kept, self.counts = n_visual, n_valid, kept, counts
        self.columns = [length] * visual.shape[0]      # real columns per sample in the current layout
        self.stage = 0
        self.masks2d = []
        self.scores = []               # per stage: its `StageScores`
        # the caller's layout until a stage changes it: no identity gathers (origin / filled None)
        self.origin = self.filled_now = None
        self.visual_now, self.valid_now, self.query_now = visual, valid, query
        self.alive = torch.ones_like(visual)
        self.rope = self.mask4d = self.mask2d = None
        self.ttv = self.instruction = None      # TransPrune: summed TTV [B, L_now]; the instruction rows, weights
        self.given = None                       # VFlowOpt: the tower's scores over the caller's columns [B, L]
        self.dart = None                        # DART: (text columns [B, L], [B, 2 + P] pivots and shares, widths)
        self.raters = self.sparse = None        # SparseVLM: (rater columns, weights); its `_SparsePlan`
        self.content = None                     # debiased padding: [B, L] the visual columns not padding

    def advance(self, source, filled, new_length):
        """Move to the layout whose column j takes current column source[:, j] (a pad slot where not filled)."""
        B, L = self.visual.shape
        self.origin = source if self.origin is None else self.origin.gather(1, source)
        self.filled_now = filled if self.filled_now is None else self.filled_now.gather(1, source) & filled
        self.visual_now = self.visual.gather(1, self.origin) & self.filled_now
        self.valid_now = self.valid.gather(1, self.origin) & self.filled_now
        spare = torch.where(self.filled_now, self.origin, L)
        self.alive = self.alive.new_zeros(B, L + 1).scatter_(1, spare, True)[:, :L]
        offset = new_length - self.alive.sum(1, keepdim=True)
        self.back = (self.alive.long().cumsum(1) - 1 + offset).clamp(min=0)
        self.query_now = self.back.gather(1, self.query[:, None])[:, 0]


def _given_scores(scores, shape):
    """The pre-LLM stage's scores [B0, L0] for a base-model call on ids of `shape` (B, L): repeated per sample as
    generate expands a batch (beams, num_return_sequences), padded with 0 for the tokens generate appended (calls
    without a cache); None for another prompt (longer than the scores, or no scores)."""
    if scores is None or shape[1] < scores.shape[1] or shape[0] % scores.shape[0]:
        return None
    if shape[0] != scores.shape[0]:
        scores = scores.repeat_interleave(shape[0] // scores.shape[0], dim=0)
    return torch.nn.functional.pad(scores, (0, shape[1] - scores.shape[1]))


def _stage_of(i, masks2d):
    """Index of the stage layer i belongs to (the last stage starting at or before it), or None."""
    index = None
    for s, (layer, _) in enumerate(masks2d):
        if layer <= i:
            index = s
    return index


def _resolve(keep, n):
    """Visual tokens a sample with n of them keeps: an int count (at most n), a ratio of n; 0 of 0."""
    if n == 0:
        return 0
    return min(int(keep), n) if isinstance(keep, numbers.Integral) else resolve_keep(keep, n)


def _gather_rows(x, index):
    """x [B, L, ...] at the rows index [B, L'] -> [B, L', ...]."""
    return x.gather(1, index.view(*index.shape, *([1] * (x.dim() - 2))).expand(*index.shape, *x.shape[2:]))


def _instruction_span(visual, query):
    """TransPrune's instruction tokens: from the column after each sample's last visual column to its query column
    (the last prompt token). Returns (start [B], rows [B]: their count); a sample whose prompt ends with its image,
    or that has none, takes the query row alone."""
    columns = torch.arange(visual.shape[1], device=visual.device)
    after = torch.where(visual, columns, -1).amax(1) + 1                  # first column after the last image
    after = torch.where(visual.any(1), after, query)                     # no image: the query row (not the prompt)
    start = torch.minimum(after, query)
    return start, query - start + 1


def _instruction_rows(start, rows, query, longest):
    """The instruction rows [B, Q] (Q = longest, a host int) as columns, and their weights [B, Q]: 1 / rows, 0 for
    filler rows, which repeat the query column."""
    columns = start[:, None] + torch.arange(longest, device=start.device)
    real = columns <= query[:, None]
    return torch.where(real, columns, query[:, None]), real / rows[:, None]


def _positions(args, kwargs, past):
    """The language-model call's 1-D position ids [B | 1, L], as the model numbers them when none are passed."""
    positions = kwargs.get("position_ids")
    if positions is not None:
        return positions
    embeds = _embeds(args, kwargs)
    return (torch.arange(embeds.shape[1], device=embeds.device) + past)[None]


def _embeds(args, kwargs):
    embeds = kwargs.get("inputs_embeds")
    if embeds is None:
        ids = args[0] if args else kwargs.get("input_ids")
        return ids[..., None]
    return embeds


def first_prunable_layer(adapter):
    """The shallowest decoder layer whose input may be pruned: 1 (layer 0 keeps every token, and with it the cache
    length generate reads), or past Qwen3-VL's deepstack layers, which add visual features at the prompt's image
    positions after each of the first layers."""
    return max(1, getattr(adapter, "deepstack", 0))


# the methods whose stages `plan_stages` lays out
STAGED = ("fastv", "pdrop", "debiased", "transition", "infoflow", "dart", "sparsevlm")


def resolved_stages(model, adapter, method, keep, options):
    """The checked options of a staged method with the layers (and ratios) its defaults scale to on this model
    filled in, as `Patch.config` shows them, and a `debiased` schedule loaded and checked against the model.
    ValueError for a budget the method does not take (`check_llm_budget`) or a schedule that does not fit."""
    from ..calibration import load_schedule
    check_llm_budget(method, keep, options)
    stages = plan_stages(method, keep, options, adapter.decoder.depth, first_prunable_layer(adapter))
    options = dict(options)
    if options.get("base", method) in ("fastv", "dart"):
        options["layer"] = stages[0].layer
    else:
        options["layers"], options["ratios"] = [s.layer for s in stages], [s.keep for s in stages]
    if method in ("transition", "sparsevlm") and options["positions"] is None:
        options["positions"] = "original" if adapter.mrope else "renumber"
    if method == "transition":
        depth = adapter.decoder.depth
        if options["accumulate"] is None:
            options["accumulate"] = list(default_accumulation(options["layers"]))
        options["accumulate"] = [i % depth for i in options["accumulate"]]
    if method == "debiased":
        if options["pad_threshold"] is None:
            options["pad_threshold"] = PAD_THRESHOLD[options["base"]]
        options["schedule"] = load_schedule(options["schedule"], model, method, options["base"],
                                            stages[0].score_layer)
    return options


def check_llm_budget(method, keep, options):
    """ValueError unless the budget fits the method: FastV (and `debiased` on it) keeps `keep` visual tokens per
    sample; PyramidDrop's stages keep their `ratios`, or, given keep (a ratio), the geometric ratios that make keep
    the average share over the decoder layers (`vlmeff.pruners.stages.average_budget_ratios`)."""
    base = options.get("base", method)
    if base in ("fastv", "dart") and keep is None:
        raise ValueError(f"method {method!r} needs keep (visual tokens kept per sample after layer K: an int count "
                         "or a ratio in (0, 1])")
    if base in ("pdrop", "transition", "sparsevlm") and keep is not None and (not isinstance(keep, float)
                                                                 or options.get("ratios") is not None):
        ratios = {"transition": "TransPrune's ratios 0.875 : 0.625 : 0.125 scaled by one factor",
                  "sparsevlm": "SparseVLM's schedule of that budget (192, 128, 96 or 64 of 576) or the nearest one's "
                               "shape scaled by one factor"}.get(base, "the ratios lambda, lambda^2, ...")
        raise ValueError(f"method {method!r}: keep={keep!r} with staged pruning is the average share of the "
                         f"visual tokens the decoder layers see, a float ratio in (0, 1], which sets {ratios}; give "
                         "either keep or ratios=[...], not both, and no token count")
