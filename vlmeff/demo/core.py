"""The demo's plain functions, no Gradio: checking what a user sends (image, question, budget), drawing kept patches
over the image, and the side-by-side table of the unpruned and the pruned run. `vlmeff.demo.app` wires them into
the page; the tests call them directly."""
import io
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

MAX_PIXELS = 40_000_000          # the decompression-bomb guard: a larger image is refused before it is decoded
MAX_QUESTION = 500               # characters
DISPLAY = 336                    # side of the drawn overlays, pixels


class DemoInputError(ValueError):
    """A bad input from the page (image, question, budget): its message is shown to the user as it is."""


def open_image(source, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """An RGB PIL image from a path, bytes, a numpy array or a PIL image; DemoInputError with a message for
    something that is not an image, a corrupt file, or one of more than `max_pixels` pixels (checked from the
    header, before the pixels are decoded)."""
    if source is None:
        raise DemoInputError("no image: upload one or pick an example")
    if isinstance(source, np.ndarray):
        return Image.fromarray(source).convert("RGB")
    if isinstance(source, Image.Image):
        image = source
    else:
        try:
            image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else Path(source))
        except UnidentifiedImageError:
            raise DemoInputError("this file is not an image (PNG, JPEG, WebP, BMP, GIF or TIFF)") from None
        except OSError as error:
            raise DemoInputError(f"the image could not be read: {error}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise DemoInputError(f"the image is {width} x {height} pixels ({width * height / 1e6:.0f} megapixels); the "
                             f"demo accepts at most {max_pixels / 1e6:.0f} megapixels")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as error:
        raise DemoInputError(f"the image file is corrupt or truncated ({error})") from None


def check_question(question) -> str:
    """The question stripped; DemoInputError if empty or longer than MAX_QUESTION characters."""
    text = (question or "").strip()
    if not text:
        raise DemoInputError("type a question about the image")
    if len(text) > MAX_QUESTION:
        raise DemoInputError(f"the question has {len(text)} characters; at most {MAX_QUESTION} are accepted")
    return text


def check_budget(keep, n_tokens: int):
    """The budget as `vlmeff.patch` takes it: a ratio in (0, 1] (a float, or 1.0) or a token count in 1..n_tokens
    (a whole number above 1); DemoInputError naming the value and what is accepted otherwise."""
    accepted = f"a share of the visual tokens in (0, 1] or a count from 1 to {n_tokens}"
    try:
        value = float(keep)
    except (TypeError, ValueError):
        raise DemoInputError(f"budget {keep!r} is not a number; accepted: {accepted}") from None
    if not math.isfinite(value) or value <= 0:
        raise DemoInputError(f"budget {keep!r} is out of range; accepted: {accepted}")
    if value <= 1:
        return value
    if value != int(value) or value > n_tokens:
        raise DemoInputError(f"budget {keep!r} is out of range; accepted: {accepted}")
    return int(value)


def kept_mask(rows, grid: tuple[int, int]) -> np.ndarray:
    """[h, w] bool: True at the raster positions `rows` (indices into the h * w patches) of a grid."""
    h, w = grid
    mask = np.zeros(h * w, dtype=bool)
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    if rows.size and (rows.min() < 0 or rows.max() >= h * w):
        raise ValueError(f"kept rows outside the {h} x {w} grid: {rows.min()}..{rows.max()}")
    mask[rows] = True
    return mask.reshape(h, w)


def overlay(image: Image.Image, kept: np.ndarray, size: int = DISPLAY, dim: float = 0.25,
            edge=(64, 220, 96)) -> Image.Image:
    """The image as the model sees it (resized to size x size) with the pruned patches dimmed to `dim` of their
    brightness and a thin frame around each kept patch. kept: [h, w] bool over the patch grid."""
    h, w = kept.shape
    picture = cv2.resize(np.asarray(image.convert("RGB")), (size, size), interpolation=cv2.INTER_AREA)
    cells = cv2.resize(kept.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST).astype(bool)
    dimmed = cv2.addWeighted(picture, dim, np.zeros_like(picture), 0.0, 0.0)
    out = np.where(cells[..., None], picture, dimmed)
    ys, xs = np.linspace(0, size, h + 1).round().astype(int), np.linspace(0, size, w + 1).round().astype(int)
    for i, j in zip(*np.nonzero(kept)):
        cv2.rectangle(out, (int(xs[j]), int(ys[i])), (int(xs[j + 1]) - 1, int(ys[i + 1]) - 1), edge, 1)
    return Image.fromarray(out)


