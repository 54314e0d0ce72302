"""Datasets used for evaluation and the embedded models."""
from vlmeff.data.easyvqa import CLASSES, COLORS, SHAPES, EasyVQARecord, image_labels, iter_easyvqa, load_easyvqa

__all__ = ["CLASSES", "COLORS", "SHAPES", "EasyVQARecord", "image_labels", "iter_easyvqa", "load_easyvqa"]
