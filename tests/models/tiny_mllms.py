"""Small MLLMs of every family the integration supports, built offline from configs, with one batch of
inputs (images or video frames, their placeholder tokens, labels on the text tail).

    model, inputs = build("qwen2_vl", size="tiny")     # size "tiny" (tests) or "bench" (benchmarks)

Randomly initialised (seed 0), float32. The vision parts are minimal at both sizes; "bench" grows the
language model (the part apply_kernels changes) and the sequence.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

FAMILIES = ("llava", "llava_mistral", "llava_onevision", "llava_next_video", "qwen2_vl", "qwen2_5_vl", "internvl",
            "qwen3_vl")

# language-model sizes: hidden, layers, heads, kv heads, intermediate, vocab, text tokens per sample
_SIZES = {"tiny": (64, 2, 4, 2, 128, 160, 12), "bench": (256, 4, 8, 2, 704, 4096, 192)}
IMAGE_ID, VIDEO_ID, START_ID, END_ID = 150, 151, 152, 153


def available(family: str) -> bool:
    """Whether this transformers has the family's model class."""
    import transformers

    return hasattr(transformers, _CLASS[family])


_CLASS = {"llava": "LlavaForConditionalGeneration", "llava_mistral": "LlavaForConditionalGeneration",
          "llava_onevision": "LlavaOnevisionForConditionalGeneration",
          "llava_next_video": "LlavaNextVideoForConditionalGeneration",
          "qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
          "internvl": "InternVLForConditionalGeneration", "qwen3_vl": "Qwen3VLForConditionalGeneration"}