def group_colours(n: int) -> np.ndarray:
    """[n, 3] uint8 distinct colours (hues spaced by the golden angle, full saturation)."""
    hues = (np.arange(n) * 0.618033988749895 % 1.0 * 180).astype(np.uint8)        # OpenCV's hue range: 0..179
    hsv = np.stack([hues, np.full(n, 200, np.uint8), np.full(n, 255, np.uint8)], axis=-1)[None]
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0]


def merge_overlay(image: Image.Image, groups: np.ndarray, size: int = DISPLAY, dim: float = 0.25,
                  tint: float = 0.55) -> Image.Image:
    """The image with each patch drawn by where it went: groups [h, w] int, the output token of each patch (-1:
    dropped). Dropped patches are dimmed as in `overlay`, patches kept alone are framed, and the members of a merged
    token (two or more patches) are tinted with that token's colour, so one colour is one token."""
    h, w = groups.shape
    kept = groups >= 0
    out = np.asarray(overlay(image, kept & ~merged_patches(groups), size, dim)).copy()
    merged = merged_patches(groups)
    if merged.any():
        colours = group_colours(int(groups.max()) + 1)
        cells = cv2.resize(np.where(merged, groups, -1).astype(np.int32), (size, size),
                           interpolation=cv2.INTER_NEAREST)
        picture = cv2.resize(np.asarray(image.convert("RGB")), (size, size), interpolation=cv2.INTER_AREA)
        tinted = cv2.addWeighted(picture, 1 - tint, colours[cells.clip(0)], tint, 0.0)
        out = np.where((cells >= 0)[..., None], tinted, out)
    return Image.fromarray(out)


def merged_patches(groups: np.ndarray) -> np.ndarray:
    """[h, w] bool: the patches whose output token holds two or more patches."""
    counts = np.bincount(groups[groups >= 0].reshape(-1), minlength=int(groups.max()) + 1 if groups.size else 0)
    return (groups >= 0) & (counts[groups.clip(0)] > 1)


def stage_strip(overlays, gap: int = 8, band: int = 28) -> Image.Image:
    """The overlays [(image, caption)] of the stages side by side, each caption written in a band below its image:
    one picture (the page shows it whole, where a gallery would crop it)."""
    pictures = [np.asarray(image.convert("RGB")) for image, _ in overlays]
    height = max(p.shape[0] for p in pictures) + band
    width = sum(p.shape[1] for p in pictures) + gap * (len(pictures) - 1)
    out = np.full((height, width, 3), 255, dtype=np.uint8)
    x = 0
    for picture, (_, caption) in zip(pictures, overlays):
        h, w = picture.shape[:2]
        out[:h, x:x + w] = picture
        scale = min(0.45, 0.45 * w / max(cv2.getTextSize(caption, cv2.FONT_HERSHEY_SIMPLEX, 0.45, 1)[0][0], 1))
        cv2.putText(out, caption, (x + 2, h + band - 9), cv2.FONT_HERSHEY_SIMPLEX, scale, (20, 20, 20), 1,
                    cv2.LINE_AA)
        x += w + gap
    return Image.fromarray(out)


def grid_of(n_tokens: int) -> tuple[int, int]:
    """The square patch grid of n_tokens raster tokens; ValueError if n_tokens is no square."""
    side = math.isqrt(n_tokens)
    if side * side != n_tokens:
        raise ValueError(f"{n_tokens} tokens form no square grid")
    return side, side


@dataclass
class Run:
    """One run of the model on the request: its answer (or top predictions), visual tokens per stage, prefill FLOPs
    and wall time."""

    answer: str
    tokens: dict = field(default_factory=dict)          # stage name -> visual tokens (first sample)
    flops: int = 0
    seconds: float = 0.0


def comparison(base: Run, pruned: Run) -> list[list[str]]:
    """The side-by-side table: rows (what, unpruned, pruned)."""
    first, last = next(iter(base.tokens.values()), 0), list(pruned.tokens.values())[-1] if pruned.tokens else 0
    return [["answer", base.answer, pruned.answer],
            ["visual tokens", str(first), " -> ".join(str(v) for v in pruned.tokens.values()) or str(last)],
            ["FLOPs (prefill)", f"{base.flops / 1e9:.3f} G", f"{pruned.flops / 1e9:.3f} G"
             + (f" ({base.flops / pruned.flops:.2f}x fewer)" if pruned.flops else "")],
            ["latency", f"{base.seconds * 1e3:.0f} ms", f"{pruned.seconds * 1e3:.0f} ms"
             + (f" ({base.seconds / pruned.seconds:.2f}x)" if pruned.seconds else "")]]
