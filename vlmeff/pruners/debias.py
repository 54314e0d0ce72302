"""Attention Debiasing (arXiv 2508.17807, intcomp/attention-bias): remove the positional (recency) trend from a
host method's text-to-image attention scores before ranking.

The reference multiplies the head-mean score of visual token i (its raster index among the image's tokens) by a
fixed weight w_i = f(0) / f(i), f the trend of mean attention over position, at the first pruning stage only; as
shipped, 1 / w is a cubic in i for FastV and exp(b i) for PyramidDrop (`../notes`: methods.md section 2). Here
f is fitted by `vlmeff.calibrate(model, data, method="debiased")` and saved; the published FastV polynomial of
LLaVA-1.5-7B is the preset "llava-1.5".
"""
import numpy as np
import torch

TRENDS = ("cubic", "exponential")
DEFAULT_TREND = {"fastv": "cubic", "pdrop": "exponential"}     # the forms the reference ships per host method
# 1 / w = 1 + 3.015e-3 i - 1.46e-5 i^2 + 2.569e-8 i^3 over LLaVA-1.5's 576 visual tokens (the reference's FastV file)
PRESETS = {"llava-1.5": dict(base="fastv", trend="cubic", coefficients=[1.0, 3.015e-3, -1.46e-5, 2.569e-8],
                             positions=576)}


def trend(kind, coefficients, i):
    """f(i) / f(0), the trend at positions i (tensor or array): "cubic": sum_j c_j i^j with c_0 = 1;
    "exponential": exp(c_1 i)."""
    if kind == "exponential":
        return (coefficients[1] * i).exp() if torch.is_tensor(i) else np.exp(coefficients[1] * i)
    return sum(c * i ** j for j, c in enumerate(coefficients))


def fit_trend(mean_attention, kind):
    """Coefficients of f(i) / f(0) fitted to mean attention [n] over positions 0..n-1 (least squares: a cubic, or a
    line through log attention), normalised so that f(0) = 1 (w_0 = 1, as in the reference's files)."""
    a = np.asarray(mean_attention, dtype=np.float64)
    i = np.arange(a.shape[0], dtype=np.float64)
    if kind == "exponential":
        slope, intercept = np.polyfit(i, np.log(np.maximum(a, 1e-30)), 1)
        return [1.0, float(slope)]
    c = np.polyfit(i, a, 3)[::-1]           # c_0 + c_1 i + c_2 i^2 + c_3 i^3
    if c[0] <= 0 or trend("cubic", c / c[0], i).min() <= 0:
        raise ValueError("the fitted cubic attention trend is not positive over the visual positions (its weights "
                         "would divide by zero or flip signs); calibrate on more data or with trend='exponential'")
    return [float(v / c[0]) for v in c]


def debiased(scores, ordinals, kind, coefficients, positions):
    """scores [B, L] divided by the trend at each column's visual ordinal [B, L] (>= 0 on visual columns), i.e.
    times w_i = f(0) / f(i). Ordinals past the fitted range (`positions`) take the last fitted position's weight,
    so that a cubic never extrapolates to 0 or below."""
    i = ordinals.clamp(0, positions - 1).to(scores.dtype)
    return scores / trend(kind, coefficients, i)


def recency_reweighter(options):
    """The `reweight(scores, ordinals, stage_index)` of `debiased` with resolved options: the schedule's trend at
    the first stage, as the reference applies it; later stages rank raw scores."""
    schedule = options["schedule"]
    kind, coefficients, positions = schedule["trend"], schedule["coefficients"], schedule["positions"]

    def reweight(scores, ordinals, stage_index):
        return debiased(scores, ordinals, kind, coefficients, positions) if stage_index == 0 else scores
    return reweight


# the reference's padding thresholds: a visual token whose patch is more than this share padding scores 0
PAD_THRESHOLD = {"fastv": 0.5, "pdrop": 0.01}


def pad_fill(mean, std):
    """-> ([C] the normalised value of a square-padding pixel, [C] half an 8-bit level in those units, the tolerance
    of `padding_shares`). LLaVA-1.5 pads with the processor's mean colour in 8-bit levels, int(mean * 255)
    (transformers' `LlavaImageProcessor(do_pad=True)`, LLaVA's `expand2square`); mean and std per channel."""
    mean, std = (torch.as_tensor(v, dtype=torch.float64) for v in (mean, std))
    return ((torch.floor(mean * 255) / 255 - mean) / std).float(), (0.5 / 255 / std).float()


def padding_shares(pixel_values, patch, fill, tolerance):
    """Share of each patch that is square padding: pixel_values [n, C, H, W] (normalised), fill and tolerance [C]
    (`pad_fill`) -> [n, (H/p) * (W/p)] float32 in [0, 1], patches in raster order.

    Padding pixels are those of the fill colour (every channel within `tolerance` of `fill`) in a row or column that
    is entirely of that colour: square padding adds whole rows (a wide image) or columns (a tall one), so content
    pixels of the same colour elsewhere are not counted. The geometric rule of the reference (1 - the patch's overlap
    with the content rectangle, from the original image size) gives the same shares wherever the padding ends on a
    pixel boundary; resizing blurs the last pixel row or column before the content."""
    n, C, H, W = pixel_values.shape
    is_fill = ((pixel_values.float() - fill.view(1, C, 1, 1)).abs() <= tolerance.view(1, C, 1, 1)).all(1)
    padded = is_fill.all(2, keepdim=True) | is_fill.all(1, keepdim=True)          # [n, H, W]: a full row or column
    shares = torch.nn.functional.avg_pool2d(padded[:, None].float(), patch)      # [n, 1, H/p, W/p]
    return shares.reshape(n, -1)
