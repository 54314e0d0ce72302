"""Tiny random-initialised LVLMs of every supported family and their inputs, built from configs offline."""
import torch
from transformers import (CLIPVisionConfig, Gemma3Config, Gemma3ForConditionalGeneration, InternVLConfig,
                          InternVLForConditionalGeneration, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                          LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaOnevisionConfig,
                          LlavaOnevisionForConditionalGeneration, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                          Qwen2Config, Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen3VLConfig,
                          Qwen3VLForConditionalGeneration, Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration,
                          SiglipVisionConfig)

IMAGE, VIDEO, START, END, PAD = 100, 101, 98, 99, 0


def tiny_llava(strategy="default"):
    """CLIP tower (32 px, patch 8: 16 patches + [CLS], 3 layers) + Llama (4 layers, GQA)."""
    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=32, patch_size=8)
    text = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=PAD,
                       bos_token_id=1, eos_token_id=2, initializer_range=0.2)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE, vision_feature_layer=-2,
                      vision_feature_select_strategy=strategy)
    return LlavaForConditionalGeneration(cfg).eval()


def tiny_llava_with_processor(attention="sdpa", padding_side="left"):
    """(model, processor) for the evaluation tests: a tiny random LLaVA (CLIP 32 px, patch 8: 16 patches + [CLS];
    Llama 2 layers) with the embedded models' word-level tokenizer, chat template and `LlavaProcessor`."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    from vlmeff.zoo import build

    torch.manual_seed(0)
    tokenizer = build.build_tokenizer()
    tokenizer.padding_side = padding_side
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer, patch_size=8, chat_template=build.CHAT_TEMPLATE,
        vision_feature_select_strategy="default", num_additional_image_tokens=1)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, initializer_range=0.2)
    cfg = LlavaConfig(vision_config=vision, text_config=text, vision_feature_layer=-2,
                      image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    cfg._attn_implementation = attention
    model = LlavaForConditionalGeneration(cfg).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, processor


def prompt(text_before, n_images, text_after, tokens_per_image=16):
    ids = list(text_before)
    for _ in range(n_images):
        ids += [IMAGE] * tokens_per_image + [3]
    return ids + list(text_after)


def batch(prompts, side="left"):
    """Pad a list of id lists into (input_ids, attention_mask)."""
    L = max(map(len, prompts))
    ids = torch.full((len(prompts), L), PAD)
    mask = torch.zeros(len(prompts), L, dtype=torch.long)
    for i, p in enumerate(prompts):
        span = slice(L - len(p), L) if side == "left" else slice(0, len(p))
        ids[i, span], mask[i, span] = torch.tensor(p), 1
    return ids, mask


def pixels(n, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def generate(model, inputs, **kwargs):
    """Greedy, 4 new tokens, never the image placeholder (a generated placeholder breaks no-cache runs)."""
    image = getattr(model.config, "image_token_id", IMAGE)
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=4, do_sample=False, suppress_tokens=[image], **kwargs)


class Recorder:
    """Arguments of the latest call of a module (forward pre-hook)."""

    def __init__(self, module):
        self.args = self.kwargs = None
        self.handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.args, self.kwargs = args, kwargs

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def language_model_inputs(model, inputs):
    """(inputs_embeds [B, L, D], position ids [B, L] or M-RoPE's [3, B, L]) that the unpatched `model` hands its
    language model for `inputs`, recorded by a pre-hook; positions arange(L) when the model passes none."""
    with Recorder(model.model.language_model) as rec, torch.no_grad():
        model(**inputs)
    embeds, positions = rec.kwargs["inputs_embeds"], rec.kwargs.get("position_ids")
    B, L = embeds.shape[:2]
    if positions is None:
        positions = torch.arange(L).expand(B, L)
    if positions.dim() == 3 and positions.shape[0] == 4:          # Qwen-VL: a text row ahead of (t, h, w)
        positions = positions[1:]
    return embeds, positions


# -- LLaVA-NeXT, LLaVA-OneVision, InternVL, Gemma 3 ------------------------------------------------------------
TEXT = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, pad_token_id=PAD, bos_token_id=1, eos_token_id=2,
            initializer_range=0.2)
TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4)
PINPOINTS = [[32, 64], [64, 32], [64, 64]]     # 32 px views of 4 x 4 patches: 1 x 2, 2 x 1 or 2 x 2 crops


# -- tiny models --------------------------------------------------------------------------------------------------
def tiny_next():
    torch.manual_seed(0)
    cfg = LlavaNextConfig(vision_config=CLIPVisionConfig(**TOWER, image_size=32, patch_size=8),
                          text_config=LlamaConfig(**TEXT), image_token_id=IMAGE, image_grid_pinpoints=PINPOINTS)
    return LlavaNextForConditionalGeneration(cfg).eval()


def tiny_onevision(aspect="anyres_max_9"):
    torch.manual_seed(0)
    cfg = LlavaOnevisionConfig(vision_config=SiglipVisionConfig(**TOWER, image_size=32, patch_size=8),
                               text_config=Qwen2Config(**TEXT), image_token_id=IMAGE, video_token_id=101,
                               image_grid_pinpoints=PINPOINTS, vision_aspect_ratio=aspect)
    return LlavaOnevisionForConditionalGeneration(cfg).eval()


def tiny_internvl():
    torch.manual_seed(0)
    cfg = InternVLConfig(vision_config=dict(**TOWER, image_size=[32, 32], patch_size=[8, 8], use_qk_norm=True),
                         text_config=dict(model_type="qwen2", **TEXT), image_token_id=IMAGE)
    model = InternVLForConditionalGeneration(cfg).eval()
    with torch.no_grad():                       # make the q/k norms matter (they start as all-ones scales)
        for layer in model.model.vision_tower.encoder.layer:
            layer.attention.q_norm.weight.uniform_(0.5, 2.0)
            layer.attention.k_norm.weight.uniform_(0.5, 2.0)
    return model


def tiny_gemma3():
    """SigLIP 64 px / patch 8 (8 x 8 patches) pooled to 4 x 4 = 16 tokens per image; sliding + full LM layers."""
    torch.manual_seed(0)
    text = dict(TEXT, head_dim=16, sliding_window=6, layer_types=["sliding_attention", "full_attention"])
    cfg = Gemma3Config(vision_config=dict(**TOWER, image_size=64, patch_size=8), text_config=text,
                       mm_tokens_per_image=16, image_token_id=IMAGE, boi_token_index=98, eoi_token_index=99)
    model = Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():                       # the projector starts at zero: give the images a voice
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.3)
    return model


# -- inputs -------------------------------------------------------------------------------------------------------
def pad_left(prompts):
    L = max(map(len, prompts))
    ids = torch.full((len(prompts), L), PAD)
    mask = torch.zeros(len(prompts), L, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):], mask[i, L - len(p):] = torch.tensor(p), 1
    return ids, mask


def prompts_for(counts):
    """Two samples with different text lengths, one image run each (`counts` placeholders)."""
    heads, tails = [[1, 5, 6], [1, 5]], [[98], [98]]
    return [h + [IMAGE] * c + t + [7, 8, 9] for h, c, t in zip(heads, counts, tails)]


def anyres_inputs(model):
    """Image 0: 40 x 60 px -> base + 2 x 2 crops; image 1: 30 x 30 px -> base + 1 x 2 crops (3 of 5 view slots)."""
    pixel_values = torch.randn(2, 5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    sizes = torch.tensor([[40, 60], [30, 30]])
    counts = [f.shape[0] for f in model.model.get_image_features(pixel_values, sizes).pooler_output]
    ids, mask = pad_left(prompts_for(counts))
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, image_sizes=sizes)


def internvl_inputs(model):
    """Sample 0: an image of 2 tiles (2 x 4 tokens), sample 1: an image of 1 tile."""
    ids, mask = pad_left(prompts_for([8, 4]))
    pixel_values = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixel_values)


def gemma3_inputs(model):
    ids, mask = pad_left(prompts_for([16, 16]))
    pixel_values = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, token_type_ids=(ids == IMAGE).long())


FAMILIES = {
    "next": (tiny_next, anyres_inputs),
    "onevision": (tiny_onevision, anyres_inputs),
    "onevision_shrunk": (lambda: tiny_onevision("anyres_max_1"), anyres_inputs),   # big crop grids interpolated
    "internvl": (tiny_internvl, internvl_inputs),
    "gemma3": (tiny_gemma3, gemma3_inputs),
}
SCORER = {"next": "cls", "onevision": "received", "onevision_shrunk": "received", "internvl": "received",
          "gemma3": "received"}


def setup(family):
    build, inputs = FAMILIES[family]
    model = build()
    return model, inputs(model)


# -- Qwen2-VL, Qwen2.5-VL, Qwen3-VL (-MoE): patch 4, merge 2, an image of h x w patches gives h * w / 4 tokens ---
PATCH_DIM = 3 * 2 * 4 * 4            # channels x temporal patch x patch x patch


def tiny_qwen(family):
    torch.manual_seed(0)
    rope = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]}
    text = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, rope_parameters=rope, pad_token_id=PAD,
                bos_token_id=1, eos_token_id=2, initializer_range=0.2)
    tokens = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=START, vision_end_token_id=END)
    vision = dict(patch_size=4, temporal_patch_size=2, spatial_merge_size=2, num_heads=4)
    if family == "qwen2":
        cfg = Qwen2VLConfig(vision_config=dict(depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2, **vision),
                            text_config=text, **tokens)
        return Qwen2VLForConditionalGeneration(cfg).eval()
    if family == "qwen2_5":       # windows of 2 x 2 merged tokens; block 1 is the only full-attention block
        cfg = Qwen2_5_VLConfig(vision_config=dict(depth=3, hidden_size=32, intermediate_size=64, out_hidden_size=64,
                                                  window_size=16, fullatt_block_indexes=[1], **vision),
                               text_config=text, **tokens)
        return Qwen2_5_VLForConditionalGeneration(cfg).eval()
    vision3 = dict(depth=3, hidden_size=32, intermediate_size=64, out_hidden_size=64, num_position_embeddings=16,
                   deepstack_visual_indexes=[0, 1], **vision)
    text3 = dict(text, head_dim=16, rope_parameters=dict(rope, mrope_interleaved=True))
    if family == "qwen3":
        return Qwen3VLForConditionalGeneration(Qwen3VLConfig(vision_config=vision3, text_config=text3, **tokens)).eval()
    text3.update(moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2)
    return Qwen3VLMoeForConditionalGeneration(Qwen3VLMoeConfig(vision_config=vision3, text_config=text3,
                                                               **tokens)).eval()


# samples: text id lists and images (h, w, seed), h x w patches of pixels drawn with that seed
A = [[1, 5, 6], (8, 8, 1), [7, 8, 9]]                             # one image, 16 tokens
B = [[1, 9], (4, 8, 2), [10, 11], (8, 4, 3), [12, 13, 14, 15]]    # two images of 8 tokens, grids 2 x 4 and 4 x 2
C = [[1, 20, 21, 22, 23, 24]]                                     # text only


def qwen_inputs(samples):
    """Left-padded batch: input_ids, attention_mask, mm_token_type_ids, pixel_values, image_grid_thw."""
    prompts, pixels, grids = [], [], []
    for sample in samples:
        ids = []
        for part in sample:
            if isinstance(part, tuple):
                h, w, seed = part
                ids += [START] + [IMAGE] * (h * w // 4) + [END]
                pixels.append(torch.randn(h * w, PATCH_DIM, generator=torch.Generator().manual_seed(seed)))
                grids.append([1, h, w])
            else:
                ids += part
        prompts.append(ids)
    L = max(map(len, prompts))
    ids = torch.full((len(prompts), L), PAD)
    mask = torch.zeros(len(prompts), L, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):], mask[i, L - len(p):] = torch.tensor(p), 1
    out = dict(input_ids=ids, attention_mask=mask, mm_token_type_ids=(ids == IMAGE).int())
    if pixels:
        out.update(pixel_values=torch.cat(pixels), image_grid_thw=torch.tensor(grids))
    return out


# -- every family -------------------------------------------------------------------------------------------------
def llava_inputs(model):
    """Two left-padded samples of different text lengths, one image each."""
    ids, mask = batch([prompt([1, 5, 6], 1, [7, 8, 9]), prompt([1, 5], 1, [7, 8, 9, 10, 11])])
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels(2))


EVERY_FAMILY = {
    "llava": (tiny_llava, llava_inputs),
    **{name: FAMILIES[name] for name in ("next", "onevision", "internvl", "gemma3")},
    **{name: (lambda name=name: tiny_qwen(name), lambda model: qwen_inputs([A, B]))
       for name in ("qwen2", "qwen2_5", "qwen3")},
}
SCORER.update(llava="cls", qwen2="received", qwen2_5="received", qwen3="received")


def setup_any(family):
    """(model, two-sample left-padded inputs with images) of any family in EVERY_FAMILY."""
    build, inputs = EVERY_FAMILY[family]
    model = build()
    return model, inputs(model)


# -- generate modes, a single sample, labels: shared by the pre-LLM and in-LLM tests ------------------------------
def single(inputs):
    """Sample 0 of a two-sample batch of any family, unpadded, with its own images (assisted decoding: batch 1)."""
    if "image_grid_thw" in inputs:
        return qwen_inputs([A])
    valid = inputs["attention_mask"][0].bool()
    out = {k: v[:1, valid] for k, v in inputs.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    pixel_values = inputs["pixel_values"]
    out["pixel_values"] = pixel_values[:2] if pixel_values.shape[0] == 3 else pixel_values[:1]   # internvl: 2 tiles
    if "image_sizes" in inputs:
        out["image_sizes"] = inputs["image_sizes"][:1]
    return out


GENERATE_MODES = {
    "greedy": dict(do_sample=False),
    "sample": dict(do_sample=True, top_k=20),
    "beams": dict(do_sample=False, num_beams=3),
    "sample_n": dict(do_sample=True, num_return_sequences=2),
    "beams_n": dict(do_sample=False, num_beams=3, num_return_sequences=2),
    "beam_scores": dict(do_sample=False, num_beams=3, num_return_sequences=2, return_dict_in_generate=True,
                        output_scores=True, output_logits=True),
    "prompt_lookup": dict(do_sample=False, prompt_lookup_num_tokens=2),
    "assistant": dict(do_sample=False),          # assistant_model: an unpatched copy
}


def run_generate(model, inputs, mode, assistant, **extra):
    kwargs = dict(GENERATE_MODES[mode], max_new_tokens=3, suppress_tokens=[IMAGE], **extra)
    if mode == "assistant":
        kwargs["assistant_model"] = assistant
    if mode in ("prompt_lookup", "assistant"):       # transformers runs assisted decoding at batch size 1
        inputs = single(inputs)
    torch.manual_seed(0)
    with torch.no_grad():
        return model.generate(**inputs, **kwargs)


def labelled(inputs):
    """inputs with labels: every attended text token its own id, placeholders and padding -100. The first two
    text tokens of the shorter sample are masked as well, so that the samples differ by at least two tokens after the
    reduction (new pad slots beyond the first column, whose label is never a target)."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"].clone()
    short = int(mask.sum(1).argmin())
    first = int(mask[short].argmax())
    mask[short, first:first + 2] = 0
    return dict(inputs, attention_mask=mask, labels=ids.masked_fill((ids == IMAGE) | (mask == 0), -100))


def assert_same_generation(out, ref, beam_indices=True):
    """Two generate outputs are the same: ids, or (return_dict_in_generate) sequences, scores and beams."""
    if torch.is_tensor(ref):
        assert torch.equal(out, ref)
        return
    assert torch.equal(out.sequences, ref.sequences)
    assert torch.equal(out.sequences_scores, ref.sequences_scores)
    assert torch.equal(torch.stack(out.scores), torch.stack(ref.scores))
    if beam_indices:
        assert torch.equal(out.beam_indices, ref.beam_indices)
