"""Multi-object scenes: a seeded procedural VQA test bed where the choice of visual tokens matters.

Each image holds 2-5 shapes (circle, square, triangle) in one of 6 colours and two sizes, at random non-overlapping
positions on a plain or lightly textured background. A small object spans about 2 x 2 of the 16 x 16 patches of a
64-pixel image, a large one about 4 x 4, so most patches show background and a question about a small object is
answerable only from a few tokens. Questions (closed one-word answers, see `answers()`):

    attribute  "what color is the small triangle ?"      "what shape is the red object ?"   "what size is the blue circle ?"
    existence  "is there a green square ?"               (half yes, half no)
    count      "how many red shapes are there ?"         "how many circles are there ?"     (answers 0-5)
    relation   "what shape is left of the blue circle ?" "what color is the shape above the small square ?"

Every referenced object is named by its shortest unique description (shape; size + shape; colour + shape; size +
colour + shape), and a relation question is asked only when exactly one object lies on that side of the referenced
one and no other object is within `RELATION_MARGIN` pixels of the boundary, so every answer is unambiguous. Answers
are computed from the scene description, never from pixels.

Splits come from fixed seeds and are disjoint by seed: image k of a split is the same whatever number of images
is asked for. "train" and "val" are for training and every choice (steps, thresholds); "test" only for reporting.

    scenes, questions = vlmeff.data.scenes.load_split("test", n_images=200)
    scenes[q.image_id].render()  ->  PIL image (64 x 64 RGB)
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (215, 38, 38), "green": (40, 160, 60), "blue": (40, 80, 225), "yellow": (235, 200, 30),
          "purple": (140, 60, 190), "black": (25, 25, 25)}
SIZES = {"small": 9, "large": 17}  # bounding-box side in pixels at IMAGE_SIZE
IMAGE_SIZE = 64
RELATIONS = ("left of", "right of", "above", "below")
RELATION_MARGIN = 3  # pixels: centres closer than this along the relation's axis count as neither side
KINDS = ("attribute", "existence", "count", "relation")
NUMBERS = ("0", "1", "2", "3", "4", "5")
SPLIT_SEEDS = {"train": 1, "val": 2, "test": 3}
SPLIT_SIZES = {"train": 8000, "val": 500, "test": 1000}  # default number of images
_SUPERSAMPLE = 4  # shapes are drawn at 4x and downsampled, so small shapes keep their outline


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    x: float  # centre, pixels from the left at IMAGE_SIZE
    y: float  # centre, pixels from the top

    def description(self, words: tuple[str, ...]) -> str:
        """e.g. words=("size", "shape") -> "small triangle"."""
        return " ".join(getattr(self, w) for w in words)


def draw_object(draw: ImageDraw.ImageDraw, o: SceneObject, scale: float, fill) -> None:
    """Draws o's shape, its layout scaled by `scale` (pixels per IMAGE_SIZE pixel), filled with `fill`."""
    h, cx, cy = SIZES[o.size] * scale / 2, o.x * scale, o.y * scale
    box = (cx - h, cy - h, cx + h, cy + h)
    if o.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif o.shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)], fill=fill)


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    background: tuple[int, int, int]
    texture_seed: int | None  # None: plain background

    def render(self, image_size: int = IMAGE_SIZE) -> Image.Image:
        """The scene as an RGB image, image_size x image_size (the layout scales with it)."""
        s = image_size * _SUPERSAMPLE / IMAGE_SIZE
        big = Image.new("RGB", (image_size * _SUPERSAMPLE,) * 2, self.background)
        draw = ImageDraw.Draw(big)
        for o in self.objects:
            draw_object(draw, o, s, COLORS[o.color])
        image = big.resize((image_size, image_size), Image.BOX)
        if self.texture_seed is None:
            return image
        noise = np.random.default_rng(self.texture_seed).normal(0, 6, (image_size, image_size, 1))
        return Image.fromarray(np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8))

    def patch_labels(self, patch: int = 4, image_size: int = IMAGE_SIZE) -> np.ndarray:
        """(G,G) int64, G = image_size // patch: `object_class` of the object covering the most pixels of each patch
        if it covers at least a quarter of it, else 0 (background). Rasterised from the description, no anti-aliasing."""
        index = Image.new("L", (image_size, image_size), 0)
        draw = ImageDraw.Draw(index)
        for k, o in enumerate(self.objects, 1):
            draw_object(draw, o, image_size / IMAGE_SIZE, k)
        g = image_size // patch
        blocks = np.asarray(index, dtype=np.int64)[: g * patch, : g * patch].reshape(g, patch, g, patch).transpose(0, 2, 1, 3)
        counts = np.stack([(blocks == k).sum((2, 3)) for k in range(len(self.objects) + 1)])  # (K+1,G,G)
        counts[0] = 0  # background never wins: an object needs only a quarter of the patch
        winner = counts.argmax(0)
        classes = np.array([0] + [object_class(o) for o in self.objects])
        return np.where(counts.max(0) * 4 >= patch * patch, classes[winner], 0)

    def presence(self) -> np.ndarray:
        """(len(SHAPES) * len(COLORS),) bool: which colour + shape pairs occur (index = shape * len(COLORS) + colour)."""
        out = np.zeros(len(SHAPES) * len(COLORS), dtype=bool)
        for o in self.objects:
            out[SHAPES.index(o.shape) * len(COLORS) + list(COLORS).index(o.color)] = True
        return out


