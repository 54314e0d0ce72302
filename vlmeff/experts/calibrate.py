"""MoDES calibration: layer importance alpha and the frontier search of (tau_text, tau_visual) for a target skip
ratio, saved as a JSON schedule that `skip_experts(model, schedule=path)` reloads.

Calibration runs off the hot path: boolean-mask indexing and host reads are fine here.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from tqdm import tqdm

from .skip import MODALITIES, _install, find_experts, model_identity


def easyvqa_calibration(processor, n: int = 64, batch_size: int = 16, seed: int = 0) -> list[dict]:
    """n easy-VQA TRAIN questions (drawn with `seed`), answers appended, as left-padded model-input batches.

    Each batch holds the processor's inputs plus `answer_mask` (B, L) bool: the positions whose next-token logits
    predict an answer token (the distribution the KL of the calibration compares).
    """
    from vlmeff.data import easyvqa

    questions, answers, image_ids = easyvqa.questions("train")
    images = easyvqa.load_images("train")
    picked = random.Random(seed).sample(range(len(questions)), n)
    tok, batches = processor.tokenizer, []
    for start in range(0, n, batch_size):
        rows = picked[start:start + batch_size]
        msgs = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": questions[r]}]}]
                for r in rows]
        texts = processor.apply_chat_template(msgs, add_generation_prompt=True)
        inputs = processor(images=[images[image_ids[r]] for r in rows], text=texts, padding=True,
                           return_tensors="pt")
        seqs = [ids[mask.bool()].tolist() + tok(answers[r], add_special_tokens=False).input_ids
                for ids, mask, r in zip(inputs["input_ids"], inputs["attention_mask"], rows)]
        length = max(map(len, seqs))
        ids = torch.full((len(seqs), length), tok.pad_token_id)
        mask = torch.zeros(len(seqs), length, dtype=torch.long)
        answer_mask = torch.zeros(len(seqs), length, dtype=torch.bool)
        for b, (seq, r) in enumerate(zip(seqs, rows)):
            ids[b, length - len(seq):], mask[b, length - len(seq):] = torch.tensor(seq), 1
            n_answer = len(tok(answers[r], add_special_tokens=False).input_ids)
            answer_mask[b, length - n_answer - 1:length - 1] = True
        batches.append(dict(inputs, input_ids=ids, attention_mask=mask, answer_mask=answer_mask))
    return batches


def answer_log_probs(model, batches) -> list[torch.Tensor]:
    """Per batch, (answer tokens, V) float32 log-softmax of the logits at the answer positions."""
    out = []
    with torch.no_grad():
        for batch in batches:
            inputs = {k: v for k, v in batch.items() if k != "answer_mask"}
            out.append(model(**inputs).logits[batch["answer_mask"]].float().log_softmax(-1))
    return out


def mean_kl(reference, log_probs) -> float:
    """KL(p_reference || p) summed over the answer tokens, divided by their count (MoDES' L). Each token's KL is
    floored at 0: rounding makes a nearly unchanged distribution's sum slightly negative, and a negative loss would
    give a negative importance alpha, which `skip_experts` refuses."""
    total = sum(float((ref.exp() * (ref - lp)).sum(-1).clamp(min=0).sum()) for ref, lp in zip(reference, log_probs))
    return total / max(sum(ref.shape[0] for ref in reference), 1)


def layer_importance(model, batches, reference, progress=None) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (alpha, losses), both (MoE layers, 2): losses[l, m] = mean KL when layer l's routed experts are skipped
    for the tokens of modality m (their routed output is zero); alpha = losses normalised per modality."""
    experts = find_experts(model)
    losses = torch.zeros(len(experts), 2, dtype=torch.float64)
    for layer in range(len(experts)):
        for m, name in enumerate(MODALITIES):
            alpha = torch.ones(len(experts), 2)
            alpha[layer, m] = -1.0          # score -pi < 0 = tau: every pair of that layer and modality is skipped
            patch = _install(model, experts, alpha, (0.0, 0.0), dict(method="modes", calibrating=name))
            try:
                losses[layer, m] = mean_kl(reference, answer_log_probs(model, batches))
            finally:
                patch.unpatch()
            if progress is not None:
                progress.update()
    totals = losses.sum(0, keepdim=True)
    if (totals <= 0).any():
        raise ValueError("calibration data: skipping a modality's experts changed no answer distribution; "
                         "the data needs both text and visual tokens (images) and answer positions")
    return (losses / totals).float(), losses


def threshold_grids(model, batches, alpha, size: int) -> list[list[float]]:
    """Per modality, at most `size` distinct ascending thresholds from 0 (skips nothing) to just above the largest
    score (skips every pair), at the quantiles of the scores alpha * pi the unskipped model routes on the
    calibration data. Repeated quantiles (a layer with alpha = 0 gives many scores of 0) are kept once: they
    would only cost the search evaluations of the same point."""
    experts = find_experts(model)
    patch = _install(model, experts, alpha, (0.0, 0.0), dict(method="modes", calibrating="grid"))
    patch.recorder = []
    try:
        answer_log_probs(model, batches)
    finally:
        patch.unpatch()
    grids = []
    for visual in (False, True):
        scores = torch.cat([s[(v == visual) & ok].reshape(-1) for s, v, ok in patch.recorder])
        if scores.numel() == 0:
            raise ValueError(f"calibration data has no {MODALITIES[int(visual)]} tokens")
        grid = torch.quantile(scores.double(), torch.linspace(0, 1, size, dtype=torch.float64))
        grid[0], grid[-1] = 0.0, min(float(torch.nextafter(scores.max().double(), torch.tensor(2.0))), 1.0)
        grids.append([float(t) for t in torch.unique(grid)])
    return grids


def frontier_search(evaluate, n_text: int, n_visual: int, target: float):
    """Minimises g over the grid points with f >= target, f non-decreasing in both indices (MoDES' frontier).

    evaluate(i, j) -> (f, g) for text index i and visual index j. For each i in ascending order the visual pointer
    moves down while f(i, j) >= target; the frontier point j + 1 is the cheapest feasible one of that row when g
    is non-decreasing too. At most 2 * n_text + n_visual evaluations (cached), instead of n_text * n_visual.
    -> (i, j, f, g, evaluations).
    """
    cache = {}

    def cached(i, j):
        if (i, j) not in cache:
            cache[i, j] = evaluate(i, j)
        return cache[i, j]

    best, j = None, n_visual - 1
    for i in range(n_text):
        while j >= 0 and cached(i, j)[0] >= target:
            j -= 1
        if j + 1 < n_visual:
            f, g = cached(i, j + 1)
            if f >= target and (best is None or g < best[3]):
                best = (i, j + 1, f, g)
    if best is None:
        raise ValueError(f"target_skip={target!r} is not reached on the threshold grid (largest skip ratio "
                         f"{max(f for f, _ in cache.values()):.3f})")
    return (*best, len(cache))


def calibrate(model, data, method: str = "modes", target_skip: float = 0.7, grid_size: int = 16, n: int = 64,
              seed: int = 0, path: str | Path | None = None, progress: bool = True) -> dict:
    """Calibrates MoDES on `data` (a processor: n easy-VQA TRAIN questions drawn with `seed`; or batches from
    `easyvqa_calibration`) for `target_skip`, the share of routed (token, slot) pairs to skip.

    -> the schedule (dict; written as JSON to `path` if given): model identity, alpha, thresholds, the skip
    ratio and KL reached on the calibration data, grids and layer losses.
    """
    if method != "modes":
        raise ValueError(f"method={method!r}: vlmeff.calibrate accepts 'modes' (MoE expert skipping)")
    if not isinstance(target_skip, (int, float)) or not 0.0 < target_skip < 1.0:
        raise ValueError(f"target_skip={target_skip!r}: expected the share of expert slots to skip, in (0, 1)")
    experts = find_experts(model)
    torch.manual_seed(seed)
    batches = easyvqa_calibration(data, n=n, seed=seed) if hasattr(data, "apply_chat_template") else list(data)
    bar = tqdm(total=2 * len(experts) + 2 + 2 * grid_size + grid_size, desc="calibrate modes", disable=not progress)
    reference = answer_log_probs(model, batches)
    alpha, losses = layer_importance(model, batches, reference, bar)
    grids = threshold_grids(model, batches, alpha, grid_size)
    bar.update(2)

    def evaluate(i, j):
        patch = _install(model, experts, alpha, (grids[0][i], grids[1][j]), dict(method="modes"))
        try:
            g = mean_kl(reference, answer_log_probs(model, batches))
            f = patch.stats["skip_ratio"]
        finally:
            patch.unpatch()
        bar.update()
        return f, g

    i, j, f, g, evaluations = frontier_search(evaluate, len(grids[0]), len(grids[1]), target_skip)
    bar.total = bar.n          # the total was an upper bound on the evaluations
    bar.close()
    schedule = dict(method="modes", model=model_identity(model), alpha=alpha.tolist(),
                    thresholds=[grids[0][i], grids[1][j]], target_skip=target_skip, calibration_skip=f,
                    calibration_kl=g, evaluations=evaluations, grids=grids, layer_losses=losses.tolist(),
                    n_samples=sum(b["input_ids"].shape[0] for b in batches), seed=seed)
    if path is not None:
        Path(path).write_text(json.dumps(schedule, indent=1))
    return schedule
