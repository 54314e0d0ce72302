"""AMP: adaptive MLP neuron pruning (visresearch/AMP, arXiv 2603.08100), label-free, then structural slicing.

1. Importance, once, on the unpruned model: s_{l,j} = mean over batches of mean over (images x tokens) of
   |a_{l,j} * dL/da_{l,j}|, a = the input of the MLP's output linear (the post-activation, post-gate hidden vector).
2. Label-free loss of a batch: z = L2-normalised image embeddings (B, D), P = softmax_row(temp * z z^T),
   L = -(1/B) sum_i sum_j P_ij log P_ij (low when the batch's images are told apart). On a calibration set: the
   mean over its batches.
3. Layers from last to first, neurons sorted by score: binary search of the kept width on [0, D] for `steps`
   iterations (keep the top `mid`, accept if L(mid) - L_prev <= tolerance: right = mid, else left = mid). The kept
   width is the last accepted `mid` (D if none), and L_prev becomes its loss, so the tolerance holds per layer and
   adds up over the layers. The search masks the hidden neurons; the chosen widths are then sliced off for real.
4. Optionally distillation to the unpruned features (MSE), on the same data.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from .sites import Family, MlpSlot, family, pixels, slice_mlp

DEFAULT_TOLERANCE = math.log(1.02)  # the reference code's default loss_inc_thresh
DEFAULT_TEMP = 20.0                 # the reference's temp_inv for DINOv2 (15 for OpenCLIP-g)


@dataclass
class LayerSearch:
    """The binary search of one MLP: `tried` = [(width, loss, accepted)] in search order."""
    layer: int
    width_before: int
    width: int
    loss_before: float
    loss_after: float
    tried: list[tuple[int, float, bool]] = field(default_factory=list)


@dataclass
class MlpPruneReport:
    """What `prune_mlp` did. FLOPs are per image, of the tower's forward (torch's FlopCounterMode: matmuls and
    attention); `loss_*` are the calibration entropy loss (before distillation); `layers` is in search order
    (last layer first)."""
    widths_before: list[int]
    widths_after: list[int]
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    loss_before: float
    loss_after: float
    tolerance: float
    temp: float
    layers: list[LayerSearch]
    kept: list[torch.Tensor]          # per MLP, first layer first: the kept neurons' original indices, ascending
    distill: dict | None = None
    seconds: float = 0.0

    def summary(self) -> str:
        return (f"MLP widths {sum(self.widths_before)} -> {sum(self.widths_after)}, params {self.params_before:,} -> "
                f"{self.params_after:,} ({self.params_after / self.params_before:.1%}), FLOPs/image "
                f"{self.flops_before:,} -> {self.flops_after:,} ({self.flops_after / self.flops_before:.1%}), "
                f"loss {self.loss_before:.4f} -> {self.loss_after:.4f}")


def entropy_loss(z: torch.Tensor, temp: float) -> torch.Tensor:
    """z (B, D) image embeddings -> scalar: mean row entropy of softmax(temp * cos-sim), computed in fp32."""
    z = F.normalize(z.float(), dim=-1)
    logits = temp * z @ z.T
    return -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1).mean()


def calibration_loss(model: nn.Module, fam: Family, data, temp: float) -> float:
    """Mean entropy loss over the batches of `data`."""
    with torch.no_grad():
        return sum(entropy_loss(fam.embed(model, b), temp).item() for b in data) / len(data)


class _CaptureInputs:
    """Forward pre-hooks that keep the input of every slot's output linear (the hidden neurons a)."""

    def __init__(self, slots: tuple[MlpSlot, ...]):
        self.acts: list[torch.Tensor | None] = [None] * len(slots)
        self.handles = [s.out_linear.register_forward_pre_hook(self._hook(i)) for i, s in enumerate(slots)]

    def _hook(self, i):
        def keep(module, args):
            self.acts[i] = args[0]
        return keep

    def remove(self):
        for h in self.handles:
            h.remove()


