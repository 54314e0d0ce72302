"""An lmms-eval model plugin: any LVLM vlmeff loads, unpatched or patched, evaluated by lmms-eval's tasks.

    pip install "vlmeff[lmms]"
    lmms-eval --model vlmeff --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=cls,keep=64 --tasks pope
    accelerate launch --num_processes 4 -m lmms_eval --model vlmeff --model_args ... --tasks pope

The `lmms_eval.models` entry point (pyproject.toml) yields `manifest()`, so that lmms-eval's registry (and
`lmms_eval.models.get_model("vlmeff")`) finds `VlmeffLmms`, a "simple" model (lmms-eval hands it the task's text and
images). model_args: pretrained (an embedded name, a local path or a hub name, loaded as `vlmeff eval` loads it),
dtype, device_map, method, keep and the method's options (e.g. reduce=merge); lmms-eval's --batch_size and --device
come too. vlmeff's keys are taken out before anything else sees them; an unknown key is an error naming the
accepted ones.

Prompts are built as `vlmeff eval` builds them (the processor's chat template; the user turn holds the images, then
the task's text without lmms-eval's "<image>" placeholders; batches padded on the left). Generation is greedy unless
the task's gen_kwargs sample; `until` cuts the answers. loglikelihood scores the continuation after the prompt's
generation prompt, one request at a time, as lmms-eval's own HF models do: the mean negative log-likelihood of its
tokens (a loss: lmms-eval's multiple_choice scorer takes the smallest) and whether greedy decoding gives it.
Data parallel: lmms-eval shards the requests over the processes of its launcher; each process puts its model on
cuda:LOCAL_RANK. The request handling is in `lmms_requests` (no lmms-eval needed there).
"""
from __future__ import annotations

import warnings

import torch
from lmms_eval.api.instance import GenerationResult, unwrap_generation_output
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest
from tqdm import tqdm

from .. import api
from .lmms_requests import (continuation_loss, converse, cut_at_stops, example_of, generation_settings,
                            parse_model_args, request_batches)
from .parallel import launcher_ranks
from .runner import chat_inputs, load_model

MODEL_NAME = "vlmeff"


def manifest():
    """The `lmms_eval.models` entry point's payload."""
    return ModelManifest(model_id=MODEL_NAME, simple_class_path=f"{__name__}.VlmeffLmms")


def loglikelihood_response(score):
    """What loglikelihood returns for one (loss, is greedy): the tuple, unless this lmms-eval's
    evaluator would turn it into its string (0.7.3's `unwrap_generation_output` does, whatever the model, and its
    multiple_choice tasks then fail to unpack it); then a `GenerationResult` carrying it, which that function
    hands on as it is."""
    if unwrap_generation_output(score)[0] == score:
        return score
    return GenerationResult(text=score)


class VlmeffLmms(lmms):
    """lmms-eval's `lmms` interface over a vlmeff-loaded model, patched with `vlmeff.patch` when method= is given
    (the patch stays for the model's life; `clean()` removes it)."""

    is_simple = True

    def __init__(self, **model_args):
        settings = parse_model_args(model_args)
        super().__init__()
        self._rank, self._world_size, local_rank = launcher_ranks()
        placement = settings.device_map
        if placement in (None, "cuda") and self._world_size > 1 and torch.cuda.is_available():
            placement = f"cuda:{local_rank}"       # one GPU per process, as lmms-eval's own HF models do
        self.model, self.processor = load_model(settings.pretrained, settings.dtype, placement)
        self.batch_size = settings.batch_size
        self.settings = settings
        self.patch = (api.patch(self.model, method=settings.method, keep=settings.keep, **settings.options)
                      if settings.method else None)

    @property
    def device(self):
        return self.model.device

    def clean(self):
        if self.patch is not None:
            self.patch.unpatch()
            self.patch = None
        super().clean()

    def document(self, doc_id, task, split):
        return self.task_dict[task][split][doc_id]

    def answers(self, items, gen_kwargs):
        """One `generate` call on a batch of `Example`s with the task's gen_kwargs -> the answers."""
        settings, stops, ignored = generation_settings(gen_kwargs)
        if ignored:
            warnings.warn(f"vlmeff's lmms-eval model ignores gen_kwargs {', '.join(ignored)}", stacklevel=2)
        inputs = chat_inputs(self.processor, items, self.model)
        with torch.no_grad():
            out = self.model.generate(**inputs, **settings)
        texts = self.processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        return [cut_at_stops(text, stops) for text in texts]

    def generate_until(self, requests):
        args = [request.args for request in requests]
        answers = [None] * len(args)
        with tqdm(total=len(args), desc="vlmeff generate_until", disable=self.rank != 0) as bar:
            for gen_kwargs, positions in request_batches([a[1] for a in args], self.batch_size):
                items = [example_of(args[k][0], args[k][2](self.document(*args[k][3:6]))) for k in positions]
                for k, answer in zip(positions, self.answers(items, gen_kwargs)):
                    answers[k] = answer
                    self.cache_hook.add_partial("generate_until", (args[k][0], gen_kwargs), answer)
                bar.update(len(positions))
        return answers

    def loglikelihood(self, requests):
        return [self.likelihood(*request.args)
                for request in tqdm(requests, desc="vlmeff loglikelihood", disable=self.rank != 0)]

    def likelihood(self, context, target, doc_to_visual, doc_id, task, split):
        """(loss, is greedy) of one loglikelihood request's continuation (a string or doc_to_target), see
        `continuation_loss`."""
        document = self.document(doc_id, task, split)
        continuation = target if isinstance(target, str) else target(document)
        return loglikelihood_response(self.score(example_of(context, doc_to_visual(document)), continuation))

    def score(self, item, continuation):
        """(loss, is greedy) of `continuation` after the prompt of the `Example` item (`continuation_loss`)."""
        inputs = chat_inputs(self.processor, [item], self.model)
        ids = self.processor.tokenizer(continuation, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        ids = ids.to(self.model.device)
        inputs["input_ids"] = torch.cat([inputs["input_ids"], ids[None]], 1)
        inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(ids)[None]], 1)
        with torch.no_grad():
            logits = self.model(**inputs).logits[0]
        return continuation_loss(logits, ids)

    def generate_until_multi_round(self, requests):
        return [self.dialogue(*request.args)
                for request in tqdm(requests, desc="vlmeff multi-round", disable=self.rank != 0)]

    def dialogue(self, context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split):
        """The answers of one multi-round request: its task's doc_to_text leads the rounds (see `converse`)."""
        document = self.document(doc_id, task, split)

        def next_round(previous, round_index, info):
            return doc_to_text(document, previous_output=previous, round_idx=round_index, previous_round_info=info)

        def answer(text, visuals):
            return self.answers([example_of(text, visuals)], gen_kwargs)[0]
        return converse(context, doc_to_visual(document), next_round, answer)
