"""Students from pretrained weights (rgpt4d.models.loaders): tiny checkpoints written here in the exact
layouts (Hugging Face SigLIP / Qwen2 / tokenizer.json folders; the NVILA folder of docs/checkpoints.md),
loaded, and checked against the written weights and a plain forward written from the documented layout."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from rgpt4d.models.pretrained import QWEN2_CHAT_TEMPLATE

IMG, PATCH, T = 28, 4, 3  # a 7x7 patch grid: NVILA's zero padding to 9x9 -> 3x3 tokens per frame
M = 3 * 3
VISION = dict(hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32, image_size=IMG,
              patch_size=PATCH)
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
NVILA_SPECIALS = ["[BOS]", "[PAD]", "<vila/sentinel>", "<image>", "<vila/video>"]
QUESTION = "How far does the red box move? (A) 1 m (B) 2 m\nAnswer with the option's letter."


def _tokenizer(extra=(), template=True):
    """A byte-level BPE built with `tokenizers`, wrapped as Qwen2's fast tokenizer is (eos <|im_end|>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=QWEN_SPECIALS + list(extra), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([QUESTION, "system user assistant You are a helpful assistant\n\n"] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   extra_special_tokens=list(extra),
                                   chat_template=QWEN2_CHAT_TEMPLATE if template else None)


def _towers(vocab, head=True):
    from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    vision = SiglipVisionModel(SiglipVisionConfig(**VISION, vision_use_head=head))
    llm = Qwen2ForCausalLM(Qwen2Config(hidden_size=24, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, intermediate_size=48, vocab_size=vocab,
                                       max_position_embeddings=512, tie_word_embeddings=False, rope_theta=1e6))
    with torch.no_grad():  # visibly non-default values everywhere (norms, biases) so a missed copy shows
        for p in list(vision.parameters()) + list(llm.parameters()):
            p.add_(torch.randn_like(p) * 0.05)
    return vision.eval(), llm.eval()


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    tok = _tokenizer()
    vision, llm = _towers(len(tok))
    vision.save_pretrained(root / "vision")
    llm.save_pretrained(root / "llm")
    tok.save_pretrained(root / "tokenizer")
    return root, vision, llm


def _frames(seed=0, b=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, T, 3, IMG, IMG, generator=g), torch.tensor([[0.0, 0.4, 1.1]] * b)


def _inputs(model, tok, b=1, answers=None):
    from rgpt4d.models.tokenizer import encode_batch

    enc = encode_batch(tok, [QUESTION] * b, model.config.prompt_visual(), answers)
    frames, ts = _frames(b=b)
    return dict(enc, frames=frames, timestamps=ts)


# ---------------------------------------------------------------------------------------------
# from_parts
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def from_parts(parts):
    from rgpt4d.models.student import RGPT4DForConditionalGeneration

    root = parts[0]
    torch.manual_seed(1)
    return RGPT4DForConditionalGeneration.from_parts(root / "vision", root / "llm", root / "tokenizer",
                                                     num_frames=T, region_mode="tokens", max_regions=3)


def test_from_parts_keeps_the_checkpoint_weights(parts, from_parts):
    _, vision, llm = parts
    model, tok = from_parts, from_parts.tokenizer
    got = model.vision_tower.state_dict()
    for k, v in vision.state_dict().items():
        if not k.startswith("head."):
            assert torch.equal(got[k], v), k
    assert not any(k.startswith("head.") for k in got)  # the unused pooling head is not built
    got = model.language_model.state_dict()
    rows = llm.get_input_embeddings().weight.shape[0]
    for k, v in llm.state_dict().items():
        if k in ("model.embed_tokens.weight", "lm_head.weight"):
            assert got[k].shape[0] == len(tok) > rows, k  # grown for the added tokens...
            assert torch.equal(got[k][:rows], v), k  # ...the existing rows kept
        else:
            assert torch.equal(got[k], v), k
    assert model.config.text_config["vocab_size"] == len(tok)
    vocab = tok.get_vocab()
    assert [vocab[f"<obj_{n}>"] for n in (1, 2, 3)] == model.config.obj_token_ids
    assert vocab["<image>"] == model.config.image_token_id and tok.eos_token == "<|im_end|>"
    assert model.projector.norm_2 is None and model.projector.linear_1.out_features == 4 * VISION["hidden_size"]
    assert not any(p.requires_grad for p in model.vision_tower.parameters())


