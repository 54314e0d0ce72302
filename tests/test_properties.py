"""Property-based tests: random families, methods, options, budgets, batch shapes, padding sides, image counts and
generate settings, checked against invariants that hold for every configuration.

Invariants
- full budget equals unpatched: logits, loss with labels, ViT outputs, generated ids, scores, logits and sequence
  scores of every generate mode (greedy, seeded sampling, beams, num_return_sequences, cache on/off), bit for bit;
- token counts equal the request: `stats["visual_tokens"]` (input and final counts per image / tile, from the
  README's budget semantics), the tokens the ViT really carries, and the prompt the LLM really gets (its ids are
  the caller's with each image run cut to its kept count, no needless padding);
- a loss with labels at a reduced budget is the cross-entropy of the reduced prompt (dropped and pad rows ignored);
- stats belong to the last call (a different batch, a text-only call, a generate);
- a sample's result does not depend on its batch neighbours (batch == one by one; every method is deterministic);
- unpatch restores bit-identical outputs and leaves no trace (hooks, instance overrides, marker);
- the model is never left patched after an exception: a refused option (checked at patch time, the message names
  the option), a failure while installing, a failure inside a patched forward (the patch keeps working after it).

CI runs a fixed, seeded set of examples per test (`derandomize`, about a minute on one CPU thread). A larger sweep
with fresh seeds (not in CI):

    VLMEFF_SWEEP=300 python -m pytest -q tests/test_properties.py --hypothesis-seed=12345

(VLMEFF_SWEEP examples per test, random seeds, or the given one; hypothesis prints the shrunk falsifying example
with the draws and an `@reproduce_failure` blob to replay it; VLMEFF_SHRINK=0 skips shrinking, which on a slow
machine can take minutes per distinct failure.)
"""
import os
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, note, reject, settings
from hypothesis import strategies as st

import vlmeff
import strategies as S

SWEEP = int(os.environ.get("VLMEFF_SWEEP", "0"))
SHRINK = os.environ.get("VLMEFF_SHRINK", "1") != "0"
# no explain phase: on these models it re-runs a failing example hundreds of times (minutes) to annotate it
PHASES = [Phase.explicit, Phase.reuse, Phase.generate, Phase.target] + [Phase.shrink] * SHRINK


