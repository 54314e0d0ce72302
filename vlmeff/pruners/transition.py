"""TransPrune (arXiv 2507.20630, liaolea/TransPrune): rank visual tokens by how much the decoder transforms them,
token transition variation (TTV), plus the attention the instruction pays them (IGA). Pure tensor functions: the
in-LLM engine (`vlmeff.engine.llm`) feeds them what the layers compute anyway.

Reference (`llava/model/modeling_llama_transprune.py`): per sublayer (attention, FFN) of the accumulating layers,
x the normed sublayer input, y its output before the residual add,
    TTV = ||y|| / ||x|| * softmax over the sequence of (1 - cos(x, y)),
summed over sublayers and layers (re-indexed to the kept tokens after each stage); IGA = the head-mean, then
query-mean attention of the instruction tokens after the image, from the stage layer's own q / k; the score of a
visual token is TTV / sum TTV + IGA / sum IGA over the sample's visual tokens.
"""
import torch

EPS = 1e-8                               # the reference's guard of the sum normalisations


def transition_variation(x, y, valid):
    """Token transition variation of one sublayer.

    x [B, L, D] the sublayer's (normed) input, y [B, L, D] its output before the residual add, valid [B, L] bool
    the sample's tokens (padding excluded from the softmax, as the reference's unpadded batch of one has none).
    Returns [B, L] float32, 0 at invalid columns (nan in an all-padding row). Reductions accumulate in float32
    without copying x or y; 14 ops (15 with the running sum's add).
    """
    x_norm = torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32)
    y_norm = torch.linalg.vector_norm(y, dim=-1, dtype=torch.float32)
    dot = (x * y).sum(-1, dtype=torch.float32)
    # cos(x, y) as torch.nn.functional.cosine_similarity computes it: x.y / max(|x| |y|, eps); the softmax of
    # 1 - cos is that of -cos. The norm ratio is guarded at padding, whose embedding may be 0 (0 / 0)
    cos = dot / (x_norm * y_norm).clamp_min(EPS)
    direction = torch.where(valid, -cos, float("-inf")).softmax(-1)
    return y_norm / x_norm.clamp_min(EPS) * direction


def sum_normalised(scores, visual):
    """scores [B, L] restricted to the visual columns [B, L] bool and divided by their sum per sample (+ 1e-8, as
    the reference): 0 elsewhere."""
    scores = scores.masked_fill(~visual, 0.0)
    return scores / (scores.sum(1, keepdim=True) + EPS)


def transition_scores(ttv, iga, visual, score="both"):
    """The ranking score of TransPrune [B, L]: sum-normalised TTV plus sum-normalised IGA over each sample's visual
    columns (`score`: "both"; "ttv" or "iga": that term alone). ttv None: no accumulating layer ran yet (0)."""
    total = torch.zeros(visual.shape, dtype=torch.float32, device=visual.device)
    if score != "iga" and ttv is not None:
        total = total + sum_normalised(ttv, visual)
    if score != "ttv":
        total = total + sum_normalised(iga, visual)
    return total