def test_from_parts_prompt_uses_the_chat_template(from_parts):
    tok = from_parts.tokenizer
    ids = _inputs(from_parts, tok)["input_ids"][0].tolist()
    image = from_parts.config.image_token_id
    assert ids.count(image) == T * M and ids.index(image) + T * M == len(ids) - ids[::-1].index(image)
    text = tok.decode([i for i in ids if i != image])
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\n")
    assert text.endswith(QUESTION + "<|im_end|>\n<|im_start|>assistant\n") and "<|user|>" not in text


def test_own_tokenizer_prompts_are_unchanged():
    """The visual block goes in after tokenizing (one `<image>` mark, then replaced): with the
    project's own tokenizer the ids are exactly those of the `<|user|>`...`<|assistant|>` text."""
    from rgpt4d.data.schema import format_prompt
    from rgpt4d.models.tokenizer import chat_text, encode_batch, train_tokenizer

    tok = train_tokenizer(vocab_size=600)
    prompt = format_prompt("How far does <obj_2> move from <obj_1>?", ["1 m", "2 m"])
    for restate in (False, "line", "answer"):
        for n in (0, 7):
            got = encode_batch(tok, [prompt], n, restate=restate)["input_ids"][0].tolist()
            assert got == tok.encode(chat_text(prompt, n, restate), add_special_tokens=False), (restate, n)
    with pytest.raises(ValueError, match="must not contain '<image>'"):
        encode_batch(tok, ["look: <image>"], 3)


def test_from_parts_without_chat_template_adds_turn_tokens(parts):
    from rgpt4d.models.pretrained import prepare_tokenizer

    tok = prepare_tokenizer(_tokenizer(template=False), regions=2)
    vocab = tok.get_vocab()
    assert {"<|user|>", "<|assistant|>", "<image>", "<obj_1>", "<obj_2>"} <= set(vocab)
    with_template = prepare_tokenizer(_tokenizer(), regions=0)
    assert "<|user|>" not in with_template.get_vocab() and "<obj_1>" not in with_template.get_vocab()


def test_from_parts_trains_generates_and_round_trips(from_parts, tmp_path):
    from rgpt4d.models.student import RGPT4DForConditionalGeneration

    model, tok = from_parts, from_parts.tokenizer
    letter = tok.encode("A", add_special_tokens=False) + [tok.eos_token_id]
    inputs = _inputs(model, tok, b=2, answers=[letter, letter])
    inputs["boxes"] = torch.tensor([[[2.0, 3.0, 20.0, 25.0]]] * 2)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    before = model.projector.linear_1.weight.detach().clone()
    loss = model(**inputs).loss
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad and p.grad is not None:
            assert torch.isfinite(p.grad).all(), name
    assert model.projector.linear_1.weight.grad.abs().sum() > 0
    assert model.language_model.lm_head.weight.grad.abs().sum() > 0
    opt.step()
    opt.zero_grad()
    assert not torch.equal(before, model.projector.linear_1.weight)
    model.eval()
    plain = _inputs(model, tok)
    new = model.generate(**plain, max_new_tokens=3)
    assert new.shape[0] == 1 and 1 <= new.shape[1] <= 3

    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    again = RGPT4DForConditionalGeneration.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        a, b = model(**plain).logits, again(**plain).logits
    assert torch.equal(a, b)
    assert torch.equal(model.generate(**plain, max_new_tokens=3), again.generate(**plain, max_new_tokens=3))


def test_from_parts_accepts_built_objects(parts):
    from rgpt4d.models.student import RGPT4DForConditionalGeneration

    _, vision, llm = parts
    model = RGPT4DForConditionalGeneration.from_parts(vision, llm, _tokenizer(), num_frames=T, region_mode="none")
    assert model.vision_tower is vision
    assert "<obj_1>" not in model.tokenizer.get_vocab()


