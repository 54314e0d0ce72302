"""The output folder of one evaluation run, safe to interrupt at any point.

    out/config.json         what the run computes (model, task, split, method, keep, options, ...), written first
    out/predictions.jsonl   one line per example, appended and flushed batch by batch:
                            {"index", "prediction", "reference", "kind", token counts, FLOPs, KV-cache bytes}
    out/timings.jsonl       one line per batch measured: latency and peak memory
    out/results.json        written last (atomically): its presence means the run is finished

A re-run on the same folder resumes: every complete line is kept; a torn last line (the process died while
writing it) is cut off the file before anything is appended. A folder that holds a finished result, results of
another config, or files this runner did not write is refused (nothing is touched) unless `overwrite=True`,
which deletes the four files above and starts afresh; with `reuse_finished=True` a finished result of the same
config is read back instead (`finished`). `MemoryRun` is the same interface without a folder.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

FILES = ("config.json", "predictions.jsonl", "timings.jsonl", "results.json")


class RunFolder:
    """The folder `path` of a run of `config` (a JSON-able dict), created if missing; FileExistsError if it
    holds a finished result, another config's results or files without a config.json, unless overwrite.
    `finished`: the stored results when reuse_finished and the folder holds a finished run of `config`, else
    None."""

    def __init__(self, path, config, overwrite=False, reuse_finished=False):
        self.path = Path(path)
        self.config = json.loads(json.dumps(config))      # as it reads back from config.json (tuples -> lists)
        self.finished = None
        if overwrite:
            for name in FILES:
                (self.path / name).unlink(missing_ok=True)
        if reuse_finished and (self.path / "results.json").exists():
            self.finished = self._same_config_results()
            return
        self._refuse_foreign()
        self.path.mkdir(parents=True, exist_ok=True)
        if not (self.path / "config.json").exists():
            write_atomically(self.path / "config.json", self.config)

    def _same_config_results(self):
        """The finished results in the folder, or FileExistsError if they are another config's."""
        results = json.loads((self.path / "results.json").read_text())
        if results["config"] != self.config:
            raise FileExistsError(f"{self.path} holds a finished result of another config "
                                  f"({config_difference(results['config'], self.config)}); re-run it with the same "
                                  "settings, pass overwrite=True (--overwrite) to replace it, or choose another "
                                  "out folder")
        return results

    def _refuse_foreign(self):
        results, config = self.path / "results.json", self.path / "config.json"
        if results.exists():
            raise FileExistsError(f"{self.path} holds a finished result ({results}); pass overwrite=True "
                                  "(--overwrite) to compute it again, or choose another out folder")
        if config.exists():
            stored = json.loads(config.read_text())
            if stored != self.config:
                difference = config_difference(stored, self.config)
                raise FileExistsError(f"{self.path} holds results of another config ({difference}); resume it with "
                                      "the same settings, pass overwrite=True (--overwrite) to replace them, or "
                                      "choose another out folder")
        elif any((self.path / name).exists() for name in FILES):
            raise FileExistsError(f"{self.path} holds run files without a config.json; pass overwrite=True "
                                  "(--overwrite) to replace them, or choose another out folder")

    def predictions(self):
        """index -> line of every example already predicted."""
        return {line["index"]: line for line in read_jsonl(self.path / "predictions.jsonl")}

    def timings(self):
        return read_jsonl(self.path / "timings.jsonl")

    def append_predictions(self, lines):
        append_jsonl(self.path / "predictions.jsonl", lines)

    def append_timing(self, record):
        append_jsonl(self.path / "timings.jsonl", [record])

    def replace_predictions(self, lines):
        """predictions.jsonl becomes `lines` at once (a gathered union: never half of it under that name)."""
        write_jsonl_atomically(self.path / "predictions.jsonl", lines)

    def replace_timings(self, records):
        write_jsonl_atomically(self.path / "timings.jsonl", records)

    def finish(self, results):
        write_atomically(self.path / "results.json", results)


class MemoryRun:
    """`RunFolder`'s interface for a run without an out folder: nothing to resume, nothing written."""

    finished = None

    def __init__(self):
        self._predictions, self._timings = {}, []

    def predictions(self):
        return dict(self._predictions)

    def timings(self):
        return list(self._timings)

    def append_predictions(self, lines):
        self._predictions.update((line["index"], line) for line in lines)

    def append_timing(self, record):
        self._timings.append(record)

    def replace_predictions(self, lines):
        self._predictions = {line["index"]: line for line in lines}

    def replace_timings(self, records):
        self._timings = list(records)

    def finish(self, results):
        pass


def config_difference(stored, current):
    """'keep: 64 there, 32 here; ...' for the keys whose values differ."""
    keys = sorted(set(stored) | set(current))
    return "; ".join(f"{k}: {stored.get(k)!r} there, {current.get(k)!r} here" for k in keys
                     if stored.get(k) != current.get(k))


def read_jsonl(path):
    """The records of a JSON-lines file. A torn last line (bytes after the final newline, or a last line that is
    not JSON) is cut off the file, so that appending continues on a line boundary; a bad line before the last
    one is a ValueError (an interruption never tears those)."""
    if not path.exists():
        return []
    data = path.read_bytes()
    *complete, _torn = data.split(b"\n")      # every line the writer ended; what follows the last newline
    records, good_end = [], 0
    for number, line in enumerate(complete, 1):
        try:
            records.append(json.loads(line))
        except ValueError:
            if number < len(complete):
                raise ValueError(f"{path} line {number} is not JSON and not the last line: the file is "
                                 "damaged") from None
            break
        good_end += len(line) + 1
    if good_end < len(data):
        with open(path, "r+b") as f:
            f.truncate(good_end)
    return records


def append_jsonl(path, records):
    """Append one line per record, flushed and synced: an interruption loses at most the line being written."""
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())


def write_jsonl_atomically(path, records):
    """JSON lines to `path` through a temporary file and a rename, synced before the rename."""
    temporary = path.with_suffix(path.suffix + ".tmp")
    with open(temporary, "w", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def write_atomically(path, value):
    """JSON to `path` through a temporary file and a rename: never a half-written file under that name."""
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(json.dumps(value, indent=1))
    os.replace(temporary, path)