def _text(kind: str, size: str) -> dict:
    h, n, a, kv, i, v, _ = _SIZES[size]
    return dict(vocab_size=v, hidden_size=h, num_hidden_layers=n, num_attention_heads=a, num_key_value_heads=kv,
                intermediate_size=i, max_position_embeddings=2048, model_type=kind, tie_word_embeddings=False,
                bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _siglip(image: int, patch: int) -> dict:
    return dict(model_type="siglip_vision_model", hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=64, image_size=image, patch_size=patch, vision_use_head=False)


def _sequence(g, B: int, n_visual: int, token: int, size: str, start: int | None = None, end: int | None = None):
    """input_ids [B, L]: a text token, (start), n_visual placeholders, (end), the text tail; labels on the tail
    (the prompt and the visual tokens are -100, as an SFT batch); mm_token_type_ids (1 image, 2 video)."""
    n_text = _SIZES[size][6]
    vocab = _SIZES[size][5]
    head = [torch.full((B, 1), 5)] + ([torch.full((B, 1), start)] if start is not None else [])
    text = torch.randint(10, min(vocab, 140), (B, n_text), generator=g)  # below the special ids (150+)
    tail = ([torch.full((B, 1), end)] if end is not None else []) + [text]
    ids = torch.cat(head + [torch.full((B, n_visual), token)] + tail, 1)
    labels = torch.full_like(ids, -100)
    labels[:, -n_text // 2:] = ids[:, -n_text // 2:]
    mm = torch.zeros_like(ids, dtype=torch.int32)
    mm[ids == token] = 1 if token == IMAGE_ID else 2
    return ids, labels, mm


def build(family: str, size: str = "tiny", B: int = 2, seed: int = 0):
    """(model in train mode, float32; inputs: a dict for model(**inputs), labels included)."""
    import transformers as tf

    if family not in _CLASS:
        raise ValueError(f"build: family must be one of {FAMILIES}, got {family!r}")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    if family in ("llava", "llava_mistral"):
        S, P, T = 32, 8, 2  # 2 images of 4x4 patches
        cfg = tf.LlavaConfig(vision_config=_siglip(S, P), text_config=_text("qwen2" if family == "llava" else "mistral",
                                                                              size),
                             image_token_index=IMAGE_ID, vision_feature_select_strategy="full",
                             vision_feature_layer=-1, image_seq_length=(S // P) ** 2)
        model = tf.LlavaForConditionalGeneration(cfg)
        ids, labels, _ = _sequence(g, B, T * (S // P) ** 2, IMAGE_ID, size)
        inputs = dict(input_ids=ids, pixel_values=torch.randn(B * T, 3, S, S, generator=g), labels=labels)
    elif family in ("llava_onevision", "llava_next_video"):
        S, P, F = 32, 8, 4
        if family == "llava_onevision":
            cfg = tf.LlavaOnevisionConfig(vision_config=_siglip(S, P), text_config=_text("qwen2", size),
                                          video_token_index=VIDEO_ID, image_token_index=IMAGE_ID,
                                          vision_feature_select_strategy="full", vision_feature_layer=-1)
            model = tf.LlavaOnevisionForConditionalGeneration(cfg)
        else:
            vc = dict(model_type="clip_vision_model", hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=64, image_size=S, patch_size=P, projection_dim=32)
            cfg = tf.LlavaNextVideoConfig(vision_config=vc, text_config=_text("llama", size),
                                          video_token_index=VIDEO_ID, image_token_index=IMAGE_ID,
                                          vision_feature_select_strategy="default", vision_feature_layer=-1,
                                          spatial_pool_stride=2)
            model = tf.LlavaNextVideoForConditionalGeneration(cfg)
        pv = torch.randn(B, F, 3, S, S, generator=g)
        with torch.no_grad():
            n = _video_tokens(model, pv[:1])
        ids, labels, _ = _sequence(g, B, n, VIDEO_ID, size)
        inputs = dict(input_ids=ids, pixel_values_videos=pv, labels=labels)
    elif family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        P, M, TP = 4, 2, 2  # patch, spatial merge, temporal patch
        grid = torch.tensor([[1, 4, 6]] * B)  # per image: 1 x 4 x 6 patches -> 6 tokens after the 2x2 merge
        tc = _text({"qwen2_vl": "qwen2_vl_text", "qwen2_5_vl": "qwen2_5_vl_text", "qwen3_vl": "qwen3_vl_text"}[family],
                   size)
        head_dim = tc["hidden_size"] // tc["num_attention_heads"]
        sec = [head_dim // 8, head_dim // 8 * 3 // 2, head_dim // 2 - head_dim // 8 - head_dim // 8 * 3 // 2]
        tc["rope_parameters"] = dict(rope_type="default", rope_theta=10000.0, mrope_section=sec)
        common = dict(patch_size=P, spatial_merge_size=M, temporal_patch_size=TP, in_channels=3)
        if family == "qwen2_vl":
            vc = dict(depth=1, embed_dim=32, hidden_size=tc["hidden_size"], num_heads=2, mlp_ratio=2, **common)
            cls, ccls = tf.Qwen2VLForConditionalGeneration, tf.Qwen2VLConfig
        elif family == "qwen2_5_vl":
            vc = dict(depth=2, hidden_size=32, out_hidden_size=tc["hidden_size"], num_heads=2, intermediate_size=64,
                      window_size=8, fullatt_block_indexes=[1], **common)
            cls, ccls = tf.Qwen2_5_VLForConditionalGeneration, tf.Qwen2_5_VLConfig
        else:
            tc["head_dim"] = head_dim
            tc["rope_parameters"]["mrope_interleaved"] = True
            vc = dict(depth=2, hidden_size=32, out_hidden_size=tc["hidden_size"], num_heads=2, intermediate_size=64,
                      num_position_embeddings=64, deepstack_visual_indexes=[0], **common)
            cls, ccls = tf.Qwen3VLForConditionalGeneration, tf.Qwen3VLConfig
        cfg = ccls(vision_config=vc, text_config=tc, image_token_id=IMAGE_ID, video_token_id=VIDEO_ID,
                   vision_start_token_id=START_ID, vision_end_token_id=END_ID)
        model = cls(cfg)
        n = int(grid[0].prod()) // (M * M)
        ids, labels, mm = _sequence(g, B, n, IMAGE_ID, size, start=START_ID, end=END_ID)
        pv = torch.randn(int(grid.prod(-1).sum()), 3 * TP * P * P, generator=g)
        inputs = dict(input_ids=ids, pixel_values=pv, image_grid_thw=grid, mm_token_type_ids=mm, labels=labels)
    else:  # internvl
        S, P = 32, 8
        vc = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=[S, S],
                  patch_size=[P, P])
        n = (S // P) ** 2 // 4  # pixel shuffle 0.5: 4x4 patches -> 2x2 tokens
        cfg = tf.InternVLConfig(vision_config=vc, text_config=_text("qwen2", size), image_token_id=IMAGE_ID,
                                image_seq_length=n, downsample_ratio=0.5, vision_feature_select_strategy="default")
        model = tf.InternVLForConditionalGeneration(cfg)
        ids, labels, _ = _sequence(g, B, 2 * n, IMAGE_ID, size)
        inputs = dict(input_ids=ids, pixel_values=torch.randn(2 * B, 3, S, S, generator=g), labels=labels)
    return model.float().train(), inputs


def _video_tokens(model, pv) -> int:
    """Placeholder tokens one video of pv [1, F, 3, S, S] takes (the model's own pooling decides)."""
    out = model.model.get_video_features(pixel_values_videos=pv)
    feats = getattr(out, "pooler_output", out)
    if isinstance(feats, (list, tuple)):
        feats = feats[0]
    return int(feats.reshape(-1, feats.shape[-1]).shape[0])