def test_from_parts_bad_input(parts, tmp_path):
    from rgpt4d.models.student import RGPT4DForConditionalGeneration

    root = parts[0]
    with pytest.raises(FileNotFoundError, match="vision_model: .* is not a directory"):
        RGPT4DForConditionalGeneration.from_parts(tmp_path / "nope", root / "llm", root / "tokenizer")
    with pytest.raises(TypeError, match="language_model: expected a Qwen2ForCausalLM"):
        RGPT4DForConditionalGeneration.from_parts(root / "vision", torch.nn.Linear(2, 2), root / "tokenizer")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="tokenizer: no tokenizer.json"):
        RGPT4DForConditionalGeneration.from_parts(root / "vision", root / "llm", tmp_path / "empty")


# ---------------------------------------------------------------------------------------------
# from_nvila: the folder, and a plain forward written from the documented layout
# ---------------------------------------------------------------------------------------------


def write_nvila(root, *, projector_type="mlp_downsample_3x3_fix", frames=T):
    """A tiny NVILA folder: config.json, llm/ (Qwen2 + tokenizer with NVILA's added tokens),
    vision_tower/ (SigLIP, no head), mm_projector/ (config + model.safetensors, keys layers.N.*)."""
    from safetensors.torch import save_file

    tok = _tokenizer(extra=NVILA_SPECIALS)
    # Qwen2-Instruct's own system line ends with "."; VILA replaces the template with the "qwen2" its config names
    tok.chat_template = QWEN2_CHAT_TEMPLATE.replace("helpful assistant<", "helpful assistant.<")
    vision, llm = _towers(len(tok), head=False)
    vision.save_pretrained(root / "vision_tower")  # the config; the weights under their checkpoint names:
    save_file({f"vision_model.{k}": v.contiguous() for k, v in vision.state_dict().items()},
              str(root / "vision_tower" / "model.safetensors"), metadata={"format": "pt"})
    llm.save_pretrained(root / "llm", max_shard_size="40KB")  # sharded, with an index
    assert (root / "llm" / "model.safetensors.index.json").exists()
    tok.save_pretrained(root / "llm")
    m, d = VISION["hidden_size"], llm.config.hidden_size
    g = torch.Generator().manual_seed(3)

    def rnd(*shape, scale=0.3):
        return torch.randn(*shape, generator=g) * scale

    layers = {"layers.1.weight": 1 + rnd(9 * m), "layers.1.bias": rnd(9 * m),
              "layers.2.weight": rnd(3 * m, 9 * m), "layers.2.bias": rnd(3 * m),
              "layers.4.weight": 1 + rnd(3 * m), "layers.4.bias": rnd(3 * m),
              "layers.5.weight": rnd(d, 3 * m), "layers.5.bias": rnd(d),
              "layers.7.weight": rnd(d, d), "layers.7.bias": rnd(d)}
    (root / "mm_projector").mkdir()
    save_file(layers, str(root / "mm_projector" / "model.safetensors"))
    (root / "mm_projector" / "config.json").write_text(json.dumps(
        {"mm_projector_type": projector_type, "model_type": "v2l_projector"}))
    (root / "config.json").write_text(json.dumps({
        "architectures": ["LlavaLlamaModel"], "model_type": "llava_llama", "llm_cfg": {"_name_or_path": "llm"},
        "vision_tower_cfg": {"_name_or_path": "vision_tower"}, "mm_projector_cfg": {"_name_or_path": "mm_projector"},
        "hidden_size": d, "mm_hidden_size": m, "mm_vision_select_layer": -2, "mm_vision_select_feature": "cls_patch",
        "num_video_frames": frames, "fps": 0.0, "image_aspect_ratio": "resize", "model_dtype": "torch.bfloat16",
        "chat_template": "qwen2"}))
    return layers


@pytest.fixture(scope="module")
def nvila(tmp_path_factory):
    root = tmp_path_factory.mktemp("nvila")
    return root, write_nvila(root)


