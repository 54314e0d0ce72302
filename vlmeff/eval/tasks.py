"""The evaluation tasks: where each one's rows come from, and how a row becomes a prompt and a reference.

A row becomes an `Example`: its image(s) (RGB PIL, in prompt order), the text the user turn carries after them,
formatted as LLaVA-1.5's evaluation scripts format it (`docs/Evaluation.md` and `llava/eval/model_vqa_*.py` of
haotian-liu/LLaVA), the reference in the form `metrics.score` takes for the task, and a kind (a category for the
per-kind breakdown, or None). The runner wraps the text in the model's own chat template, images first.

| task | default dataset (config, split) | prompt | reference |
|---|---|---|---|
| easyvqa, scenes | embedded (`vlmeff.data`), test | the question as given | the answer word |
| vqav2 | lmms-lab/VQAv2, validation | question + SHORT_ANSWER | the 10 annotators' answers |
| textvqa | lmms-lab/textvqa, validation | question + "Reference OCR token: a, b" + SHORT_ANSWER | the 10 answers |
| gqa | lmms-lab/GQA (testdev_balanced_instructions), testdev | question + SHORT_ANSWER | the answer |
| pope | lmms-lab/POPE, test | question + SHORT_ANSWER | answer ("yes" / "no"), category |
| mme | lmms-lab/MME, test | question, its "Please answer yes or no." -> SHORT_ANSWER | answer, category, image_id |
| scienceqa_img | lmms-lab/ScienceQA (ScienceQA-IMG), test | "Context: " hint, question, options, OPTION_LETTER | answer (index), choices |
| mmbench | lmms-lab/MMBench (en), dev | hint, question, options, OPTION_LETTER | answer (letter), options, index |

Lines are joined with "\\n"; options are lettered lines ("A. first", "B. second", ...). GQA's questions hold an image id: their images come from the dataset's testdev_balanced_images config,
joined on it (`Task.images`).
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Callable

SHORT_ANSWER = "Answer the question using a single word or phrase."
OPTION_LETTER = "Answer with the option's letter from the given choices directly."
MME_SUFFIX = "Please answer yes or no."     # MME's own instruction, which LLaVA's MME file swaps for SHORT_ANSWER


@dataclass(frozen=True)
class Example:
    images: list            # RGB PIL images, in the order the prompt shows them
    prompt: str             # the user text after the image(s)
    reference: object       # what `metrics.score(task, ...)` takes for one example (JSON-serialisable)
    kind: str | None        # category, for the per-kind breakdown (None: no breakdown)


@dataclass(frozen=True)
class Task:
    """One benchmark. `hub`/`config`/`split`: the default dataset (None for the embedded ones, read through
    `vlmeff.data`); `example`: a dataset row (a dict, images decoded to PIL) -> Example; `max_new_tokens`: the
    generation length LLaVA's scripts use (the embedded models answer in one word); `images`: (config, key) when
    the rows hold only an image id (row[key]) and the images are another config's rows (`id`, `image`)."""
    name: str
    hub: str | None
    config: str | None
    split: str
    example: Callable[[dict], Example] | None
    max_new_tokens: int
    images: tuple[str, str] | None = None

    @property
    def embedded(self):
        """Read through `vlmeff.data` (easy-VQA, scenes), not from a dataset."""
        return self.example is None


def rgb(image):
    return image.convert("RGB")


def short_answer(question):
    return f"{question}\n{SHORT_ANSWER}"


def lettered(options):
    """["cat", "dog"] -> "A. cat\\nB. dog"."""
    return "\n".join(f"{chr(ord('A') + k)}. {option}" for k, option in enumerate(options))


def vqav2_example(row):
    """lmms-lab/VQAv2: question, image, answers (10 dicts with "answer"), answer_type (kind)."""
    return Example([rgb(row["image"])], short_answer(row["question"]), [a["answer"] for a in row["answers"]],
                   row.get("answer_type"))


