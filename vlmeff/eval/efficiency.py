"""What a run costs, measured per example (token counts, FLOPs, KV cache) and per batch (latency, memory).

Per example (deterministic, so a resumed run sums to the same totals):
- visual tokens: the image placeholders the LLM reads. Unpatched: the processor's placeholders in the prompt;
  patched: `Patch.stats["visual_tokens"]["before LLM"]` (per image, summed over the example's images); methods
  inside the LLM (`Patch.stats["llm_stages"]`): the mean over the decoder layers of the visual tokens each sees
  (the "average token budget" of PyramidDrop's and FastV's comparisons).
- prompt tokens: the attended prompt length the LLM prefills (unpatched: the attention mask's sum; patched:
  minus the visual tokens the patch removed).
- prefill FLOPs and KV-cache bytes of the prompt: `vlmeff.flops` (`llm_prefill_flops`, `kv_cache_bytes`; with
  stages inside the LLM `staged_prefill_flops`, `staged_kv_cache_bytes`, each layer at its own length) of
  those lengths, the functions behind `Patch.stats["prefill_flops"]` / `["kv_cache_bytes"]` and their
  `_unpatched` values, which are their sums over a batch (tests check the sums, and the FLOPs against
  `torch.utils.flop_counter`). LLM decoder layers only: 2 x MACs of the
  projections, attention and MLP, causal attention counted in full; norms, softmax, RoPE, the vision tower,
  the projector and the LM head are not counted. KV cache in the LLM's dtype, the prompt's only (not the
  generated tokens').
Per batch (measured on the device the model runs on):
- prefill latency: from the call of `generate` to its first new token (vision tower, token reduction and LLM
  prefill: the time to first token); decode latency per token: the mean interval between later tokens. CUDA
  events on a GPU, `time.perf_counter` on the CPU, after one untimed warm-up batch (see the runner).
  `generate` hands each new token to a streamer; `BatchTimer` is one, so the loop is timed without a change
  to it.
- generate time per example: each batch's whole `generate` call (to its last token: prefill + decode) over the
  examples it answered, summed over the batches (what a user waits per question; the processor's preparation of
  the inputs is not in it).
- peak memory: `torch.cuda.max_memory_allocated`, reset before each batch, on a GPU; on the CPU the process's
  peak resident set size (`resource.getrusage(...).ru_maxrss`): the whole process (Python, data, model), and a
  high-water mark that is never reset, so it is the peak so far, not the batch's own.
"""
from __future__ import annotations

import resource
import sys
import time

import torch
from transformers.generation.streamers import BaseStreamer

from ..flops import (kv_cache_bytes, layer_segments, llm_prefill_flops, stage_drops, staged_kv_cache_bytes,
                     staged_prefill_flops)

COUNTS = ("visual_tokens", "visual_tokens_unpatched", "prompt_tokens", "prompt_tokens_unpatched",
          "prefill_flops", "prefill_flops_unpatched", "kv_cache_bytes", "kv_cache_bytes_unpatched")


