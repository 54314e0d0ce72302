"""What the lmms-eval plugin (`vlmeff.eval.lmms`) does with lmms-eval's arguments and requests, without lmms-eval:
its model_args split into vlmeff's patch and the model to load, a task's generation kwargs turned into `generate`'s,
requests grouped into batches, a request's text and images turned into a vlmeff `Example`, continuations scored,
and the multi-round protocol.

lmms-eval (0.7.x) hands a "simple" model `Instance`s whose `.args` are
- generate_until: (context, gen_kwargs, doc_to_visual, doc_id, task, split);
- loglikelihood: (context, continuation or doc_to_target, doc_to_visual, doc_id, task, split);
- generate_until_multi_round: (context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split),
with the document at `task_dict[task][split][doc_id]` and its images `doc_to_visual(document)`.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field

import torch

from ..registry import method_info
from .runner import DTYPES
from .tasks import Example

IMAGE_PLACEHOLDER = "<image>"       # lmms-eval's LLaVA-style contexts may hold it; vlmeff puts the images first
DEFAULT_MAX_NEW_TOKENS = 1024       # lmms-eval's HF models' default, for a task whose gen_kwargs set none
LOADER_ARGS = ("pretrained", "dtype", "device", "device_map", "batch_size")
PATCH_ARGS = ("method", "keep")
GENERATION_KEYS = ("until", "max_new_tokens", "temperature", "do_sample", "top_p", "num_beams")


@dataclass(frozen=True)
class ModelArgs:
    """lmms-eval's --model_args (and its --batch_size / --device) as the plugin uses them."""
    pretrained: str
    dtype: str = "auto"
    device_map: object = None               # from_pretrained's; --device lands here
    batch_size: int = 1
    method: str | None = None
    keep: object = None
    options: dict = field(default_factory=dict)  # the method's options, checked against the model by vlmeff.patch


def parse_model_args(args):
    """`ModelArgs` of the keyword arguments lmms-eval passes the model class (model_args parsed by lmms-eval, whose
    numbers are already int / float, plus batch_size and device when given). Keys besides the loader's and
    method / keep must be options of the method. ValueError naming the key or value and what is accepted."""
    args = dict(args)
    if "pretrained" not in args:
        raise ValueError("model_args needs pretrained=NAME_OR_PATH: an embedded model (vlmeff.zoo.names()), a local "
                         "path or a hub name")
    method = args.pop("method", None)
    if method is None and args.get("keep") is not None:
        raise ValueError(f"keep={args['keep']!r} needs a method; accepted: method=NAME (vlmeff.methods())")
    options = {key: args.pop(key) for key in list(args) if key not in LOADER_ARGS + ("keep",)}
    check_options(method, options)
    dtype = args.get("dtype", "auto")
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; accepted: {', '.join(DTYPES)}")
    device, device_map = args.get("device"), args.get("device_map")
    if device is not None and device_map is not None:
        raise ValueError(f"device={device!r} and device_map={device_map!r}; accepted: one of them (device puts the "
                         "whole model there, device_map is from_pretrained's)")
    return ModelArgs(str(args["pretrained"]), dtype, device_map if device_map is not None else device,
                     batch_size_of(args.get("batch_size", 1)), method, args.get("keep"), options)


def check_options(method, options):
    """Every key left over is an option of the method; ValueError naming it, the accepted keys and the closest."""
    accepted = (*LOADER_ARGS, *PATCH_ARGS, *(method_info(method).options if method else ()))
    for key in (key for key in options if key not in accepted):
        close = difflib.get_close_matches(key, accepted, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        owner = f"method {method!r}" if method else "the unpatched model (no method=)"
        raise ValueError(f"unknown model_args key {key!r} for {owner}; accepted: {', '.join(accepted)}{hint}")


def batch_size_of(value):
    """lmms-eval's --batch_size arrives as a string ("4"); "auto" batch sizing is not offered."""
    try:
        size = int(value)
    except (TypeError, ValueError):
        size = 0
    if isinstance(value, bool) or size < 1 or str(size) != str(value).strip():
        raise ValueError(f"batch_size={value!r}; accepted: an integer >= 1 (vlmeff does not size batches itself)")
    return size


def generation_settings(gen_kwargs):
    """(`generate` keyword arguments, stop strings, ignored keys) of a task's gen_kwargs: greedy unless
    do_sample or a temperature > 0 asks for sampling; `until` (a string or a list of them) cuts the answer.
    Keys vlmeff does not use (e.g. image_aspect_ratio, read by other models) are returned, to be reported.
    ValueError naming a value of the keys it uses that is not accepted."""
    until = gen_kwargs.get("until", [])
    stops = [until] if isinstance(until, str) else until
    if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) for s in stops):
        raise ValueError(f"gen_kwargs until={until!r}; accepted: a string or a list of strings")
    settings = {"max_new_tokens": positive_int(gen_kwargs, "max_new_tokens", DEFAULT_MAX_NEW_TOKENS),
                "num_beams": positive_int(gen_kwargs, "num_beams", 1)}
    temperature = gen_kwargs.get("temperature") or 0
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or temperature < 0:
        raise ValueError(f"gen_kwargs temperature={temperature!r}; accepted: a number >= 0 (0: greedy)")
    settings["do_sample"] = gen_kwargs.get("do_sample", temperature > 0)
    if not isinstance(settings["do_sample"], bool):
        raise ValueError(f"gen_kwargs do_sample={settings['do_sample']!r}; accepted: true or false")
    top_p = gen_kwargs.get("top_p")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ValueError(f"gen_kwargs top_p={top_p!r}; accepted: a number in (0, 1], or none")
    if settings["do_sample"]:                 # greedy ignores them (and generate warns about them)
        settings["temperature"] = temperature or 1.0
        if top_p is not None:
            settings["top_p"] = top_p
    ignored = sorted(set(gen_kwargs) - set(GENERATION_KEYS))
    return settings, list(stops), ignored


