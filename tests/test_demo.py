"""The demo's plain functions (input checks, overlay, the side-by-side table) and its model runner: what a request
returns, that concurrent requests with different settings never see each other's, and bad input as messages."""
import io
import threading

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("gradio")
pytest.importorskip("easy_vqa")

import vlmeff  # noqa: E402
from vlmeff.data import easyvqa  # noqa: E402
from vlmeff.demo import core  # noqa: E402
from vlmeff.demo.core import DemoInputError  # noqa: E402
from vlmeff.demo.runner import DemoModel  # noqa: E402

QUESTION = "what shape is in the image?"


def png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def noise():
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def evqa():
    return DemoModel.load("tiny-llava-evqa")


@pytest.fixture(scope="module")
def image():
    return easyvqa.load_image(easyvqa.image_paths("test")[0])


# -- inputs -----------------------------------------------------------------------------------------------------
def test_open_image_accepts_paths_bytes_arrays_and_images(tmp_path, image):
    path = tmp_path / "a.png"
    image.save(path)
    for source in (str(path), path, png_bytes(image), np.asarray(image), image.convert("L")):
        out = core.open_image(source)
        assert out.mode == "RGB" and out.size == image.size


@pytest.mark.parametrize("make,words", [
    (lambda tmp, im: b"this is a text file, not an image", "not an image"),
    (lambda tmp, im: png_bytes(noise())[:2000], "corrupt or truncated"),
    (lambda tmp, im: None, "no image"),
])
def test_bad_images_are_messages(tmp_path, image, make, words):
    with pytest.raises(DemoInputError, match=words):
        core.open_image(make(tmp_path, image))


def test_a_decompression_bomb_is_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    Image.new("1", (10_000, 5_000)).save(path)         # 50 megapixels in a few kB
    assert path.stat().st_size < 100_000
    with pytest.raises(DemoInputError, match=r"10000 x 5000 pixels \(50 megapixels\); the demo accepts at most 40"):
        core.open_image(path)
    with pytest.raises(DemoInputError, match="at most 0 megapixels"):
        core.open_image(Image.new("RGB", (20, 20)), max_pixels=399)
    assert core.open_image(Image.new("RGB", (20, 20)), max_pixels=400).size == (20, 20)


@pytest.mark.parametrize("question,words", [("", "type a question"), ("   \n", "type a question"),
                                            (None, "type a question"), ("x" * 501, "501 characters")])
def test_bad_questions_are_messages(question, words):
    with pytest.raises(DemoInputError, match=words):
        core.check_question(question)
    assert core.check_question("  what?  ") == "what?" and core.check_question("x" * 500) == "x" * 500


@pytest.mark.parametrize("keep,expected", [(0.25, 0.25), ("0.5", 0.5), (1, 1.0), ("1.0", 1.0), (64, 64),
                                           ("256", 256), (2, 2)])
def test_budgets_as_patch_takes_them(keep, expected):
    value = core.check_budget(keep, 256)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("keep", [0, -1, "-0.5", 1.5, 257, "abc", None, "nan", "inf"])
def test_bad_budgets_name_the_value_and_the_range(keep):
    with pytest.raises(DemoInputError, match=r"a share of the visual tokens in \(0, 1\] or a count from 1 to 256"):
        core.check_budget(keep, 256)


# -- drawing ----------------------------------------------------------------------------------------------------
def test_kept_mask_marks_the_raster_positions():
    mask = core.kept_mask([0, 5, 15], (4, 4))
    assert mask.shape == (4, 4) and mask.sum() == 3 and mask[0, 0] and mask[1, 1] and mask[3, 3]
    with pytest.raises(ValueError, match="outside the 4 x 4 grid"):
        core.kept_mask([16], (4, 4))
    assert core.grid_of(576) == (24, 24)
    with pytest.raises(ValueError, match="no square grid"):
        core.grid_of(24)