class BatchTimer(BaseStreamer):
    """Timestamps of one `generate` call: `start()` just before it, then generate's own `put` of each new token
    (its first `put`, the prompt, is not a token). CUDA events on a GPU (read once, after the call), host time
    otherwise. generate copies each token to the host before its `put` (and reads the stop flag every step), so
    a mark follows the token's computation on both."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.marks, self._prompt_seen = [], False

    def _mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def start(self):
        self._mark()

    def put(self, value):
        if self._prompt_seen:
            self._mark()
        self._prompt_seen = True

    def end(self):
        pass

    def milliseconds(self):
        """Times of each token since the start, in ms: [first token, second, ...]."""
        if self.cuda:
            self.marks[-1].synchronize()
            return [self.marks[0].elapsed_time(m) for m in self.marks[1:]]
        return [1e3 * (m - self.marks[0]) for m in self.marks[1:]]

    def record(self):
        """{"prefill_ms", "decode_ms_per_token" (None with a single token), "new_tokens"} of the call."""
        times = self.milliseconds()
        decode = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None
        return {"prefill_ms": times[0], "decode_ms_per_token": decode, "new_tokens": len(times)}


def peak_memory_source(device):
    if torch.device(device).type == "cuda":
        return "torch.cuda.max_memory_allocated, reset before each batch"
    return "peak resident set size of the process (ru_maxrss; never reset: the peak so far)"


def reset_peak_memory(device):
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device):
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024      # bytes on macOS, KiB on Linux


def example_counts(inputs, images_per_example, image_token_id, stats, text_config, value_bytes):
    """Per example of a batch: a dict of COUNTS. inputs: the processor's (input_ids and attention_mask [B, L]);
    images_per_example: [B] ints; stats: the patch's stats of the batch's generate call, or None unpatched;
    text_config / value_bytes: the LLM's config and the bytes of one value of its KV cache."""
    mask = inputs["attention_mask"].bool()
    prompt_unpatched = mask.sum(1).tolist()
    visual_unpatched = ((inputs["input_ids"] == image_token_id) & mask).sum(1).tolist()
    tokens = stats["visual_tokens"] if stats else {}
    visual = per_example(tokens["before LLM"], images_per_example) if "before LLM" in tokens else visual_unpatched
    stages = (stats or {}).get("llm_stages") or []         # methods inside the LLM: [(layer, kept per sample)]
    depth = text_config.num_hidden_layers
    counts = []
    for b, (seen, seen_unpatched, length_unpatched) in enumerate(zip(visual, visual_unpatched, prompt_unpatched)):
        length = length_unpatched - seen_unpatched + seen
        drops = stage_drops(seen, [(layer, kept[b]) for layer, kept in stages])
        counts.append({
            "visual_tokens": mean_over_layers(seen, drops, depth), "visual_tokens_unpatched": seen_unpatched,
            "prompt_tokens": length, "prompt_tokens_unpatched": length_unpatched,
            "prefill_flops": staged_prefill_flops(text_config, length, drops),
            "prefill_flops_unpatched": llm_prefill_flops(text_config, length_unpatched),
            "kv_cache_bytes": staged_kv_cache_bytes(text_config, length, drops, value_bytes),
            "kv_cache_bytes_unpatched": kv_cache_bytes(text_config, length_unpatched, value_bytes),
        })
    return counts


def mean_over_layers(visual, drops, depth):
    """The visual tokens the decoder layers see, averaged over the `depth` layers: `visual` at the LLM's input,
    fewer from each (layer, removed) of `drops` on (PyramidDrop's "average token budget"); `visual` without drops."""
    if not drops:
        return visual
    return sum(count * tokens for count, tokens in layer_segments(visual, drops, depth)) / depth


def per_example(per_image, images_per_example):
    """Per-image counts of a batch (images in order) summed per example: [3, 4, 5], [1, 2] -> [3, 9]."""
    sums, start = [], 0
    for n in images_per_example:
        sums.append(sum(per_image[start:start + n]))
        start += n
    return sums


def summarize(lines, timings, processes=1):
    """The `efficiency` of results.json: the per-example mean of each of COUNTS, `prefill_flops_ratio`
    (patched / unpatched, over the whole run) and `timing` (means over the batches measured, max of memory;
    the device of the latest measurement; `processes`: how many processes computed the batches, each on its
    own device)."""
    n = max(len(lines), 1)
    summary = {key: sum(line[key] for line in lines) / n for key in COUNTS}
    summary["prefill_flops_ratio"] = summary["prefill_flops"] / max(summary["prefill_flops_unpatched"], 1)
    latest = list({t["batch"]: t for t in timings}.values())     # a batch computed twice: its last measurement
    decode = [t["decode_ms_per_token"] for t in latest if t["decode_ms_per_token"] is not None]
    device = latest[-1]["device"] if latest else None
    summary["timing"] = {
        "device": device,
        "processes": processes,
        "timer": device and ("CUDA events" if torch.device(device).type == "cuda" else "time.perf_counter"),
        "batches": len(latest),
        "prefill_ms": mean([t["prefill_ms"] for t in latest]),
        "decode_ms_per_token": mean(decode),
        "generate_ms_per_example": (sum(map(generate_ms, latest)) / sum(t["size"] for t in latest)
                                    if latest else None),
        "peak_memory_bytes": max((t["peak_memory_bytes"] for t in latest), default=None),
        "peak_memory": device and peak_memory_source(device),
    }
    return summary


def generate_ms(timing):
    """The whole generate call of a batch's timing record, in ms: the first token, then the later ones."""
    return timing["prefill_ms"] + (timing["decode_ms_per_token"] or 0) * (timing["new_tokens"] - 1)


def mean(values):
    return sum(values) / len(values) if values else None