def positive_int(gen_kwargs, key, default):
    value = gen_kwargs.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"gen_kwargs {key}={value!r}; accepted: an integer >= 1")
    return value


def cut_at_stops(text, stops):
    """The answer: `text` up to its first stop string (lmms-eval's `until`), stripped as vlmeff eval strips it."""
    for stop in stops:
        if stop:
            text = text.split(stop)[0]
    return text.strip()


def request_batches(gen_kwargs_per_request, batch_size):
    """[(gen_kwargs, [request positions])]: requests of equal gen_kwargs, in request order, in batches of at most
    batch_size (one `generate` call each, so a batch must share its settings)."""
    groups = []                               # [(gen_kwargs, [positions])]: dicts, so compared, not hashed
    for position, gen_kwargs in enumerate(gen_kwargs_per_request):
        same = next((members for kwargs, members in groups if kwargs == gen_kwargs), None)
        if same is None:
            groups.append((gen_kwargs, [position]))
        else:
            same.append(position)
    return [(kwargs, members[start:start + batch_size]) for kwargs, members in groups
            for start in range(0, len(members), batch_size)]


def example_of(context, visuals):
    """A vlmeff `Example` of one request: its images (RGB; `visuals` None or [] for a text-only request) first, then
    the context without lmms-eval's "<image>" placeholders. TypeError for visuals that are not images (videos
    arrive as paths, audio as dicts: not what vlmeff reduces)."""
    images = list(visuals or [])
    for visual in images:
        if not hasattr(visual, "convert"):
            raise TypeError(f"the vlmeff plugin takes PIL images; this request has a {type(visual).__name__} visual "
                            f"({str(visual)[:60]!r})")
    prompt = context.replace(IMAGE_PLACEHOLDER, "").strip()
    return Example([image.convert("RGB") for image in images], prompt, None, None)


def continuation_loss(logits, continuation_ids):
    """(loss, is greedy) of the continuation that ends the sequence, as lmms-eval's own HF models return it for a
    loglikelihood request: the loss is the mean negative log-likelihood of the continuation's tokens (lmms-eval's
    multiple_choice scorer picks the choice of the smallest, its argmin), not a log-probability. logits [L, V] of
    the whole sequence (prompt then continuation; a patched model returns fewer prompt rows, the last ones still
    line up), continuation_ids [n] (n >= 1). Row L - n - 1 + k predicts the continuation's token k."""
    n = len(continuation_ids)
    predicting = logits[-n - 1:-1].float().log_softmax(-1)
    loss = -predicting.gather(1, continuation_ids[:, None]).mean().item()
    return loss, bool(torch.equal(predicting.argmax(-1), continuation_ids))


def converse(context, visuals, next_round, answer):
    """lmms-eval's multi-round protocol for one document -> the answers of its rounds. Round 0 answers
    (context, visuals); before each later round r, next_round(previous answers, r, info) -> (visuals, context,
    finished, answers so far, info): the task's doc_to_text, which may rewrite the answers and ends the dialogue.
    answer(context, visuals) -> str."""
    answers, info, round_index = [], None, 0
    while True:
        if round_index > 0:
            visuals, context, finished, answers, info = next_round(list(answers), round_index, info)
            if finished:
                return list(answers)
        answers = [*answers, answer(context, visuals)]
        round_index += 1