def test_overlay_dims_pruned_patches_and_frames_kept_ones():
    picture = np.random.default_rng(0).integers(40, 255, (64, 64, 3), dtype=np.uint8)
    kept = core.kept_mask([0, 3], (2, 2))                  # top-left and bottom-right quarters kept
    out = np.asarray(core.overlay(Image.fromarray(picture), kept, size=64, dim=0.25)).astype(int)
    assert out.shape == (64, 64, 3)
    inner = (slice(2, 30), slice(2, 30))                     # inside the kept top-left patch, off its frame
    np.testing.assert_array_equal(out[inner], picture[inner])
    pruned = (slice(2, 30), slice(34, 62))                   # the top-right patch, pruned
    np.testing.assert_allclose(out[pruned], picture[pruned] * 0.25, atol=1)
    assert (out[0, 5] == (64, 220, 96)).all() and (out[32, 40] == (64, 220, 96)).all()     # frames
    assert not (out[0, 40] == (64, 220, 96)).all()           # no frame on a pruned patch


def test_stage_strip_puts_the_stages_side_by_side_with_their_captions():
    a = Image.fromarray(np.full((40, 40, 3), 10, dtype=np.uint8))
    b = Image.fromarray(np.full((40, 30, 3), 200, dtype=np.uint8))
    strip = np.asarray(core.stage_strip([(a, "stage one"), (b, "two")], gap=8, band=20))
    assert strip.shape == (60, 78, 3)
    assert (strip[:40, :40] == 10).all() and (strip[:40, 48:] == 200).all() and (strip[:40, 40:48] == 255).all()
    assert (strip[40:, :40] < 128).any() and (strip[40:, 48:] < 128).any()       # the captions' ink


def test_the_page_handler_shows_the_stages_and_their_captions(evqa, image):
    from vlmeff.demo.app import answer
    picture, table, status = answer(evqa, image, QUESTION, "cls", 0.25)
    assert picture.size == (336, 336 + 28) and table[1] == ["visual tokens", "256", "256 -> 64"]
    assert status == "before LLM: 64 of 256 patches kept"
    picture, _, status = answer(evqa, image, QUESTION, "fastv", 0.5)
    assert status == "from LLM layer 1: 128 of 256 kept"


def test_merge_overlay_tints_each_merged_token_in_its_own_colour():
    picture = np.full((32, 32, 3), 120, dtype=np.uint8)
    groups = np.array([[0, 0], [1, -1]])                     # token 0: two patches; token 1 alone; one dropped
    assert core.merged_patches(groups).tolist() == [[True, True], [False, False]]
    out = np.asarray(core.merge_overlay(Image.fromarray(picture), groups, size=32, tint=0.5)).astype(int)
    colour = core.group_colours(2)[0].astype(int)
    np.testing.assert_allclose(out[4, 4], (120 + colour) / 2, atol=1)
    np.testing.assert_allclose(out[4, 20], (120 + colour) / 2, atol=1)   # the same token: the same colour
    np.testing.assert_array_equal(out[20, 4], [120] * 3)                  # kept alone: as it is (inside its frame)
    np.testing.assert_allclose(out[20, 20], [30] * 3, atol=1)             # dropped: dimmed
    colours = core.group_colours(50)
    assert len({tuple(c) for c in colours}) == 50


def test_comparison_rows():
    base = core.Run("triangle", {"input": 256}, 4_000_000_000, 0.2)
    pruned = core.Run("circle", {"input": 256, "before LLM": 64}, 1_000_000_000, 0.05)
    assert core.comparison(base, pruned) == [
        ["answer", "triangle", "circle"], ["visual tokens", "256", "256 -> 64"],
        ["FLOPs (prefill)", "4.000 G", "1.000 G (4.00x fewer)"], ["latency", "200 ms", "50 ms (4.00x)"]]


