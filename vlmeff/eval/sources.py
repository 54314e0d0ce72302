"""Where a task's examples come from: HF `datasets` for the benchmarks, `vlmeff.data` for the embedded ones.

`data` (default: the task's hub name) is one of
- a folder written by `save_to_disk` (a DatasetDict: its `split` is taken; a Dataset: taken as the split),
- a folder holding such a folder per config, named like the hub's configs (a local mirror of a hub dataset,
  e.g. GQA's testdev_balanced_instructions/ and testdev_balanced_images/),
- anything `datasets.load_dataset(data, config, split=split)` opens: a hub name, a clone of a hub repository.
Examples are built on access, so images are decoded only when a batch needs them.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

from .tasks import Example

EMBEDDED_SPLITS = ("train", "val", "test")


class Examples(Sequence):
    """The examples of one split: `examples[i]` builds example i (an `Example`), `len(examples)` counts them."""

    def __init__(self, count, build):
        self._count, self._build = count, build

    def __len__(self):
        return self._count

    def __getitem__(self, i):
        if not 0 <= i < self._count:
            raise IndexError(f"example {i} of {self._count}")
        return self._build(i)


def load_examples(task, data=None, split=None):
    """The `Examples` of `task` (a `Task`) in `split` (default: the task's). ValueError for a split the source
    does not have, naming it and the accepted ones."""
    split = split or task.split
    if task.embedded:
        return embedded_examples(task.name, split)
    source = str(data or task.hub)
    rows = open_split(source, task.config, split)
    if task.images is not None and "image" not in rows.column_names:
        return joined_examples(task, rows, open_split(source, task.images[0], split))
    return Examples(len(rows), lambda i: task.example(rows[i]))


def joined_examples(task, rows, images):
    """Examples of rows that name their image (row[key]) in another table of `id`, `image` rows (GQA)."""
    key = task.images[1]
    position = {image_id: k for k, image_id in enumerate(images["id"])}  # the id column alone: no image decoded

    def build(i):
        row = rows[i]
        return task.example({**row, "image": images[position[row[key]]]["image"]})
    return Examples(len(rows), build)


def embedded_examples(name, split):
    """easy-VQA or the scenes test bed, one example per question, from `vlmeff.zoo.vqa_split` (which defines the
    splits, "val" being held out from the embedded models' training, and the question kinds)."""
    if split not in EMBEDDED_SPLITS:
        raise ValueError(f"unknown split {split!r} of task {name}; accepted: {', '.join(EMBEDDED_SPLITS)}")
    return embedded_split(name, split)


@functools.cache
def embedded_split(name, split):
    """Built once per process: a sweep evaluates the same split once per run, and the scenes are rendered
    (about a second for a split of 1,000 images)."""
    from vlmeff import zoo

    images, records = zoo.vqa_split(name, split)
    examples = [Example([images[image_id]], question, answer, kind) for image_id, question, answer, kind in records]
    return Examples(len(examples), examples.__getitem__)


def open_split(source, config, split):
    """One split (a `datasets.Dataset`) of a saved folder, a local mirror of a hub dataset's configs, or
    whatever `load_dataset` opens."""
    path = Path(source)
    for folder in (path, path / config if config else None):
        if folder is not None and is_saved_dataset(folder):
            return saved_split(folder, split)
    return loaded_split(source, config, split)


def is_saved_dataset(path):
    """A folder written by `save_to_disk`: a DatasetDict's (dataset_dict.json) or a Dataset's (state.json)."""
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def saved_split(path, split):
    import datasets

    saved = datasets.load_from_disk(str(path))
    if isinstance(saved, datasets.Dataset):    # one split saved alone
        return saved
    if split not in saved:
        raise ValueError(f"unknown split {split!r} in {path}; accepted: {', '.join(saved)}")
    return saved[split]


def loaded_split(source, config, split):
    import datasets

    try:
        return datasets.load_dataset(source, config, split=split)
    except ValueError as error:                 # datasets: 'Unknown split "x". Should be one of [...]'
        if "Unknown split" not in str(error):
            raise
        raise ValueError(f"unknown split {split!r} of {source}: {error}") from error