N_OBJECT_CLASSES = 1 + len(SHAPES) * len(COLORS) * len(SIZES)  # background + shape x colour x size


def object_class(o: SceneObject) -> int:
    """1 + index of (shape, colour, size); 0 is the background."""
    return 1 + (SHAPES.index(o.shape) * len(COLORS) + list(COLORS).index(o.color)) * len(SIZES) + list(SIZES).index(o.size)


@dataclass(frozen=True)
class SceneQuestion:
    image_id: int
    question: str
    answer: str
    kind: str  # one of KINDS


def answers() -> list[str]:
    """The closed answer vocabulary."""
    return [*SHAPES, *COLORS, *SIZES, "yes", "no", *NUMBERS]


def plural(shape: str) -> str:
    return shape + "s"


def generate_scene(rng: random.Random) -> Scene:
    """2-5 objects of random shape / colour / size, at non-overlapping positions (rejection sampling)."""
    objects: list[SceneObject] = []
    for _ in range(rng.randint(2, 5)):
        size = rng.choice(tuple(SIZES))
        half = SIZES[size] / 2
        for _attempt in range(100):
            x, y = rng.uniform(half + 1, IMAGE_SIZE - half - 1), rng.uniform(half + 1, IMAGE_SIZE - half - 1)
            if all(abs(x - o.x) > half + SIZES[o.size] / 2 + 2 or abs(y - o.y) > half + SIZES[o.size] / 2 + 2
                   for o in objects):
                objects.append(SceneObject(rng.choice(SHAPES), rng.choice(tuple(COLORS)), size, round(x, 1), round(y, 1)))
                break
    grey = rng.randint(185, 235)
    background = (grey + rng.randint(-12, 12), grey + rng.randint(-12, 12), grey + rng.randint(-12, 12))
    return Scene(tuple(objects), background, rng.randrange(2**31) if rng.random() < 0.5 else None)


def matches(obj: SceneObject, **attrs: str) -> bool:
    return all(getattr(obj, k) == v for k, v in attrs.items())


def unique_reference(scene: Scene, obj: SceneObject, avoid: str | None = None) -> str | None:
    """Shortest description that picks out obj alone ("triangle", "small triangle", "red triangle", ...), or None.

    avoid: an attribute the description must not use (the one the question asks for). The description always names
    the shape, except when the shape is what is asked: then it ends with "object" ("red object").
    """
    for extra in ((), ("size",), ("color",), ("size", "color")):
        words = extra + (() if avoid == "shape" else ("shape",))
        if avoid in extra or not words:
            continue
        if sum(all(getattr(o, w) == getattr(obj, w) for w in words) for o in scene.objects) == 1:
            return obj.description(words) + (" object" if avoid == "shape" else "")
    return None


def on_side(a: SceneObject, b: SceneObject, relation: str) -> float:
    """Signed distance (pixels) by which a lies on `relation`'s side of b: > 0 means "a is <relation> b"."""
    return {"left of": b.x - a.x, "right of": a.x - b.x, "above": b.y - a.y, "below": a.y - b.y}[relation]