class NeuronMasks:
    """Context: multiplies the hidden neurons of slot l by masks[l] (W_l,) where set (None = all kept). Masking a
    neuron equals removing it: its column of the output linear then meets a zero."""

    def __init__(self, slots: tuple[MlpSlot, ...]):
        self.slots = slots
        self.masks: list[torch.Tensor | None] = [None] * len(slots)
        self.handles = []

    def _hook(self, i):
        def apply(module, args):
            m = self.masks[i]
            return None if m is None else (args[0] * m.to(args[0].dtype),) + args[1:]
        return apply

    def __enter__(self):
        self.handles = [s.out_linear.register_forward_pre_hook(self._hook(i)) for i, s in enumerate(self.slots)]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def taylor_importance(model: nn.Module, data, temp: float = DEFAULT_TEMP, progress: bool = False) -> list[torch.Tensor]:
    """[(W_l,) fp32] per MLP: mean over batches of mean over (images x tokens) of |a * dL/da| (L = entropy_loss).

    Gradients are taken w.r.t. the activations only (parameters' .grad is untouched); the pixels require grad so
    that a frozen model still builds the graph. A layer the loss does not reach (e.g. after LLaVA's feature layer)
    scores 0.
    """
    fam = family(model)
    _check_data(data)
    scores = [torch.zeros(s.width, dtype=torch.float32, device=s.out_linear.weight.device) for s in fam.slots]
    capture = _CaptureInputs(fam.slots)
    try:
        for batch in tqdm(data, desc="AMP importance", disable=not progress):
            x = pixels(model, batch).detach().requires_grad_(True)
            with torch.enable_grad():
                loss = entropy_loss(fam.embed(model, x), temp)
                used = [(i, a) for i, a in enumerate(capture.acts) if a is not None and a.requires_grad]
                grads = torch.autograd.grad(loss, [a for _, a in used], allow_unused=True)
            for (i, a), g in zip(used, grads):
                if g is not None:
                    scores[i] += (a.detach() * g).abs().float().flatten(0, -2).mean(0)
            capture.acts = [None] * len(fam.slots)
    finally:
        capture.remove()
    return [s / len(data) for s in scores]


def search_widths(model: nn.Module, data, scores: list[torch.Tensor], tolerance: float, temp: float, steps: int,
                  progress: bool = False) -> tuple[list[torch.Tensor], list[LayerSearch], float]:
    """The per-layer binary search on the masked model -> (kept neuron indices per layer, in score order; the
    searches in order (last layer first); the loss before any pruning)."""
    fam = family(model)
    widths = [s.width for s in fam.slots]
    orders = [torch.argsort(s, descending=True, stable=True) for s in scores]
    keep = list(orders)
    records = []
    with NeuronMasks(fam.slots) as masks:
        loss_prev = loss0 = calibration_loss(model, fam, data, temp)
        bar = tqdm(total=len(widths) * steps, desc="AMP search", disable=not progress)
        for layer in reversed(range(len(widths))):
            rec = LayerSearch(layer, widths[layer], widths[layer], loss_prev, loss_prev)
            left, right = 0, widths[layer]
            for _ in range(steps):
                mid = (left + right) // 2
                masks.masks[layer] = _mask(orders[layer][:mid], widths[layer])
                loss = calibration_loss(model, fam, data, temp)
                accepted = loss - loss_prev <= tolerance
                rec.tried.append((mid, loss, accepted))
                if accepted:
                    right, rec.loss_after = mid, loss
                else:
                    left = mid
                bar.update(1)
                bar.set_postfix(layer=layer, width=right)
            rec.width, loss_prev = right, rec.loss_after
            keep[layer] = orders[layer][:right]
            masks.masks[layer] = _mask(keep[layer], widths[layer])
            records.append(rec)
        bar.close()
    return keep, records, loss0


def _mask(idx: torch.Tensor, width: int) -> torch.Tensor:
    return torch.zeros(width, device=idx.device).index_fill_(0, idx, 1.0)


def count_flops(model: nn.Module, fam: Family, batch) -> int:
    """FLOPs of the tower's forward on one image of `batch`."""
    x = pixels(model, batch)[:1]
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fam.features(model, x)
    return counter.get_total_flops()


def mlp_widths(model: nn.Module) -> list[int]:
    """Hidden width of every MLP of a supported model, first layer first."""
    return [s.width for s in family(model).slots]