# -- requests on the embedded model ------------------------------------------------------------------------------
def test_a_request_answers_unpruned_and_pruned_and_draws_the_kept_patches(evqa, image):
    result = evqa.ask(image, QUESTION, "cls", 0.25)
    model, processor = evqa.model, evqa.processor
    plain = vlmeff.zoo.ask(model, processor, [image], [QUESTION], max_new_tokens=8)[0]
    with vlmeff.patch(model, "cls", keep=0.25) as patch:
        pruned = vlmeff.zoo.ask(model, processor, [image], [QUESTION], max_new_tokens=8)[0]
        rows = patch.stats["kept"][0]
        flops = patch.stats["prefill_flops"], patch.stats["prefill_flops_unpatched"]
    table = {row[0]: row[1:] for row in result.table}
    assert table["answer"] == [plain, pruned]
    assert table["visual tokens"] == ["256", "256 -> 64"]
    assert table["FLOPs (prefill)"][0] == f"{flops[1] / 1e9:.3f} G"
    assert table["FLOPs (prefill)"][1].startswith(f"{flops[0] / 1e9:.3f} G")
    (picture, caption), = result.overlays
    assert caption == "before LLM: 64 of 256 patches kept"
    expected = core.overlay(image, core.kept_mask(rows.numpy(), (16, 16)))
    np.testing.assert_array_equal(np.asarray(picture), np.asarray(expected))
    assert not hasattr(model, "_vlmeff_patch")


def test_in_llm_stages_each_get_an_overlay():
    demo = DemoModel.load("tiny-llava-scenes")
    from vlmeff.data import scenes
    images, questions = scenes.load_split("test", n_images=1)
    picture = images[0].render()
    result = demo.ask(picture, questions[0].question, "pdrop", 0.5)
    with vlmeff.patch(demo.model, "pdrop", keep=0.5) as patch:
        vlmeff.zoo.ask(demo.model, demo.processor, [picture], [questions[0].question], max_new_tokens=8)
        stages = patch.stats["llm_stages"]
        final = patch.stats["llm_kept"][0]
        visual = patch.stats["llm_scores"][0].visual_input[0]
    assert [c for _, c in result.overlays] == [f"from LLM layer {layer}: {n[0]} of 256 kept" for layer, n in stages]
    assert len(stages) == 3
    last = core.overlay(picture, core.kept_mask(((visual.long().cumsum(0) - 1)[final & visual]).numpy(), (16, 16)))
    np.testing.assert_array_equal(np.asarray(result.overlays[-1][0]), np.asarray(last))


def test_a_vit_request_shows_top_predictions(image):
    demo = DemoModel.load("tiny-vit-evqa")
    assert "tome" in demo.methods and "fastv" not in demo.methods
    result = demo.ask(image, "", "cls", 0.25)
    table = {row[0]: row[1:] for row in result.table}
    with torch.no_grad():
        probs = demo.model(demo.processor([image])).softmax(-1)[0]
    best = int(probs.argmax())
    assert table["answer"][0].startswith(f"{demo.processor.classes[best]} {float(probs[best]):.0%}")
    assert table["answer"][0].count("%") == 5 and table["visual tokens"] == ["256", "256 -> 64"]
    assert [c for _, c in result.overlays] == ["after layer 1: 64 of 256 patches kept"]
    merged = demo.ask(image, "", "tome", 64)
    with vlmeff.patch(demo.model, "tome", keep=64) as patch:
        patch.track_merges = True
        with torch.no_grad():
            demo.model(demo.processor([image]))
        groups = patch.stats["groups"][0].numpy()
    (picture, caption), = merged.overlays
    n_merged = int(core.merged_patches(groups).sum())
    assert caption == f"after layer 3: 256 patches -> 64 tokens, {n_merged} merged, 0 dropped" and n_merged > 64
    np.testing.assert_array_equal(np.asarray(picture), np.asarray(core.merge_overlay(image, groups.reshape(16, 16))))