def related_object(scene: Scene, ref: SceneObject, relation: str) -> SceneObject | None:
    """The only object on `relation`'s side of ref, if exactly one is and none is within the margin; else None."""
    others = [o for o in scene.objects if o is not ref]
    if any(abs(on_side(o, ref, relation)) < RELATION_MARGIN for o in others):
        return None
    side = [o for o in others if on_side(o, ref, relation) > 0]
    return side[0] if len(side) == 1 else None


def attribute_questions(scene: Scene) -> list[tuple[str, str]]:
    out = []
    for o in scene.objects:
        for asked, template in (("color", "what color is the {} ?"), ("shape", "what shape is the {} ?"),
                                ("size", "what size is the {} ?")):
            ref = unique_reference(scene, o, avoid=asked)
            if ref is not None:
                out.append((template.format(ref), getattr(o, asked)))
    return out


def existence_questions(scene: Scene, rng: random.Random) -> list[tuple[str, str]]:
    """One present and one absent colour + shape pair (the absent one shares its colour or shape with a present object
    when it can, so that a glance at the colours alone does not answer it)."""
    present = {(o.color, o.shape) for o in scene.objects}
    obj = rng.choice(scene.objects)
    near = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present and (c == obj.color or s == obj.shape)]
    absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
    c, s = rng.choice(near or absent)
    return [(f"is there a {obj.color} {obj.shape} ?", "yes"), (f"is there a {c} {s} ?", "no")]


def count_questions(scene: Scene, rng: random.Random) -> list[tuple[str, str]]:
    """Counts by colour, by shape, and of all shapes; the attribute usually (4 in 5) occurs in the scene."""
    def pick(values, attr):
        seen = sorted({getattr(o, attr) for o in scene.objects})
        return rng.choice(seen) if rng.random() < 0.8 else rng.choice(tuple(values))

    color, shape = pick(COLORS, "color"), pick(SHAPES, "shape")
    return [
        (f"how many {color} shapes are there ?", str(sum(matches(o, color=color) for o in scene.objects))),
        (f"how many {plural(shape)} are there ?", str(sum(matches(o, shape=shape) for o in scene.objects))),
        ("how many shapes are there ?", str(len(scene.objects))),
    ]


def relation_questions(scene: Scene) -> list[tuple[str, str]]:
    out = []
    for ref in scene.objects:
        name = unique_reference(scene, ref)
        if name is None:
            continue
        for relation in RELATIONS:
            other = related_object(scene, ref, relation)
            if other is not None:
                out.append((f"what shape is {relation} the {name} ?", other.shape))
                out.append((f"what color is the shape {relation} the {name} ?", other.color))
    return out


def scene_questions(scene: Scene, rng: random.Random, per_kind: int = 2) -> list[tuple[str, str, str]]:
    """Up to per_kind questions of each kind about the scene -> [(question, answer, kind)]."""
    pools = {
        "attribute": attribute_questions(scene),
        "existence": existence_questions(scene, rng),
        "count": count_questions(scene, rng),
        "relation": relation_questions(scene),
    }
    out = []
    for kind in KINDS:
        pool = pools[kind]
        out += [(q, a, kind) for q, a in rng.sample(pool, min(per_kind, len(pool)))]
    return out


def load_split(split: str, n_images: int | None = None, per_kind: int = 2) -> tuple[list[Scene], list[SceneQuestion]]:
    """(scenes, questions) of a split; questions[i].image_id indexes scenes. Deterministic per (split, image index)."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown scenes split {split!r}; valid: {', '.join(map(repr, SPLIT_SEEDS))}")
    n = SPLIT_SIZES[split] if n_images is None else n_images
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n_images must be a non-negative int, got {n_images!r}")
    scenes, questions = [], []
    for k in range(n):
        rng = random.Random(f"vlmeff-scenes/{SPLIT_SEEDS[split]}/{k}")
        scene = generate_scene(rng)
        scenes.append(scene)
        questions += [SceneQuestion(k, q, a, kind) for q, a, kind in scene_questions(scene, rng, per_kind)]
    return scenes, questions


def question_words() -> list[str]:
    """Every word the templates and answers can produce (for a closed word-level tokenizer)."""
    words = {"what", "color", "shape", "size", "is", "the", "object", "there", "a", "how", "many", "shapes", "are",
             "?", "left", "right", "of", "above", "below"}
    words |= set(SHAPES) | {plural(s) for s in SHAPES} | set(COLORS) | set(SIZES) | set(answers())
    return sorted(words)