def distill_features(model: nn.Module, data, targets: list[torch.Tensor], epochs: int, lr: float,
            progress: bool = False) -> None:
    """AdamW on the tower's parameters to minimise MSE(features, target) per batch, `epochs` passes over data.

    The model stays in eval mode (no dropout / drop path: a short deterministic distillation); the parameters'
    requires_grad flags are restored afterwards."""
    fam = family(model)
    params = list(fam.tower.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    try:
        with torch.enable_grad():
            for _ in tqdm(range(epochs), desc="AMP distill", disable=not progress):
                for batch, target in zip(data, targets):
                    loss = F.mse_loss(fam.features(model, batch).float(), target.to(_device(model)).float())
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
    finally:
        opt.zero_grad(set_to_none=True)
        for p, f in zip(params, flags):
            p.requires_grad_(f)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def feature_mse(model: nn.Module, data, targets: list[torch.Tensor]) -> float:
    """Mean over batches of MSE(features, target)."""
    fam = family(model)
    with torch.no_grad():
        return sum(F.mse_loss(fam.features(model, b).float(), t.to(_device(model)).float()).item()
                   for b, t in zip(data, targets)) / len(targets)


def _check_data(data) -> None:
    if iter(data) is data:
        raise TypeError("data must be re-iterable (a list of batches or a DataLoader): the search passes over it "
                        f"many times; got the iterator {type(data).__name__}")
    if len(data) == 0:
        raise ValueError("data is empty: give at least one batch of >= 2 images")


def _check_options(data, tolerance, temp, steps, distill_epochs, distill_lr) -> None:
    def bad(name, value, accepted):
        raise ValueError(f"{name}={value!r} is invalid; accepted: {accepted}")

    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not tolerance >= 0:
        bad("tolerance", tolerance, "a number >= 0 (the loss increase allowed per layer)")
    if isinstance(temp, bool) or not isinstance(temp, (int, float)) or not temp > 0 or math.isinf(temp):
        bad("temp", temp, "a finite number > 0")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        bad("steps", steps, "an int >= 1")
    if isinstance(distill_epochs, bool) or not isinstance(distill_epochs, int) or distill_epochs < 1:
        bad("distill_epochs", distill_epochs, "an int >= 1")
    if isinstance(distill_lr, bool) or not isinstance(distill_lr, (int, float)) or not distill_lr > 0:
        bad("distill_lr", distill_lr, "a number > 0")
    _check_data(data)


def prune_mlp(model: nn.Module, data, tolerance: float = DEFAULT_TOLERANCE, temp: float = DEFAULT_TEMP,
              steps: int = 6, distill: bool = False, distill_epochs: int = 1, distill_lr: float = 1e-4,
              progress: bool = True) -> MlpPruneReport:
    """Prunes the MLP hidden neurons of `model` in place with AMP and slices them off -> MlpPruneReport.

    model: timm VisionTransformer, HF CLIPVisionModel / SiglipVisionModel / Dinov2Model, or a
    LlavaForConditionalGeneration (its vision tower is pruned, against the projected image tokens the LLM reads).
    data: a re-iterable of batches (a list or DataLoader) of (B >= 2, 3, H, W) pixels, mappings with
    "pixel_values" or (images, labels) tuples (labels are ignored); the same calibration batches serve the importance, the search and the distillation (use
    training images, never the evaluation split). tolerance: loss increase accepted per layer (>= 0). temp: the
    softmax scale T of the entropy loss. steps: binary-search iterations per layer. distill: then train the tower
    for `distill_epochs` passes over `data` (AdamW, `distill_lr`) to match the unpruned model's features (MSE;
    the unpruned features are computed once, before pruning, and held on CPU).
    Save with `vlmeff.save_pruned_mlp`, reload with `vlmeff.load_pruned_mlp`.
    """
    _check_options(data, tolerance, temp, steps, distill_epochs, distill_lr)
    fam = family(model)
    first = next(iter(data))
    if pixels(model, first).shape[0] < 2:
        raise ValueError("each batch of data needs >= 2 images: the entropy loss of one image is always 0; got a "
                         "batch of 1")
    t0, training = time.time(), model.training
    model.eval()
    try:
        widths0, params0 = mlp_widths(model), sum(p.numel() for p in model.parameters())
        flops0 = count_flops(model, fam, first)
        targets = None
        if distill:
            with torch.no_grad():
                targets = [fam.features(model, b).detach().cpu() for b in data]
        scores = taylor_importance(model, data, temp, progress)
        keep, records, loss0 = search_widths(model, data, scores, tolerance, temp, steps, progress)
        kept = [torch.sort(idx).values for idx in keep]  # the original neuron order
        for slot, idx in zip(fam.slots, kept):
            slice_mlp(slot, idx)
        report = MlpPruneReport(widths0, mlp_widths(model), params0, sum(p.numel() for p in model.parameters()),
                                flops0, count_flops(model, fam, first), loss0,
                                calibration_loss(model, fam, data, temp), float(tolerance), float(temp), records, kept)
        if distill:
            before = feature_mse(model, data, targets)
            distill_features(model, data, targets, distill_epochs, distill_lr, progress)
            report.distill = dict(epochs=distill_epochs, lr=distill_lr, mse_before=before,
                                  mse_after=feature_mse(model, data, targets),
                                  loss_after=calibration_loss(model, fam, data, temp))
    finally:
        model.train(training)
    report.seconds = round(time.time() - t0, 2)
    return report
