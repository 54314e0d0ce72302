"""STAND-IN, replaced at merge by the real `vlmeff/eval/metrics.py` (written in parallel: VQA soft accuracy, GQA
exact match, POPE, MME, option matching). It only keeps the runner working in this branch: exact match after
strip + lower, whatever the task; a list reference (VQAv2 / TextVQA answers) counts as a hit when the prediction
equals any of its answers, a dict reference (MME) is compared with its "answer"."""


def score(task, predictions, references):
    """Share of predictions equal (strip, lower) to their reference -> {"accuracy": float, "n": int}."""
    hits = sum(_normal(p) in _accepted(r) for p, r in zip(predictions, references, strict=True))
    return {"accuracy": hits / max(len(predictions), 1), "n": len(predictions)}


def _normal(text):
    return str(text).strip().lower()


def _accepted(reference):
    if isinstance(reference, dict):
        reference = reference["answer"]
    return {_normal(r) for r in reference} if isinstance(reference, list) else {_normal(reference)}