def tpe_reference(timestamps, dim):
    """The paper's TPE, written out: p[2i] = sin(t / 10000^(2i/D)), p[2i+1] = cos(t / 10000^(2i/D))."""
    out = torch.zeros(len(timestamps), dim, dtype=torch.float64)
    for n, t in enumerate(timestamps.tolist()):
        for j in range(dim):
            angle = t / 10000 ** (2 * (j // 2) / dim)
            out[n, j] = math.sin(angle) if j % 2 == 0 else math.cos(angle)
    return out.float()


def downsample_reference(grid, order="dy_dx", pad="end"):
    """NVILA's 3x3 downsample written from the documented rule: zero-pad H and W at the end to a
    multiple of 3, output tokens row-major, channel (dy*3 + dx)*m + c (order "dx_dy", pad "start":
    wrong conventions, to show the comparison can fail)."""
    h, w, m = grid.shape
    Ho, Wo = -(-h // 3), -(-w // 3)
    oy, ox = (3 * Ho - h, 3 * Wo - w) if pad == "start" else (0, 0)
    out = torch.zeros(Ho * Wo, 9 * m, dtype=grid.dtype)
    for gy in range(Ho):
        for gx in range(Wo):
            for dy in range(3):
                for dx in range(3):
                    y, x = 3 * gy + dy - oy, 3 * gx + dx - ox
                    if 0 <= y < h and 0 <= x < w:
                        k = dy * 3 + dx if order == "dy_dx" else dx * 3 + dy
                        out[gy * Wo + gx, k * m:(k + 1) * m] = grid[y, x]
    return out


def nvila_reference_logits(root, layers, frames, timestamps, question, som=None, order="dy_dx", pad="end",
                           tpe=True):
    """A plain forward of the NVILA folder's weights: SigLIP's second-to-last layer -> (+ TPE) -> 3x3
    downsample -> LayerNorm -> Linear, GELU, LayerNorm, Linear, GELU, Linear; each image's tokens then
    the embedding of "\\n", at the media position of the qwen2 chat prompt; the LLM on the embeddings."""
    from transformers import AutoTokenizer, Qwen2ForCausalLM, SiglipVisionModel

    vision = SiglipVisionModel.from_pretrained(root / "vision_tower").eval()
    llm = Qwen2ForCausalLM.from_pretrained(root / "llm").eval()
    tok = AutoTokenizer.from_pretrained(root / "llm")
    L = {k: v.float() for k, v in layers.items()}
    m, g = VISION["hidden_size"], IMG // PATCH

    def project(image, t):
        feats = vision.embeddings((image[None] - 0.5) / 0.5)
        for layer in vision.encoder.layers[:-1]:  # mm_vision_select_layer -2: the last layer's input
            out = layer(feats, None)
            feats = out[0] if isinstance(out, tuple) else out
        feats = feats[0]  # [g*g, m]
        if tpe:
            feats = feats + tpe_reference(torch.tensor([t]), m)
        v = downsample_reference(feats.view(g, g, m), order, pad)
        v = F.layer_norm(v, (9 * m,), L["layers.1.weight"], L["layers.1.bias"])
        v = F.gelu(F.linear(v, L["layers.2.weight"], L["layers.2.bias"]))
        v = F.layer_norm(v, (3 * m,), L["layers.4.weight"], L["layers.4.bias"])
        v = F.gelu(F.linear(v, L["layers.5.weight"], L["layers.5.bias"]))
        return F.linear(v, L["layers.7.weight"], L["layers.7.bias"])

    embed = llm.get_input_embeddings()
    newline = embed(torch.tensor(tok.encode("\n", add_special_tokens=False)))
    assert newline.shape[0] == 1
    before = "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\n"
    after = question + "<|im_end|>\n<|im_start|>assistant\n"
    images = ([(som, timestamps[0])] if som is not None else []) + list(zip(frames, timestamps.tolist()))
    with torch.no_grad():
        parts = [embed(torch.tensor(tok.encode(before, add_special_tokens=False)))]
        for image, t in images:
            parts += [project(image, t), newline]
        parts.append(embed(torch.tensor(tok.encode(after, add_special_tokens=False))))
        return llm(inputs_embeds=torch.cat(parts)[None]).logits[0]


@pytest.fixture(scope="module")
def nvila_model(nvila):
    from rgpt4d.models.student import RGPT4DForConditionalGeneration

    return RGPT4DForConditionalGeneration.from_nvila(nvila[0]).eval()


def _nvila_logits(model, som=None):
    inputs = _inputs(model, model.tokenizer)
    if som is not None:
        inputs["som_image"] = som[None]
    with torch.no_grad():
        return model(**inputs).logits[0], inputs


def test_from_nvila_config(nvila_model):
    cfg = nvila_model.config
    assert cfg.projector_type == "nvila" and cfg.vision_select_layer == -2 and cfg.num_frames == T
    assert cfg.tpe and cfg.tpe_kind == "sinusoidal" and cfg.region_mode == "som" and cfg.tokens_per_image == M
    tok = nvila_model.tokenizer
    assert cfg.frame_separator_id == tok.encode("\n", add_special_tokens=False)[0]
    assert "<obj_1>" not in tok.get_vocab()  # <obj_N> stays plain text, as the checkpoint read it
    assert cfg.image_token_id == tok.get_vocab()["<image>"]  # NVILA's own <image>: nothing added
    assert cfg.text_config["vocab_size"] == len(tok)


def test_from_nvila_logits_equal_a_plain_forward_of_the_layout(nvila, nvila_model):
    root, layers = nvila
    som = _frames(seed=5)[0][0, 0]
    got, inputs = _nvila_logits(nvila_model, som)
    want = nvila_reference_logits(root, layers, inputs["frames"][0], inputs["timestamps"][0], QUESTION, som=som)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # the comparison can fail: the 3x3 channels in the other order, the zero padding at the top/left,
    # or no TPE
    for wrong in (dict(order="dx_dy"), dict(pad="start"), dict(tpe=False)):
        bad = nvila_reference_logits(root, layers, inputs["frames"][0], inputs["timestamps"][0], QUESTION,
                                     som=som, **wrong)
        assert (got - bad).abs().max() > 1e-2, wrong


def test_from_nvila_frames_only(nvila):
    """region_mode "none": the video alone, NVILA's video layout (each frame's tokens, then "\\n")."""
    from rgpt4d.models.student import RGPT4DForConditionalGeneration

    root, layers = nvila
    model = RGPT4DForConditionalGeneration.from_nvila(root, region_mode="none").eval()
    got, inputs = _nvila_logits(model)
    want = nvila_reference_logits(root, layers, inputs["frames"][0], inputs["timestamps"][0], QUESTION)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_from_nvila_region_tokens_and_round_trip(nvila, tmp_path):
    from rgpt4d.models.student import RGPT4DForConditionalGeneration

    model = RGPT4DForConditionalGeneration.from_nvila(nvila[0], region_mode="tokens", max_regions=2).eval()
    assert "<obj_2>" in model.tokenizer.get_vocab() and model.region_encoder is not None
    inputs = _inputs(model, model.tokenizer)
    model.save_pretrained(tmp_path / "m")
    again = RGPT4DForConditionalGeneration.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, again(**inputs).logits)


def test_from_nvila_bad_folders(tmp_path):
    from rgpt4d.models.student import RGPT4DForConditionalGeneration

    (tmp_path / "other").mkdir()
    write_nvila(tmp_path / "other", projector_type="mlp2x_gelu")
    with pytest.raises(ValueError, match="mm_projector_type 'mlp2x_gelu'"):
        RGPT4DForConditionalGeneration.from_nvila(tmp_path / "other")
    (tmp_path / "half" / "llm").mkdir(parents=True)
    (tmp_path / "half" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="not an NVILA folder .*vision_tower/, mm_projector/"):
        RGPT4DForConditionalGeneration.from_nvila(tmp_path / "half")


def test_infer_reads_an_nvila_folder(nvila, tmp_path):
    """RGPT4D.from_pretrained and `rgpt4d infer --model` detect the layout; the SoM image is drawn
    from the boxes for a model that reads regions from it."""
    import numpy as np

    from rgpt4d.cli import main
    from rgpt4d.infer import RGPT4D

    model = RGPT4D.from_pretrained(nvila[0])
    assert model.model.config.projector_type == "nvila"
    frames, ts = _frames()
    video = (frames[0].permute(0, 2, 3, 1) * 255).to(torch.uint8).numpy()
    letter = model.answer(video, ts[0].tolist(), [[2, 2, 20, 20]], "Is <obj_1> moving?", ["yes", "no"])
    assert letter in "AB"
    np.save(tmp_path / "v.npy", video)
    rc = main(["infer", "--model", str(nvila[0]), "--video", str(tmp_path / "v.npy"), "--timestamps", "0,0.4,1.1",
               "--boxes", "2,2,20,20", "--question", "Is <obj_1> moving?", "--options", "yes", "no"])
    assert rc == 0


# ---------------------------------------------------------------------------------------------
# the paper preset has the released checkpoints' shapes (docs/checkpoints.md)
# ---------------------------------------------------------------------------------------------

# NVILA-Lite-8B / 4D-RGPT-8B, from docs/checkpoints.md (and Qwen2-7B's published config)
SIGLIP_SO400M_448 = dict(hidden_size=1152, num_hidden_layers=27, num_attention_heads=16, intermediate_size=4304,
                         patch_size=14, image_size=448, layer_norm_eps=1e-6)
QWEN2_7B = dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                intermediate_size=18944, rms_norm_eps=1e-6, tie_word_embeddings=False)
NVILA_PROJECTOR_SHAPES = {"layers.1.weight": (10368,), "layers.1.bias": (10368,), "layers.2.weight": (3456, 10368),
                          "layers.2.bias": (3456,), "layers.4.weight": (3456,), "layers.4.bias": (3456,),
                          "layers.5.weight": (3584, 3456), "layers.5.bias": (3584,),
                          "layers.7.weight": (3584, 3584), "layers.7.bias": (3584,)}
OURS = {"layers.1.weight": "norm_weight", "layers.1.bias": "norm_bias", "layers.2.weight": "linear_1.weight",
        "layers.2.bias": "linear_1.bias", "layers.4.weight": "norm_2.weight", "layers.4.bias": "norm_2.bias",
        "layers.5.weight": "linear_2.weight", "layers.5.bias": "linear_2.bias", "layers.7.weight": "linear_3.weight",
        "layers.7.bias": "linear_3.bias"}


def test_paper_preset_has_the_checkpoint_shapes():
    from transformers import Qwen2Config, SiglipVisionConfig

    from rgpt4d.models.configs import student_config
    from rgpt4d.models.student import RGPT4DForConditionalGeneration
    from rgpt4d.models.tokenizer import train_tokenizer

    tok = train_tokenizer(vocab_size=600)
    cfg = student_config("paper", tok)
    vision, text = SiglipVisionConfig(**cfg.vision_config), Qwen2Config(**cfg.text_config)
    for k, v in SIGLIP_SO400M_448.items():
        assert getattr(vision, k) == v, k
    for k, v in QWEN2_7B.items():
        assert getattr(text, k) == v, k
    assert text.rope_parameters["rope_theta"] == 1e6
    assert cfg.patch_grid == 32 and cfg.tokens_per_image == 121 and cfg.num_frames == 16  # 32x32 -> 33x33 -> 11x11
    assert cfg.vision_select_layer == -2 and cfg.projector_type == "nvila" and cfg.tpe
    assert cfg.frame_separator_id == tok.encode("\n", add_special_tokens=False)[0]
    assert len(cfg.visual_token_ids()) == 16 * 122
    with torch.device("meta"):  # shapes only: nothing is allocated
        model = RGPT4DForConditionalGeneration(cfg)
    proj = dict(model.projector.named_parameters())
    for key, shape in NVILA_PROJECTOR_SHAPES.items():
        assert tuple(proj[OURS[key]].shape) == shape, key
    assert set(proj) == set(OURS.values())  # nothing else: the TPE has no parameters
    assert tuple(model.vision_tower.embeddings.position_embedding.weight.shape) == (1024, 1152)
    assert not any(k.startswith("head.") for k, _ in model.vision_tower.named_parameters())
    llm = sum(p.numel() for n, p in model.language_model.named_parameters() if "embed" not in n and "lm_head" not in n)
    assert round(llm / 1e9, 2) == 6.53  # Qwen2-7B's non-embedding parameters (the Qwen2 technical report)
