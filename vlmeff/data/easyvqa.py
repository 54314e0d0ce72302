"""easy-VQA access, only through the `easy-vqa` package (the data is never copied into this repo).

easy-VQA: 64x64 RGB images of one shape (circle, rectangle, triangle) in one of 8 colours, 4,000 train / 1,000 test
images, 38,575 / 9,673 questions with 13 one-word answers. The package ships no image labels, so shape and colour are
recovered from the questions: "what shape ...", "what is the blue shape?", "what color is the triangle?" and the yes/no
questions ("is there not a red shape?" -> no -> the shape is red) each constrain the candidates.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator

from PIL import Image

SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
CLASSES = tuple(f"{c} {s}" for s in SHAPES for c in COLORS)  # class = shape * 8 + colour: 24 classes


@dataclass(frozen=True)
class EasyVQARecord:
    image: Image.Image  # RGB, 64x64; one object shared by all questions about the same image
    question: str
    answer: str
    image_id: int
    shape: str | None  # None where the questions do not determine it
    color: str | None


def _easy_vqa():
    try:
        import easy_vqa
    except ImportError as e:
        raise ImportError("easy-VQA data needs the `easy-vqa` package: pip install vlmeff[eval]") from e
    return easy_vqa


def _check_split(split: str) -> str:
    if split not in ("train", "test"):
        raise ValueError(f"unknown easy-VQA split {split!r}; valid: 'train', 'test'")
    return split


def words(text: str) -> list[str]:
    """Lowercased words with punctuation split off: 'What shape?' -> ['what', 'shape', '?']."""
    return re.findall(r"\w+|[^\w\s]", text.lower())


def questions(split: str) -> tuple[list[str], list[str], list[int]]:
    """(questions, answers, image_ids) of a split, in the package's order."""
    ev = _easy_vqa()
    return (ev.get_train_questions if _check_split(split) == "train" else ev.get_test_questions)()


def answers() -> list[str]:
    """The 13 answer words."""
    return list(_easy_vqa().get_answers())


def image_paths(split: str) -> dict[int, str]:
    ev = _easy_vqa()
    return (ev.get_train_image_paths if _check_split(split) == "train" else ev.get_test_image_paths)()


def load_image(path: str) -> Image.Image:
    """RGB image; a corrupt or unreadable file raises ValueError naming it."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError, SyntaxError) as e:
        raise ValueError(f"cannot read easy-VQA image {path}: {e}") from e


def load_images(split: str) -> dict[int, Image.Image]:
    """image_id -> RGB image, for every image of the split."""
    return {i: load_image(p) for i, p in sorted(image_paths(split).items())}


def label_candidates(split: str) -> dict[int, tuple[frozenset[str], frozenset[str]]]:
    """image_id -> (possible shapes, possible colours) after applying every question's constraint.

    Sets of size 1 are recovered labels; larger sets are partial labels (e.g. only "not red" is known).
    """
    cand = {i: [set(SHAPES), set(COLORS)] for i in image_paths(split)}
    for q, a, i in zip(*questions(split)):
        w = words(q)
        shape = next((x for x in w if x in SHAPES), None)
        color = next((x for x in w if x in COLORS), None)
        sh, co = cand[i]
        if a in ("yes", "no"):
            # "is there not a red shape?" / "is no circle present?" are negated: "no" then asserts the attribute
            holds = (a == "yes") != ("not" in w or "no" in w)
            for name, s in ((shape, sh), (color, co)):
                if name is not None:
                    s.intersection_update({name}) if holds else s.discard(name)
        else:  # "what ..." questions: the answer is one attribute, a word in the question may give the other
            for name, s in ((shape, sh), (color, co), (a if a in SHAPES else None, sh), (a if a in COLORS else None, co)):
                if name is not None:
                    s.intersection_update({name})
    return {i: (frozenset(sh), frozenset(co)) for i, (sh, co) in cand.items()}


def image_labels(split: str) -> dict[int, tuple[str | None, str | None]]:
    """image_id -> (shape, colour), each None where the questions do not determine it."""
    one = lambda s: next(iter(s)) if len(s) == 1 else None  # noqa: E731
    return {i: (one(sh), one(co)) for i, (sh, co) in label_candidates(split).items()}


def iter_easyvqa(split: str) -> Iterator[EasyVQARecord]:
    """Yields one record per question, in the package's order (images loaded once each)."""
    images, labels = load_images(split), image_labels(split)
    for q, a, i in zip(*questions(split)):
        yield EasyVQARecord(images[i], q, a, i, *labels[i])


def load_easyvqa(split: str) -> list[EasyVQARecord]:
    """All records of "train" (38,575) or "test" (9,673)."""
    return list(iter_easyvqa(split))


def validation_ids(n: int = 400, seed: int = 0) -> set[int]:
    """Train image ids held out for validation (the embedded models never train on them; model choices use them)."""
    import random

    return set(random.Random(seed).sample(sorted(image_paths("train")), n))
