"""Tiny, randomly initialised models of each supported family, built offline from configs, with
inputs laid out as the family's processor would (placeholder tokens, pixel layouts): for trying the
integration in seconds on a CPU (examples/), for its tests and for benchmarks/bench_integrations.py.

    model = tiny_model("qwen2_vl")
    inputs, timestamps = tiny_inputs("qwen2_vl", model, video=True)
    model(**inputs)

    model, inputs = build("qwen2_vl", size="bench")  # train mode, labels on the text tail

Sizes: "tiny" (tests, examples) and "bench" (a larger language model, the part
rgpt4d.integrations.kernels changes, and a longer text tail); the vision towers are minimal at both.

Token ids of the tiny vocabulary: IMAGE, VIDEO (placeholders), VSTART/VEND (Qwen's vision
start/end), OBJ (the `<obj_1>`, `<obj_2>` tokens the region tokens replace).
"""

from __future__ import annotations

import inspect

import torch
import transformers as tf

VOCAB, IMAGE, VIDEO, VSTART, VEND = 128, 100, 101, 102, 103  # VOCAB: the "tiny" size's vocabulary
OBJ = (60, 61)
# llava_mistral: LLaVA with a Mistral language model (the other families' LMs are Qwen2 / Llama)
FAMILIES = ("llava", "llava_mistral", "llava_onevision", "llava_next_video", "qwen2_vl", "qwen2_5_vl", "qwen3_vl",
            "internvl")
_CLASS = {"llava": "LlavaForConditionalGeneration", "llava_mistral": "LlavaForConditionalGeneration",
          "llava_onevision": "LlavaOnevisionForConditionalGeneration",
          "llava_next_video": "LlavaNextVideoForConditionalGeneration",
          "qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
          "qwen3_vl": "Qwen3VLForConditionalGeneration", "internvl": "InternVLForConditionalGeneration"}
IMG = {"qwen2_vl": 32, "qwen2_5_vl": 32, "qwen3_vl": 32}  # pixels per side (16 for the others)
PATCH = 4
# language model: hidden, layers, heads, kv heads, MLP, vocabulary, positions; TEXT: text tokens build() puts
# after the visual ones (labels on the last half)
SIZES = {"tiny": (64, 2, 4, 2, 128, VOCAB, 512), "bench": (256, 4, 8, 2, 704, 4096, 2048)}
TEXT = {"tiny": 12, "bench": 192}


def available(family: str) -> bool:
    """Whether this transformers has the family's model class."""
    if family not in _CLASS:
        raise ValueError(f"family: one of {FAMILIES}, got {family!r}")
    return hasattr(tf, _CLASS[family])


def _text(size: str = "tiny", **extra) -> dict:
    h, n, a, kv, i, v, pos = SIZES[size]
    return dict(vocab_size=v, hidden_size=h, num_hidden_layers=n, num_attention_heads=a, num_key_value_heads=kv,
                intermediate_size=i, max_position_embeddings=pos, bos_token_id=1, eos_token_id=2, **extra)


def _siglip(size: int) -> dict:
    return dict(model_type="siglip_vision_model", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=64, image_size=size, patch_size=PATCH, vision_use_head=False)