def test_bad_requests_are_messages_and_leave_the_model_unpatched(evqa, image):
    from vlmeff.demo.app import answer
    for args, words in [((None, QUESTION, "cls", 0.25), "no image"), ((image, " ", "cls", 0.25), "type a question"),
                        ((image, QUESTION, "cls", 300), "a count from 1 to 256"),
                        ((image, QUESTION, "tome", 0.25), "not available on this model"),
                        ((image, QUESTION, "pdrop", 0.25), "average budget below 0.5 is out of reach")]:
        picture, table, status = answer(evqa, *args)
        assert picture is None and table == [] and status.startswith("**Input error:**") and words in status, status
        assert not hasattr(evqa.model, "_vlmeff_patch")


def test_concurrent_requests_never_see_each_others_settings(evqa, image):
    settings = [("cls", 0.25), ("fastv", 0.5), ("random", 16), ("pool", 64), ("cls", 1.0), ("visionzip", 32)]
    alone = [evqa.ask(image, QUESTION, m, k) for m, k in settings]
    results, errors = [None] * len(settings), []

    def request(i):
        try:
            results[i] = evqa.ask(image, QUESTION, *settings[i])
        except Exception as error:           # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=request, args=(i,)) for i in range(len(settings)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for got, expected in zip(results, alone):
        assert [r[:2] for r in got.table[:2]] == [r[:2] for r in expected.table[:2]]
        assert got.table[1] == expected.table[1] and got.table[0] == expected.table[0]
        assert [c for _, c in got.overlays] == [c for _, c in expected.overlays]
    assert not hasattr(evqa.model, "_vlmeff_patch")


def test_a_saved_hf_model_loads_from_its_folder(tmp_path, image):
    from lvlm_models import tiny_llava_with_processor
    model, processor = tiny_llava_with_processor()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    demo = DemoModel.load(str(tmp_path))
    assert demo.kind == "lvlm" and "cls" in demo.methods
    result = demo.ask(image, QUESTION, "cls", 4)
    assert result.table[1] == ["visual tokens", "16", "16 -> 4"]
    assert [c for _, c in result.overlays] == ["before LLM: 4 of 16 patches kept"]


def test_cli_and_module_entry_points_take_the_documented_options():
    from vlmeff.cli import build_parser
    args = build_parser().parse_args(["demo"])
    assert (args.model, args.host, args.port, args.share) == ("tiny-llava-evqa", "127.0.0.1", 7860, False)
    args = build_parser().parse_args(["demo", "--model", "tiny-vit-evqa", "--port", "9000", "--share"])
    assert (args.model, args.port, args.share) == ("tiny-vit-evqa", 9000, True)


def test_a_timm_vit_runs_with_its_own_transform(image):
    from models import tiny_timm_vit

    from vlmeff.demo.runner import TimmPreprocess
    model = tiny_timm_vit()                                 # 10 classes, 8 x 8 patches of 32 px
    demo = DemoModel(model, TimmPreprocess(model), "vit", "tiny timm")
    assert demo.processor.classes == [f"class {k}" for k in range(10)]
    result = demo.ask(image, "", "cls", 16)
    assert result.table[1] == ["visual tokens", "64", "64 -> 16"]
    assert [c for _, c in result.overlays] == ["after layer 1: 16 of 64 patches kept"]
    imagenet = TimmPreprocess(tiny_timm_vit(num_classes=1000))
    assert len(imagenet.classes) == 1000 and imagenet.classes[0] != "class 0"


def test_a_model_no_method_applies_to_is_a_clear_error(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification
    ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                         num_attention_heads=4, intermediate_size=64)).save_pretrained(tmp_path)
    with pytest.raises(vlmeff.errors.UnsupportedModelError, match="the demo takes a vision-language model"):
        DemoModel.load(str(tmp_path))
    with pytest.raises(vlmeff.errors.UnsupportedModelError, match="no vlmeff method applies to Linear"):
        DemoModel(torch.nn.Linear(2, 2), None, "vit")