def bounded(examples):
    """CI: `examples` seeded examples; sweep: VLMEFF_SWEEP random (or --hypothesis-seed) examples.
    VLMEFF_SHRINK=0 reports failing examples unshrunk (a faster sweep)."""
    return settings(max_examples=SWEEP or examples, derandomize=not SWEEP, deadline=None, database=None,
                    print_blob=True, phases=PHASES,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


def assert_same(got, want, what):
    """Bit-identical, or a message with the largest difference (or the shapes)."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)}, unpatched {tuple(want.shape)}"
    if not torch.equal(got, want):
        diff = torch.where(got == want, 0.0, (got.float() - want.float()).abs())     # equal infinities: no diff
        raise AssertionError(f"{what} differs from the unpatched model: max |diff| {diff.max():.3g} "
                             f"at {tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))}")


def final_counts(stats):
    """Visual tokens per image after the last stage that reduced them (or the input counts)."""
    return list(stats["visual_tokens"].values())[-1]


# == ViT ==========================================================================================================
@bounded(60)
@given(data=st.data())
def test_vit_invariants(data):
    family = S.VITS[data.draw(st.sampled_from(sorted(S.VITS)), label="family")]
    full = data.draw(st.booleans(), label="full budget")
    method, keep, options = data.draw(S.vit_config(family, full), label="method, keep, options")
    B = data.draw(st.integers(1, 3), label="batch")
    seed = data.draw(st.integers(0, 1000), label="image seed")
    model = S.model_for(family)
    x = torch.randn(B, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    ref = S.vit_outputs(family, model, x)
    before = S.traces(model)
    n = family.patches

    if method == "tome" and options.get("r") is None and keep is not None:
        wanted = S.budget(keep, n)
        if min(wanted) < S.tome_reachable(n, family.depth):
            # README/issue: reach the budget or say clearly why not: refusing an unreachable budget is fine
            try:
                handle = vlmeff.patch(model, method, keep=keep, **options)
            except ValueError as e:
                assert "keep" in str(e)
                assert S.traces(model) == before
                return
            handle.unpatch()
            raise AssertionError(f"tome keep={keep!r} cannot be reached in {family.depth} layers from {n} patches "
                                 f"(at best {S.tome_reachable(n, family.depth)}) but patch accepted it")
        expected = wanted
    elif method == "tome":
        schedule = options["r"] if isinstance(options["r"], list) else [options["r"]] * family.depth
        expected = {S.tome_counts(n, schedule)}
    elif method == "pool":
        expected = {S.pool_cells(*family.grid, k) for k in S.budget(keep, n)}
    else:
        expected = S.budget(keep, n)
    if full:
        expected = {n}

    with vlmeff.patch(model, method, keep=keep, **options) as h:
        out = S.vit_outputs(family, model, x)
        stats = h.stats
        assert stats["visual_tokens"]["input"] == [n] * B
        counts = final_counts(stats)
        assert len(set(counts)) == 1 and counts[0] in expected, f"kept {counts}, expected {sorted(expected)}"
        assert out["tokens"].shape[1] == family.prefix + counts[0]            # the tokens really carried
        if full:
            for name in ref:
                assert_same(out[name], ref[name], name)
        # batch == one by one; stats follow the last call (here a batch of one)
        for i in sorted({0, B - 1}):
            alone = S.vit_outputs(family, model, x[i:i + 1])
            assert h.stats["visual_tokens"]["input"] == [n]
            assert final_counts(h.stats) == counts[:1]
            for name in out:
                torch.testing.assert_close(alone[name][0], out[name][i], atol=1e-5, rtol=1e-5)
    assert S.traces(model) == before, "unpatch left traces on the model"
    after = S.vit_outputs(family, model, x)
    for name in ref:
        assert_same(after[name], ref[name], f"after unpatch, {name}")


# == LVLM forward =================================================================================================
def run_lvlm(model, inputs, labels=None):
    """(output, the ids the LLM embedded, the attention mask the base model got): the LLM's actual prompt."""
    seen = {}

    def ids(module, args):
        seen.setdefault("ids", args[0])

    def mask(module, args, kwargs):
        seen.setdefault("mask", kwargs.get("attention_mask"))

    hooks = [model.get_input_embeddings().register_forward_pre_hook(ids),
             model.model.register_forward_pre_hook(mask, with_kwargs=True)]
    try:
        with torch.no_grad():
            out = model(**inputs, labels=labels)
    finally:
        for hook in hooks:
            hook.remove()
    return out, seen.get("ids"), seen.get("mask")


def check_counts(p, method, keep, stats):
    """stats["visual_tokens"] of a call on prompts p: input counts are the blocks', kept counts the request."""
    vt = stats["visual_tokens"]
    assert vt["input"] == [b.rows for b in p.blocks]
    counts = vt["before LLM"]
    assert len(counts) == len(p.blocks)
    for c, block in zip(counts, p.blocks):
        expected = S.expected_rows(method, keep, block)
        if expected is None:       # pool over a packed anyres block: at most the budget, at least one row
            assert block.protected + 1 <= c <= block.protected + max(S.budget(keep, block.rows - block.protected))
        else:
            assert c in expected, f"block {block}: kept {c}, expected {sorted(expected)}"
    return counts


def check_llm_prompt(p, counts, ids, mask):
    """The LLM gets each sample's prompt with block j cut to counts[j] placeholders, padded to the longest."""
    want = S.reduced_ids(p, counts)
    assert ids.shape[1] == max(map(len, want)), "the reduced prompt is padded beyond its longest sample"
    for i, w in enumerate(want):
        row = ids[i] if mask is None else ids[i][mask[i].bool()]
        assert row.tolist() == w, f"sample {i}: the LLM got {row.tolist()}, expected {w}"


@bounded(60)
@given(data=st.data())
def test_lvlm_forward_invariants(data):
    family = S.LVLMS[data.draw(st.sampled_from(sorted(S.LVLMS)), label="family")]
    spec = data.draw(S.prompt_specs(family, labels=True), label="prompts")
    p = S.build_prompts(family, **spec)
    full = data.draw(st.booleans(), label="full budget")
    min_free = min(b.rows - b.protected for b in p.blocks)
    method, keep, options = data.draw(S.lvlm_config(family, min_free, full), label="method, keep, options")
    use_labels = data.draw(st.booleans(), label="labels")
    then = data.draw(st.sampled_from(["text only", "one sample"]), label="next call")
    text_only = S.build_prompts(family, **data.draw(S.prompt_specs(family, max_batch=1, max_images=0, images=False),
                                                    label="text-only call"))
    alones = [S.sample_alone(p, i) for i in range(p.batch)] if p.batch > 1 or then == "one sample" else []
    model = S.model_for(family)
    labels = S.labels_for(p) if use_labels else None
    ref, _, _ = run_lvlm(model, p.inputs, labels)
    ref_text = run_lvlm(model, text_only.inputs)[0].logits
    before = S.traces(model)

    with vlmeff.patch(model, method, keep=keep, **options) as h:
        out, ids, mask = run_lvlm(model, p.inputs, labels)
        counts = check_counts(p, method, keep, h.stats)
        if full:
            assert counts == [b.rows for b in p.blocks]
            assert_same(out.logits, ref.logits, "logits")
            if use_labels:
                assert_same(out.loss, ref.loss, "loss")
        check_llm_prompt(p, counts, ids, mask)
        if use_labels and not full:
            oracle = S.reduced_loss(p, out.logits, mask, counts)
            torch.testing.assert_close(out.loss, oracle, atol=1e-5, rtol=1e-5,
                                       msg=lambda m: f"loss with labels is not the reduced prompt's: {m}")
        # batch == one by one (every method is deterministic: a sample's result ignores its neighbours)
        j = 0
        for i, alone in enumerate(alones if p.batch > 1 else []):
            n_blocks = len(p.sample_blocks(i))
            solo, _, _ = run_lvlm(model, alone.inputs)
            valid = mask[i].bool() if mask is not None else slice(None)
            torch.testing.assert_close(solo.logits[0], out.logits[i][valid], atol=1e-4, rtol=1e-4,
                                       msg=lambda m: f"sample {i} alone differs from the batch: {m}")
            if n_blocks:
                assert h.stats["visual_tokens"]["before LLM"] == counts[j:j + n_blocks]
            j += n_blocks
        # stats belong to the last call
        if then == "text only":
            assert_same(run_lvlm(model, text_only.inputs)[0].logits, ref_text, "a text-only call's logits")
            vt = h.stats.get("visual_tokens", {})
            assert all(v == [] for v in vt.values()), f"after a call without images, stats still say {vt}"
        else:
            i = next(i for i in range(p.batch) if p.images[i])
            run_lvlm(model, alones[i].inputs)
            assert h.stats["visual_tokens"]["input"] == [b.rows for b in alones[i].blocks]
    assert S.traces(model) == before, "unpatch left traces on the model"
    after, _, _ = run_lvlm(model, p.inputs, labels)
    assert_same(after.logits, ref.logits, "after unpatch, logits")
    if use_labels:
        assert_same(after.loss, ref.loss, "after unpatch, loss")


# == LVLM generate ================================================================================================
@st.composite
def generate_settings(draw, batch):
    """Every generate mode a user reaches for: greedy, seeded sampling, beams, prompt-lookup (assisted) decoding
    for a single prompt; n return sequences; dict outputs with scores / logits; cache on or off."""
    mode = draw(st.sampled_from(["greedy", "sample", "beams"] + ["prompt lookup"] * (batch == 1)))
    kw = dict(max_new_tokens=draw(st.integers(1, 3)), suppress_tokens=[S.IMAGE, S.VIDEO])
    if mode == "greedy":
        kw["do_sample"] = False
    elif mode == "prompt lookup":
        kw.update(do_sample=False, prompt_lookup_num_tokens=2)
    elif mode == "sample":
        kw.update(do_sample=True, top_k=draw(st.sampled_from([0, 5])),
                  num_return_sequences=draw(st.integers(1, 2)))
    else:
        beams = draw(st.integers(2, 3))
        kw.update(do_sample=False, num_beams=beams, num_return_sequences=draw(st.integers(1, beams)))
    if draw(st.booleans()):
        kw.update(return_dict_in_generate=True, output_scores=draw(st.booleans()), output_logits=draw(st.booleans()))
    if mode != "prompt lookup" and draw(st.booleans()):
        kw["use_cache"] = False
    return kw


def generate(model, inputs, seed, kw):
    torch.manual_seed(seed)
    with torch.no_grad():
        return model.generate(**inputs, **kw)


def compare_generations(got, want):
    if torch.is_tensor(want):
        assert_same(got, want, "generated ids")
        return
    assert_same(got.sequences, want.sequences, "generated ids")
    for name in ("scores", "logits"):
        if getattr(want, name, None) is not None:
            assert len(getattr(got, name)) == len(getattr(want, name))
            for step, (g, w) in enumerate(zip(getattr(got, name), getattr(want, name))):
                assert_same(g, w, f"{name}[{step}]")
    for name in ("sequences_scores", "beam_indices"):
        if getattr(want, name, None) is not None:
            assert_same(getattr(got, name), getattr(want, name), name)


@bounded(40)
@given(data=st.data())
def test_lvlm_generate_invariants(data):
    family = S.LVLMS[data.draw(st.sampled_from(sorted(S.LVLMS)), label="family")]
    p = S.build_prompts(family, **data.draw(S.prompt_specs(family, max_batch=2), label="prompts"))
    kw = data.draw(generate_settings(p.batch), label="generate settings")
    seed = data.draw(st.integers(0, 2 ** 16), label="torch seed")
    min_free = min(b.rows - b.protected for b in p.blocks)
    full_cfg = data.draw(S.lvlm_config(family, min_free, full=True), label="full-budget method, keep, options")
    cut_cfg = data.draw(S.lvlm_config(family, min_free), label="reduced method, keep, options")
    model = S.model_for(family)
    ref = generate(model, p.inputs, seed, kw)
    before = S.traces(model)
    prompt = p.inputs["input_ids"]
    n = kw.get("num_return_sequences", 1)

    method, keep, options = full_cfg
    with vlmeff.patch(model, method, keep=keep, **options) as h:
        compare_generations(generate(model, p.inputs, seed, kw), ref)
        assert h.stats["visual_tokens"]["input"] == [b.rows for b in p.blocks], "stats are not the generate call's"
        assert h.stats["visual_tokens"]["before LLM"] == [b.rows for b in p.blocks]
    assert S.traces(model) == before, "unpatch left traces on the model"

    method, keep, options = cut_cfg
    with vlmeff.patch(model, method, keep=keep, **options) as h:
        out = generate(model, p.inputs, seed, kw)
        sequences = out if torch.is_tensor(out) else out.sequences
        # the caller's prompt (repeated per returned sequence) followed by at most max_new_tokens new tokens
        assert sequences.shape[0] == p.batch * n
        assert torch.equal(sequences[:, :prompt.shape[1]], prompt.repeat_interleave(n, dim=0))
        assert prompt.shape[1] < sequences.shape[1] <= prompt.shape[1] + kw["max_new_tokens"]
        check_counts(p, method, keep, h.stats)
    assert S.traces(model) == before, "unpatch left traces on the model"
    compare_generations(generate(model, p.inputs, seed, kw), ref)


# == exception safety =============================================================================================
def invalid_options(kind, family, method, layer):
    """(option, value) pairs no valid configuration has: out of range, of the wrong type, unknown."""
    info = vlmeff.method_info(method)
    depth = family.depth if kind == "vit" else None
    table = {
        "keep": [0, -2, 1.5, 0.0, -0.5, "half", True, float("nan")],
        "reduce": ["avg", "Drop", 1],
        "positions": ["compact"] if kind == "vit" else ["middle", 1],
        "layer": [depth, -depth - 1, 1.5, True, "1"] if kind == "vit" else [0],
        "score_layers": ([layer + 1, (layer, layer - 1), [], "0", 0.5, True, (0,), [0, 1, 2]] if kind == "vit" else
                         [family.score_layer + 1, 7, [], "0", 0.5, True, (0,), (1, 0), [0, 1, 2]]),
        "contextual": [-1, 2.0, 1.5, "a", None, float("nan")],
        "r": [-1, 2.5, "a", [1, 2], True],
        "prop_attn": ["no", None],
        "seed": ["x", 1.5],
        "kep": [0.25],
    }
    names = [name for name in table if name in info.options or name in ("keep", "kep")]
    return [(name, value) for name in names for value in table[name]]


def model_and_inputs(data, kind):
    """A cached model of a drawn family and a small input for it, with a function running it."""
    if kind == "vit":
        family = S.VITS[data.draw(st.sampled_from(sorted(S.VITS)), label="family")]
        x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        model = S.model_for(family)
        return family, model, lambda: S.vit_outputs(family, model, x)["tokens"]
    family = S.LVLMS[data.draw(st.sampled_from(sorted(S.LVLMS)), label="family")]
    p = S.build_prompts(family, **data.draw(S.prompt_specs(family, max_batch=2), label="prompts"))
    model = S.model_for(family)
    return family, model, lambda: run_lvlm(model, p.inputs)[0].logits


@bounded(60)
@given(data=st.data())
def test_exception_safety(data):
    kind = data.draw(st.sampled_from(["vit", "lvlm"]), label="kind")
    family, model, run = model_and_inputs(data, kind)
    failure = data.draw(st.sampled_from(["invalid option", "failing install", "failing forward", "patched twice"]),
                        label="failure")
    if kind == "vit":
        method, keep, options = data.draw(S.vit_config(family), label="method, keep, options")
        layer = options.get("layer", family.depth // 4) % family.depth
        if method == "tome" and options.get("r") is None:
            options, keep = dict(options, r=8), None        # a tome budget may be unreachable: not the point here
    else:
        method, keep, options = data.draw(S.lvlm_config(family, 1), label="method, keep, options")
        keep = 1.0 if isinstance(keep, int) else keep                     # valid for every block
        layer = None
        if method == "visionzip" and isinstance(options.get("contextual"), int):
            options.pop("contextual")
    ref = run()
    before = S.traces(model)

    if failure == "invalid option":
        name, value = data.draw(st.sampled_from(invalid_options(kind, family, method, layer)), label="invalid option")
        note(f"patch({method!r}, {name}={value!r})")
        args = dict(keep=keep, **options)
        args[name] = value
        with pytest.raises((TypeError, ValueError)) as err:
            vlmeff.patch(model, method, **args)
        assert name in str(err.value), f"the message does not name the option {name!r}: {err.value}"
        if name == "kep":
            assert "keep" in str(err.value), f"the valid options listed miss keep: {err.value}"
    elif failure == "failing install":
        # the n-th hook registration raises: patch must raise it and take back everything it installed
        n = data.draw(st.integers(0, 12), label="failing registration")
        calls = {"n": 0}
        real = {name: getattr(torch.nn.Module, name) for name in ("register_forward_hook", "register_forward_pre_hook")}

        def failing(name):
            def register(self, *args, **kwargs):
                calls["n"] += 1
                if calls["n"] == n + 1:
                    raise RuntimeError("injected failure")
                return real[name](self, *args, **kwargs)
            return register

        with mock.patch.object(torch.nn.Module, "register_forward_hook", failing("register_forward_hook")), \
                mock.patch.object(torch.nn.Module, "register_forward_pre_hook", failing("register_forward_pre_hook")):
            try:
                handle = vlmeff.patch(model, method, keep=keep, **options)
            except RuntimeError as e:
                assert "injected" in str(e)
                handle = None
        if handle is not None:
            assert calls["n"] <= n, "patch swallowed a failing hook registration"
            handle.unpatch()
    elif failure == "failing forward":
        # a failure inside the patched forward: the patch stays usable, and leaving `with` cleans up
        with pytest.raises(KeyError, match="injected"):
            with vlmeff.patch(model, method, keep=keep, **options) as h:
                expected = run()
                stats = h.stats
                site = data.draw(st.sampled_from(["vision", "after"]), label="failing site")
                target = _vision_module(model, kind) if site == "vision" else _late_module(model, kind)
                bomb = target.register_forward_hook(_raise)
                try:
                    with pytest.raises(KeyError, match="injected"):
                        run()
                finally:
                    bomb.remove()
                assert_same(run(), expected, "a patched forward after a failed one")
                assert h.stats["visual_tokens"] == stats["visual_tokens"]
                raise KeyError("injected, leaving the with block")
    else:
        with vlmeff.patch(model, method, keep=keep, **options):
            expected = run()
            with pytest.raises(RuntimeError):
                vlmeff.patch(model, method, keep=keep, **options)
            assert_same(run(), expected, "the first patch after a refused second one")
    assert S.traces(model) == before, "the model is left patched after an exception"
    assert_same(run(), ref, "outputs after the exception")


# == inputs the unpatched model takes ============================================================================
@bounded(15)
@given(data=st.data())
def test_patched_model_takes_what_the_unpatched_one_takes(data):
    """An empty ViT batch; an LVLM batch with a fully padded row (pad ids, all-zero attention mask, e.g. a batch
    padded to a fixed size): the patched model runs, and at full budget gives the unpatched outputs."""
    kind = data.draw(st.sampled_from(["vit", "lvlm"]), label="kind")
    full = data.draw(st.booleans(), label="full budget")
    if kind == "vit":
        family = S.VITS[data.draw(st.sampled_from(sorted(S.VITS)), label="family")]
        method, keep, options = data.draw(S.vit_config(family, full), label="method, keep, options")
        model = S.model_for(family)
        run = lambda: S.vit_outputs(family, model, torch.zeros(0, 3, 32, 32))["tokens"]
    else:
        family = S.LVLMS[data.draw(st.sampled_from(sorted(S.LVLMS)), label="family")]
        p = S.build_prompts(family, **data.draw(S.prompt_specs(family), label="prompts"))
        row = data.draw(st.integers(0, p.batch), label="fully padded row inserted at")
        inputs = {name: _insert_padding_row(value, row) if name in S.PER_TOKEN else value
                  for name, value in p.inputs.items()}
        min_free = min(b.rows - b.protected for b in p.blocks)
        method, keep, options = data.draw(S.lvlm_config(family, min_free, full), label="method, keep, options")
        model = S.model_for(family)
        run = lambda: run_lvlm(model, inputs)[0].logits
    if method == "tome" and options.get("r") is None and not full:
        options, keep = dict(options, r=8), None           # unreachable tome budgets are test_vit_invariants' job
    try:
        ref = run()
    except Exception:               # Qwen-VL's own get_rope_index refuses a fully padded row: not ours to take
        reject()
    with vlmeff.patch(model, method, keep=keep, **options):
        out = run()
    if full:
        assert_same(out, ref, "outputs")
    assert out.shape[0] == ref.shape[0]


def _insert_padding_row(value, row):
    """value [B, L] with a row of zeros (the pad id, a zero mask, no image token types) inserted at `row`."""
    return torch.cat([value[:row], torch.zeros_like(value[:1]), value[row:]])


def _raise(module, args, out):
    raise KeyError("injected")


def _vision_module(model, kind):
    """A module inside the vision encoder (the ViT's first layer, the LVLM tower's first layer)."""
    if kind == "vit":
        for name, module in model.named_modules():
            if name.endswith(("blocks.0", "layer.0", "layers.0")):
                return module
    tower = model.model.visual if hasattr(model.model, "visual") else model.model.vision_tower
    for name, module in tower.named_modules():
        if name.endswith(("layers.0", "layer.0", "blocks.0")):
            return module
    raise LookupError("no first vision layer found")


def _late_module(model, kind):
    """A module after the reduction: the ViT's last layer, the LVLM's language model."""
    if kind == "vit":
        last = None
        for name, module in model.named_modules():
            if name.endswith(("blocks.3", "layer.3", "layers.3")):
                last = module
        return last
    return model.model.language_model