def tiny_model(family: str, size: str = "tiny") -> torch.nn.Module:
    """A tiny `family` model (float32) in eval mode, seeded (same weights on every call); `size`: a key of SIZES."""
    if family not in _CLASS:
        raise ValueError(f"family: one of {FAMILIES}, got {family!r}")
    if size not in SIZES:
        raise ValueError(f"size: one of {tuple(SIZES)}, got {size!r}")
    torch.manual_seed(0)
    hd = SIZES[size][0] // SIZES[size][2]  # head dim: the M-RoPE sections (half of it in all) scale with it
    k = hd // 16
    px = IMG.get(family, 16)  # the frames' pixels per side
    tokens = dict(image_token_id=IMAGE, image_token_index=IMAGE, video_token_id=VIDEO, video_token_index=VIDEO)
    if family in ("llava", "llava_mistral"):
        kind = "qwen2" if family == "llava" else "mistral"
        cfg = tf.LlavaConfig(vision_config=_siglip(px), text_config=_text(size, model_type=kind),
                             vision_feature_select_strategy="full", vision_feature_layer=-1,
                             image_seq_length=(px // PATCH) ** 2, **tokens)
        return tf.LlavaForConditionalGeneration(cfg).eval()
    if family in ("llava_onevision", "llava_next_video"):
        pin = [[px, px], [px, 2 * px], [2 * px, px], [2 * px, 2 * px]]
        g = px // PATCH
        # the *_seq_length settings tell transformers 4.x the inputs are already expanded (as a processor does)
        # LLaVA-NeXT-Video on a Llama LM (its released checkpoints' LM family), the others on Qwen2
        kind = "llama" if family == "llava_next_video" else "qwen2"
        common = dict(vision_config=_siglip(px), text_config=_text(size, model_type=kind), image_grid_pinpoints=pin,
                      vision_feature_select_strategy="full", vision_feature_layer=-1, image_seq_length=g * g,
                      video_seq_length=(-(-g // 2)) ** 2, **tokens)
        if family == "llava_onevision":
            return tf.LlavaOnevisionForConditionalGeneration(tf.LlavaOnevisionConfig(**common)).eval()
        cfg = tf.LlavaNextVideoConfig(spatial_pool_stride=2, spatial_pool_mode="average", **common)
        return tf.LlavaNextVideoForConditionalGeneration(cfg).eval()
    if family == "internvl":
        vc = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                  image_size=[px, px], patch_size=[PATCH, PATCH])
        cfg = tf.InternVLConfig(vision_config=vc, text_config=_text(size, model_type="qwen2"), image_token_id=IMAGE,
                                image_seq_length=(px // PATCH // 2) ** 2)
        return tf.InternVLForConditionalGeneration(cfg).eval()
    qwen = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VSTART, vision_end_token_id=VEND)
    hidden = SIZES[size][0]
    vis = dict(depth=2, num_heads=2, in_channels=3, patch_size=PATCH, spatial_merge_size=2, temporal_patch_size=2)
    # Qwen2(.5)-VL: the text settings flat on the config (transformers 4.x reads them there, 5.x moves them)
    mrope = dict(rope_scaling={"type": "mrope", "mrope_section": [2 * k, 3 * k, 3 * k]})
    if family == "qwen2_vl":
        cfg = tf.Qwen2VLConfig(vision_config=dict(vis, embed_dim=32, hidden_size=hidden, mlp_ratio=2),
                               **_text(size, **mrope), **qwen)
        return tf.Qwen2VLForConditionalGeneration(cfg).eval()
    # Qwen2.5-VL: window 16 px = 2 x 2 merged tokens: a 32 px frame (4 x 4 merged) has 4 windows, so the
    # tower's window reordering is exercised; block 1 attends across the whole frame
    vis = dict(vis, hidden_size=32, intermediate_size=64, out_hidden_size=hidden)
    if family == "qwen2_5_vl":
        cfg = tf.Qwen2_5_VLConfig(vision_config=dict(vis, window_size=16, fullatt_block_indexes=[1]),
                                  **_text(size, **mrope), **qwen)
        return tf.Qwen2_5_VLForConditionalGeneration(cfg).eval()
    if family == "qwen3_vl":
        rope = {"rope_type": "default", "mrope_section": [4 * k, 2 * k, 2 * k], "mrope_interleaved": True}
        cfg = tf.Qwen3VLConfig(vision_config=dict(vis, num_position_embeddings=16, deepstack_visual_indexes=[0]),
                               text_config=_text(size, head_dim=hd, rope_parameters=rope), **qwen)
        return tf.Qwen3VLForConditionalGeneration(cfg).eval()
    raise AssertionError(family)


def tiny_inputs(family: str, model, *, batch: int = 2, frames: int = 4, video: bool = False, seed: int = 0,
                obj: bool = False, text: int = 4, labels: bool = False) -> tuple[dict, torch.Tensor]:
    """(forward kwargs, timestamps [batch, frames] seconds): `frames` frames per sample, as images
    (each image a frame) or, with video=True, as one video per sample; `text` text tokens after,
    `<obj_1>` among them with obj=True. labels=True adds `labels`: the last text//2 tokens, -100
    elsewhere (the prompt and the visual tokens, as an SFT batch)."""
    g = torch.Generator().manual_seed(seed)
    size = IMG.get(family, 16)
    ts = torch.sort(torch.rand(batch, frames, generator=g) * 10, dim=1).values
    text_ids = torch.randint(1, 50, (batch, text), generator=g)
    if obj:
        text_ids[:, 1] = OBJ[0]
    kw: dict = {}
    if family.startswith("qwen"):
        vc = model.config.vision_config
        m, tps, C = vc.spatial_merge_size, vc.temporal_patch_size, vc.in_channels
        n = size // PATCH  # patches per side
        per = (n // m) ** 2  # LM tokens per merged frame
        row = C * tps * PATCH * PATCH
        if video:
            t = frames // tps
            kw["pixel_values_videos"] = torch.randn(batch * t * n * n, row, generator=g)
            kw["video_grid_thw"] = torch.tensor([[t, n, n]] * batch)
            # Qwen3-VL's processor wraps each merged frame in vision start/end; Qwen2(.5)-VL the video
            blocks = [[VSTART] + [VIDEO] * per + [VEND]] * t if family == "qwen3_vl" else \
                [[VSTART] + [VIDEO] * per * t + [VEND]]
        else:
            kw["pixel_values"] = torch.randn(batch * frames * n * n, row, generator=g)
            kw["image_grid_thw"] = torch.tensor([[1, n, n]] * (batch * frames))
            blocks = [[VSTART] + [IMAGE] * per + [VEND]] * frames
        vis = torch.tensor(sum(blocks, []))
    elif video:
        kw["pixel_values_videos"] = torch.randn(batch, frames, 3, size, size, generator=g)
        g2 = size // PATCH
        per = (-(-g2 // 2)) ** 2 * frames + (1 if family == "llava_onevision" else 0)
        vis = torch.full((per,), VIDEO)
    else:
        n = size // PATCH
        per = {"internvl": (n // 2) ** 2, "llava_onevision": n * n + 1}.get(family, n * n)
        if family == "llava_next_video":
            raise ValueError("tiny_inputs: LLaVA-NeXT-Video images are any-resolution crops; use video=True")
        if family == "llava_onevision":  # several images per sample: one crop each (no any-res tiling)
            if "batch_num_images" not in inspect.signature(type(model).forward).parameters:
                raise NotImplementedError("tiny_inputs: this transformers' LLaVA-OneVision has no multi-image input "
                                          "(batch_num_images)")
            kw["pixel_values"] = torch.randn(batch * frames, 1, 3, size, size, generator=g)
            kw["image_sizes"] = torch.tensor([[size, size]] * (batch * frames))
            kw["batch_num_images"] = torch.tensor([frames] * batch)
        else:
            kw["pixel_values"] = torch.randn(batch * frames, 3, size, size, generator=g)
        vis = torch.full((per * frames,), IMAGE)
    ids = torch.cat([torch.full((batch, 1), 5), vis.expand(batch, -1), text_ids], 1)
    kw["input_ids"] = ids
    if labels:
        kw["labels"] = torch.full_like(ids, -100)
        kw["labels"][:, ids.shape[1] - text // 2:] = ids[:, ids.shape[1] - text // 2:]
    if "mm_token_type_ids" in inspect.signature(type(model).forward).parameters:  # transformers 5 M-RoPE
        kw["mm_token_type_ids"] = (ids == IMAGE).long() + 2 * (ids == VIDEO).long()
    return kw, ts


def build(family: str, size: str = "tiny", batch: int = 2, seed: int = 0) -> tuple[torch.nn.Module, dict]:
    """(tiny_model(family, size) in train mode, forward kwargs with labels): 4 frames per sample, as
    images, or as a video for the LLaVA-OneVision / NeXT-Video families (whose image input is
    any-resolution crops), then TEXT[size] text tokens. For training-step tests and benchmarks."""
    model = tiny_model(family, size).train()
    video = family in ("llava_onevision", "llava_next_video")
    inputs, _ = tiny_inputs(family, model, batch=batch, video=video, seed=seed, text=TEXT[size], labels=True)
    return model, inputs
