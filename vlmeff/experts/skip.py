"""Routed-expert skipping by modality thresholds (MoDES, arXiv 2511.15690) on one MoE model instance.

A forward pre-hook on the base multimodal model reads the token ids the LLM is about to see (after any visual-token
pruning, which rebuilds the ids) and keeps, on the device, which flattened tokens are visual and which are real
(not padding). Each routed-experts module (transformers' `@use_experts_implementation` classes) gets an
instance-level `forward` that rewrites its routing before the implementation runs: a skipped (token, slot) pair
gets the sentinel expert index `num_experts` and a zero weight, and

- eager: the per-expert loop drops the sentinel (its `one_hot(..., num_experts + 1)` / `expert_idx == num_experts`);
- grouped_mm: with the instance's `_is_expert_parallel` set, the sort pushes sentinels past the last offset, so the
  grouped GEMMs never read those rows (and their uninitialised output rows are masked);
- batched_mm: its GEMM batch is one row per pair with a static size, so the kept pairs are compacted first (one
  host read per MoE layer, the kept-pair count) and the implementation runs on those only.

Host reads: none in the skip rule or the stats (they accumulate on the device and are read when `stats` is read);
batched_mm one per MoE layer as above; eager and the CPU grouped_mm fallback keep their own.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..patching import Patch

MODALITIES = ("text", "visual")


def skip_pairs(weights, is_visual, alpha, thresholds):
    """The DMT rule: which routed (token, slot) pairs to skip.

    weights (T, k): the router's top-k weights in any order and scale (DeepSeek-V3 multiplies them by a routing
    factor and leaves them unsorted), renormalised here over the top-k into the router probability pi;
    is_visual (T,) bool; alpha (2,) [text, visual] importance of this layer; thresholds (2,) [tau_text, tau_visual].
    -> (T, k) bool: alpha[m(t)] * pi[t, s] < tau[m(t)].
    """
    prob = weights.float() / weights.float().sum(-1, keepdim=True)
    modality = is_visual.long()
    return alpha[modality][:, None] * prob < thresholds[modality][:, None]


def find_experts(model):
    """[(layer index, routed-experts module)] in execution order; raises for a model without routed experts."""
    found = [m for m in model.modules() if hasattr(m, "_is_expert_parallel") and hasattr(m, "num_experts")]
    if not found:
        raise ValueError(f"{type(model).__name__} has no routed-experts module (a transformers "
                         "@use_experts_implementation class such as Qwen3MoeExperts); skip_experts needs a MoE "
                         "language model (Qwen3-MoE, Qwen3-VL-MoE, Mixtral, DeepSeek-V3, ...), not a dense one")
    return list(enumerate(found))


def model_identity(model) -> dict:
    """Fields a schedule must match: architecture, MoE shape and a checksum of the router weights."""
    experts = [m for _, m in find_experts(model)]
    config = model.config
    text = getattr(config, "text_config", config)
    routers = [p for n, p in model.named_parameters() if n.endswith(("gate.weight", "router.weight"))
               and p.dim() == 2 and p.shape[0] == experts[0].num_experts]
    return dict(model_type=config.model_type, text_model_type=text.model_type, moe_layers=len(experts),
                num_experts=experts[0].num_experts, top_k=int(getattr(text, "num_experts_per_tok", 0)),
                hidden_size=text.hidden_size,
                router_checksum=round(float(sum(p.detach().double().abs().sum() for p in routers)), 6))


def _visual_token_ids(model):
    config = model.config
    ids = [getattr(config, name, None) for name in ("image_token_id", "image_token_index", "video_token_id")]
    ids = sorted({i for i in ids if isinstance(i, int)})
    if not ids:
        raise ValueError(f"{type(model).__name__}: its config names no image_token_id / image_token_index, so the "
                         "visual tokens cannot be told from the text tokens")
    return ids


def _base_model(model):
    """The module that receives the token ids the LLM will see (the multimodal base model, else the model)."""
    inner = getattr(model, "model", None)
    return inner if inner is not None and hasattr(inner, "language_model") else model


def _check_thresholds(thresholds):
    if not (isinstance(thresholds, (tuple, list)) and len(thresholds) == 2):
        raise ValueError(f"thresholds={thresholds!r}: expected a pair (tau_text, tau_visual) of floats in [0, 1]")
    for name, tau in zip(MODALITIES, thresholds):
        if not isinstance(tau, (int, float)) or not 0.0 <= float(tau) <= 1.0:
            raise ValueError(f"thresholds={tuple(thresholds)!r}: tau_{name}={tau!r} is out of range; "
                             "each threshold is a float in [0, 1] (0 skips nothing)")
    return tuple(float(t) for t in thresholds)


def _check_alpha(alpha, n_layers):
    if alpha is None:
        return torch.ones(n_layers, 2)
    table = torch.as_tensor(alpha, dtype=torch.float32)
    if table.shape != (n_layers, 2) or not torch.isfinite(table).all() or (table < 0).any():
        raise ValueError(f"alpha of shape {tuple(table.shape)}: expected {n_layers} MoE layers x 2 modalities "
                         "(text, visual) of finite non-negative importances")
    return table


def load_schedule(path, model) -> dict:
    """A calibrated schedule (JSON from `vlmeff.calibrate(..., method="modes")`), refused for another model."""
    schedule = json.loads(Path(path).read_text())
    if schedule.get("method") != "modes":
        raise ValueError(f"schedule {path}: method={schedule.get('method')!r}, expected 'modes'")
    mine, theirs = model_identity(model), schedule.get("model", {})
    diff = [f"{k}: schedule {theirs.get(k)!r} != model {v!r}" for k, v in mine.items() if theirs.get(k) != v]
    if diff:
        raise ValueError(f"schedule {path} was calibrated for another model ({'; '.join(diff)})")
    return schedule


class ExpertSkipPatch(Patch):
    """Handle of `skip_experts`. Its own marker attribute, so it coexists with a visual-token `vlmeff.patch` on
    the same model (two expert-skipping handles on one model are refused like two token patches).

    `stats` (read from the device when read): skipped / routed (token, slot) pairs of the real (non-padding)
    tokens, accumulated over every forward since the patch or since `stats = {}`: `skip_ratio`, per modality
    `skip_ratio_text` / `skip_ratio_visual`, per layer `layers` [{text, visual, all}], and `pairs` (routed counts).
    """

    ATTR = "_vlmeff_expert_skip"

    def __init__(self, model, config, n_layers):
        self._counts = torch.zeros(n_layers, 2, 2, dtype=torch.long)   # layer x modality x (skipped, routed)
        super().__init__(model, config)
        self._attrs = []
        self.visual = self.valid = None     # (T,) bool of the current forward, set by the model's pre-hook
        self.recorder = None                 # calibration: a list collecting (scores, is_visual, valid) per call

    @property
    def stats(self):
        counts = self._counts.cpu()
        skipped, routed = counts[..., 0], counts[..., 1]

        def ratio(s, r):
            return float(s) / float(r) if int(r) else 0.0
        return dict(skip_ratio=ratio(skipped.sum(), routed.sum()),
                    skip_ratio_text=ratio(skipped[:, 0].sum(), routed[:, 0].sum()),
                    skip_ratio_visual=ratio(skipped[:, 1].sum(), routed[:, 1].sum()),
                    layers=[dict(text=ratio(s[0], r[0]), visual=ratio(s[1], r[1]), all=ratio(s.sum(), r.sum()))
                            for s, r in zip(skipped, routed)],
                    pairs=dict(text=int(routed[:, 0].sum()), visual=int(routed[:, 1].sum())))

    @stats.setter
    def stats(self, value):
        if value:
            raise ValueError("stats can only be reset, with patch.stats = {}")
        self._counts = self._counts.zero_()

    def set_attr(self, obj, name, value):
        self._attrs.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    def unpatch(self):
        if self.active:
            for obj, name, value in reversed(self._attrs):
                setattr(obj, name, value)
            self._attrs.clear()
        super().unpatch()


def skip_experts(model, thresholds=None, schedule=None, alpha=None) -> ExpertSkipPatch:
    """Skips routed experts for (token, expert) pairs whose score alpha[layer, modality] * pi falls below the
    token's modality threshold; pi = router probability renormalised over the top-k. Skipped weights are zeroed and
    the others not renormalised (as in MoDES).

    thresholds: (tau_text, tau_visual) in [0, 1]; schedule: path of a calibrated JSON (alpha and thresholds, refused
    for another model); alpha: (MoE layers, 2) importances, default the schedule's or all ones (a plain router-
    probability threshold). Explicit thresholds / alpha override the schedule's.
    """
    experts = find_experts(model)
    if schedule is not None:
        loaded = load_schedule(schedule, model)
        thresholds = loaded["thresholds"] if thresholds is None else thresholds
        alpha = loaded["alpha"] if alpha is None else alpha
    if thresholds is None:
        raise ValueError("skip_experts needs thresholds=(tau_text, tau_visual) or schedule=<path of a calibrated "
                         "JSON from vlmeff.calibrate(model, data, method='modes', target_skip=...)>")
    thresholds = _check_thresholds(thresholds)
    table = _check_alpha(alpha, len(experts))
    return _install(model, experts, table, thresholds, dict(method="modes", thresholds=thresholds,
                                                              schedule=str(schedule) if schedule else None))


def _install(model, experts, alpha, thresholds, config):
    """Installs the hooks; alpha and thresholds are trusted (calibration passes values outside the user range)."""
    visual_ids = _visual_token_ids(model)
    device = next(model.parameters()).device
    patch = ExpertSkipPatch(model, config, len(experts))
    patch._counts = patch._counts.to(device)
    ids_table = torch.tensor(visual_ids, device=device)
    alpha, taus = alpha.to(device), torch.tensor(thresholds, dtype=torch.float32, device=device)

    def read_tokens(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        if ids is None:            # embeddings only: no placeholders to see, every token counts as text
            shape = embeds.shape[:2]
            patch.visual = torch.zeros(shape.numel(), dtype=torch.bool, device=embeds.device)
        else:
            shape = ids.shape
            patch.visual = torch.isin(ids, ids_table).reshape(-1)
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            patch.valid = mask[:, -shape[1]:].reshape(-1).bool()
        else:
            patch.valid = torch.ones(shape.numel(), dtype=torch.bool, device=patch.visual.device)

    patch.hook(_base_model(model).register_forward_pre_hook(read_tokens, with_kwargs=True))
    for layer, module in experts:
        patch.set_attr(module, "_is_expert_parallel", True)
        patch.override(module, "forward", _skipping_forward(patch, module, layer, alpha[layer], taus))
    return patch


def _skipping_forward(patch, module, layer, alpha, taus):
    original = type(module).forward.__get__(module)
    sentinel = module.num_experts

    def forward(hidden_states, top_k_index, top_k_weights):
        if patch.visual is None or patch.visual.numel() != hidden_states.shape[0]:
            raise RuntimeError(f"expert skipping: the MoE layer got {hidden_states.shape[0]} tokens but the model's "
                               f"last input had {None if patch.visual is None else patch.visual.numel()}; call the "
                               "patched model itself (its forward / generate), not its language model alone")
        skip = skip_pairs(top_k_weights, patch.visual, alpha, taus)
        valid = patch.valid[:, None]
        counted = torch.stack([(skip & valid).sum(-1), valid.expand_as(skip).sum(-1)], -1)   # (T, 2)
        patch._counts[layer].index_add_(0, patch.visual.long(), counted)
        if patch.recorder is not None:
            prob = top_k_weights.float() / top_k_weights.float().sum(-1, keepdim=True)
            patch.recorder.append((alpha[patch.visual.long()][:, None] * prob, patch.visual, patch.valid))
        index = top_k_index.masked_fill(skip, sentinel)
        weights = top_k_weights.masked_fill(skip, 0.0)
        if module.config._experts_implementation == "batched_mm":
            return _compacted(original, hidden_states, index, weights, sentinel)
        return original(hidden_states, index, weights)

    return forward


def _compacted(original, hidden_states, index, weights, sentinel):
    """batched_mm on the kept pairs only. hidden_states (T, H), index / weights (T, k) -> (T, H)."""
    k = index.shape[1]
    kept = (index.reshape(-1) != sentinel).nonzero().squeeze(1)       # the one host read: the kept-pair count
    tokens = kept // k
    out = original(hidden_states[tokens], index.reshape(-1)[kept, None], weights.reshape(-1)[kept, None])
    return torch.zeros_like(hidden_states).index_add_(0, tokens, out)