def textvqa_example(row):
    """lmms-lab/textvqa: question, image, answers (10 strings), ocr_tokens. LLaVA's TextVQA file puts the OCR
    tokens in the prompt (lmms-eval's default leaves them out, which scores much lower)."""
    question = row["question"]
    if row.get("ocr_tokens"):
        question = f"{question}\nReference OCR token: {', '.join(row['ocr_tokens'])}"
    return Example([rgb(row["image"])], short_answer(question), list(row["answers"]), None)


def gqa_example(row):
    """lmms-lab/GQA testdev_balanced_instructions: question, answer, types.structural (kind), image (joined)."""
    return Example([rgb(row["image"])], short_answer(row["question"]), row["answer"],
                   (row.get("types") or {}).get("structural"))


def pope_example(row):
    """lmms-lab/POPE: question, image, answer ("yes" / "no"), category (adversarial / popular / random)."""
    reference = {"answer": row["answer"].strip().lower(), "category": row["category"]}
    return Example([rgb(row["image"])], short_answer(row["question"]), reference, row["category"])


def mme_example(row):
    """lmms-lab/MME: question_id (the image's file, shared by its two questions), image, question, answer
    ("Yes" / "No"), category (the subtask)."""
    question = row["question"].replace(MME_SUFFIX, "").strip()
    reference = {"answer": row["answer"], "category": row["category"], "image_id": row["question_id"]}
    return Example([rgb(row["image"])], short_answer(question), reference, row["category"])


def scienceqa_example(row):
    """lmms-lab/ScienceQA ScienceQA-IMG: hint (the context, often empty), question, choices, answer (index),
    subject (kind). An empty context is left out, as lmms-eval's LLaVA format does."""
    context = f"Context: {row['hint']}\n" if row.get("hint") else ""
    prompt = f"{context}{row['question']}\n{lettered(row['choices'])}\n{OPTION_LETTER}"
    return Example([rgb(row["image"])], prompt, {"answer": row["answer"], "choices": list(row["choices"])},
                   row.get("subject"))


def absent(value):
    """MMBench's empty cells: None, NaN, or the strings "nan" / "none" (as LLaVA's `is_none` reads them)."""
    if value is None:
        return True
    if isinstance(value, float):
        return math.isnan(value)
    return isinstance(value, str) and value.strip().lower() in ("nan", "none")


def mmbench_example(row):
    """lmms-lab/MMBench en: hint, question, A-D (absent ones skipped), answer (letter), category (kind).
    One round: the options as given (LLaVA's circular evaluation, which rotates them, is not run)."""
    options = [row[letter] for letter in "ABCD" if letter in row and not absent(row[letter])]
    question = row["question"] if absent(row.get("hint")) else f"{row['hint']}\n{row['question']}"
    reference = {"answer": row["answer"], "options": dict(zip("ABCD", options)), "index": row["index"]}
    return Example([rgb(row["image"])], f"{question}\n{lettered(options)}\n{OPTION_LETTER}", reference,
                   row.get("category"))


TASKS = {t.name: t for t in (
    Task("easyvqa", None, None, "test", None, max_new_tokens=3),
    Task("scenes", None, None, "test", None, max_new_tokens=3),
    Task("vqav2", "lmms-lab/VQAv2", None, "validation", vqav2_example, max_new_tokens=128),
    Task("textvqa", "lmms-lab/textvqa", None, "validation", textvqa_example, max_new_tokens=128),
    Task("gqa", "lmms-lab/GQA", "testdev_balanced_instructions", "testdev", gqa_example, max_new_tokens=128,
         images=("testdev_balanced_images", "imageId")),
    Task("pope", "lmms-lab/POPE", None, "test", pope_example, max_new_tokens=128),
    Task("mme", "lmms-lab/MME", None, "test", mme_example, max_new_tokens=128),
    Task("scienceqa_img", "lmms-lab/ScienceQA", "ScienceQA-IMG", "test", scienceqa_example, max_new_tokens=128),
    Task("mmbench", "lmms-lab/MMBench", "en", "dev", mmbench_example, max_new_tokens=128),
)}


def get_task(name):
    """The `Task` called `name`; ValueError naming it, the accepted names and the closest one otherwise."""
    if name not in TASKS:
        close = difflib.get_close_matches(str(name), TASKS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown task {name!r}; accepted: {', '.join(TASKS)}{hint}")
    return TASKS[name]
