"""The student: shapes, gradients, TPE, save/load, generate, bad inputs."""

import pytest
import torch

from rgpt4d.models.tokenizer import LETTERS, letter_token_ids
from tests.models.conftest import T, make_batch, make_student


def test_shapes_and_dtypes_through_the_model(student, tokenizer):
    batch = make_batch(tokenizer, student.config)
    out = student(**batch, output_visual_hidden=True)
    B, L = batch["input_ids"].shape
    assert out.logits.shape == (B, L, len(tokenizer)) and out.logits.dtype == torch.float32
    g = student.downsampled_grid
    assert out.visual_hidden.shape == (B, T, *g, student.config.text_config["hidden_size"])
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert student.config.num_visual_tokens == T * g[0] * g[1]


def test_gradients_reach_every_trainable_parameter_and_not_the_vision_tower(tokenizer):
    model = make_student(tokenizer)
    out = model(**make_batch(tokenizer, model.config))
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    # embeddings of tokens absent from the batch get zero rows, but the table itself gets a gradient
    assert missing == [], missing
    assert all(p.grad is None for p in model.vision_tower.parameters())
    assert not any(p.requires_grad for p in model.vision_tower.parameters())
    assert model.region_encoder.encoder.proj.weight.grad.abs().sum() > 0


def test_timestamps_change_the_output_only_with_tpe(tokenizer):
    batch = make_batch(tokenizer, None or make_student(tokenizer).config)
    for tpe in (True, False):
        model = make_student(tokenizer, tpe=tpe).eval()
        a = model(**batch).logits
        b = model(**dict(batch, timestamps=batch["timestamps"] * 3.0 + 1.0)).logits
        assert (not torch.allclose(a, b, atol=1e-5)) == tpe


def test_projector_uses_the_fused_prologue(student, monkeypatch):
    import rgpt4d.models.student as mod

    calls = []
    real = mod.tpe_downsample_layernorm
    monkeypatch.setattr(mod, "tpe_downsample_layernorm", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(1, T, 16, 32)
    student.projector(x, torch.arange(T, dtype=torch.float32)[None], (4, 4))
    assert calls == [1]


def test_region_tokens_sit_at_obj_positions(student, tokenizer):
    batch = make_batch(tokenizer, student.config)
    e1 = student.build_inputs_embeds(batch["input_ids"], batch["frames"], batch["timestamps"], batch["boxes"],
                                     batch["region_mask"])
    moved = dict(batch, boxes=batch["boxes"].flip(1))  # swap the regions
    e2 = student.build_inputs_embeds(moved["input_ids"], moved["frames"], moved["timestamps"], moved["boxes"],
                                     moved["region_mask"])
    obj = torch.isin(batch["input_ids"], torch.tensor(student.config.obj_token_ids))
    assert obj.sum() == (6 if student.config.restate_mode() else 3)  # 3 mentions (and each prompt's regions restated)
    assert not torch.allclose(e1[obj], e2[obj])
    assert torch.equal(e1[~obj], e2[~obj])


def test_save_load_gives_identical_outputs(student, tokenizer, tmp_path):
    from rgpt4d.models.student import RGPT4DForConditionalGeneration

    student.eval()
    student.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = RGPT4DForConditionalGeneration.from_pretrained(tmp_path).eval()
    batch = make_batch(tokenizer, student.config)
    with torch.no_grad():
        assert torch.equal(student(**batch).logits, loaded(**batch).logits)
    assert sorted(n for n, _ in student.named_parameters()) == sorted(n for n, _ in loaded.named_parameters())
    assert not any(p.requires_grad for p in loaded.vision_tower.parameters())


def test_generate_uses_the_cache_and_matches_forward(student, tokenizer):
    batch = make_batch(tokenizer, student.config, answers=None)
    student.eval()
    with torch.no_grad():
        logits = student(**batch).logits[:, -1]
    gen = student.generate(**batch, max_new_tokens=3, min_new_tokens=3)
    assert gen.shape == (2, 3)
    assert torch.equal(gen[:, 0], logits.argmax(-1))


def test_generate_returns_a_letter_after_a_few_steps(tokenizer):
    model = make_student(tokenizer)
    batch = make_batch(tokenizer, model.config, answers=("B", "D"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(25):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    gen_batch = {k: v for k, v in batch.items() if k != "labels"}
    gen_batch.update(make_batch(tokenizer, model.config, answers=None))
    out = model.generate(**gen_batch, max_new_tokens=2)
    text = tokenizer.batch_decode(out, skip_special_tokens=True)
    assert [t.strip() for t in text] == ["B", "D"]
    assert int(out[0, 1]) == tokenizer.eos_token_id


# ---------------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------------


def test_more_obj_references_than_regions(student, tokenizer):
    batch = make_batch(tokenizer, student.config)
    batch["region_mask"][1, 1] = False  # sample 1 mentions <obj_2> but has one region
    with pytest.raises(ValueError, match=r"input_ids: sample 1 refers to <obj_2> but only 1 region"):
        student(**batch)
    with pytest.raises(ValueError, match="boxes: the prompt refers"):
        student(**dict(batch, boxes=None))


def test_boxes_outside_the_frame(student, tokenizer):
    batch = make_batch(tokenizer, student.config)
    batch["boxes"][0, 1, 2] = 60.0  # frames are 48 wide
    with pytest.raises(ValueError, match=r"boxes: region 2 of sample 0 .* not inside the 48x48 frame"):
        student(**batch)
    batch["boxes"][0, 1] = torch.tensor([30.0, 30.0, 20.0, 40.0])  # x1 < x0
    with pytest.raises(ValueError, match="boxes:"):
        student(**batch)


def test_timestamps_not_increasing(student, tokenizer):
    batch = make_batch(tokenizer, student.config)
    batch["timestamps"][1, 2] = batch["timestamps"][1, 1]
    with pytest.raises(ValueError, match="timestamps: must be strictly increasing .* sample 1"):
        student(**batch)
    with pytest.raises(ValueError, match=r"timestamps: expected \[B, T\]"):
        student(**dict(batch, timestamps=batch["timestamps"][:, :2]))


def test_wrong_frame_count(student, tokenizer):
    batch = make_batch(tokenizer, student.config)
    with pytest.raises(ValueError, match=f"frames: the model takes {T} frames per video, got {T - 1}"):
        student(**dict(batch, frames=batch["frames"][:, : T - 1], timestamps=batch["timestamps"][:, : T - 1]))


def test_wrong_number_of_image_tokens(student, tokenizer):
    batch = make_batch(tokenizer, student.config)
    ids = batch["input_ids"].clone()
    ids[ids == student.config.image_token_id] = tokenizer.pad_token_id
    with pytest.raises(ValueError, match="input_ids: each prompt needs"):
        student(**dict(batch, input_ids=ids))


def test_som_mode_takes_the_som_image_first(tokenizer):
    model = make_student(tokenizer, region_mode="som")
    assert model.region_encoder is None
    assert model.config.num_visual_tokens == (T + 1) * model.config.tokens_per_image
    batch = make_batch(tokenizer, model.config)
    with pytest.raises(ValueError, match="som_image"):
        model(**batch)
    som = torch.randint(0, 256, (2, 3, 48, 48), dtype=torch.uint8)
    out = model(**batch, som_image=som, output_visual_hidden=True)
    assert out.visual_hidden.shape[1] == T and torch.isfinite(out.loss)


def test_letters_are_single_tokens(tokenizer):
    ids = letter_token_ids(tokenizer, 5)
    assert [tokenizer.decode([i]) for i in ids] == list(LETTERS[:5])


def test_the_prompt_preamble_is_not_a_region_reference(student, tokenizer):
    from rgpt4d.data.schema import format_prompt
    from rgpt4d.models.tokenizer import encode_batch

    enc = encode_batch(tokenizer, [format_prompt("How tall is <obj_1>?", ["1 m", "2 m"])], 1)
    obj = torch.isin(enc["input_ids"], torch.tensor(student.config.obj_token_ids))
    assert int(obj.sum()) == 1  # only the question's <obj_1>


def test_tokenizer_save_load_and_labels(tokenizer, tmp_path):
    from transformers import PreTrainedTokenizerFast

    from rgpt4d.models.tokenizer import encode_batch, special_token_ids

    text = "<|user|><image><image>\nHow tall is <obj_3>? (B) 1.25 m/s² 45°<|assistant|>"
    tokenizer.save_pretrained(tmp_path)
    loaded = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    assert loaded.encode(text) == tokenizer.encode(text)
    assert tokenizer.decode(tokenizer.encode(text)) == text  # byte-level: lossless, no unknown token
    ids = special_token_ids(tokenizer)
    assert ids["obj"][2] in tokenizer.encode(text) and tokenizer.encode(text).count(ids["image"]) == 2
    enc = encode_batch(tokenizer, ["short", "a longer prompt here"], 2, ["A", "B"])
    lab = enc["labels"]
    assert (lab != -100).sum(1).tolist() == [2, 2]  # the letter and </s>
    assert enc["attention_mask"][0, 0] == 0  # left padding for batched generation


def test_auto_classes_find_the_student(student, tmp_path):
    from transformers import AutoConfig, AutoModelForImageTextToText

    student.save_pretrained(tmp_path)
    assert type(AutoConfig.from_pretrained(tmp_path)).__name__ == "RGPT4DConfig"
    assert type(AutoModelForImageTextToText.from_pretrained(tmp_path)) is type(student)


def test_batch_to_inputs_from_a_collated_batch(student, tokenizer):
    from rgpt4d.data.schema import format_prompt
    from rgpt4d.train.inputs import batch_to_inputs

    raw = make_batch(tokenizer, student.config, answers=None)
    batch = dict(prompt=[format_prompt("How tall is <obj_1>?", ["1 m", "2 m"]),
                         format_prompt("Is <obj_2> left of <obj_1>?", ["yes", "no"])],
                 answer_index=torch.tensor([1, 0]), options=[["1 m", "2 m"], ["yes", "no"]], frames=raw["frames"],
                 timestamps=raw["timestamps"], boxes=raw["boxes"], region_mask=raw["region_mask"],
                 region_ids=torch.tensor([[2, 1], [1, 2]]))
    inputs = batch_to_inputs(batch, tokenizer, student.config)
    assert student.config.answer_format == "rank"  # the from-scratch presets' default
    assert tokenizer.decode(inputs["labels"][0][inputs["labels"][0] != -100]) == "second smallest (B)</s>"
    option = batch_to_inputs(batch, tokenizer, make_student(tokenizer, answer_format="option").config)
    assert tokenizer.decode(option["labels"][0][option["labels"][0] != -100]) == "2 m (B)</s>"
    letter = batch_to_inputs(batch, tokenizer, make_student(tokenizer, answer_format="letter").config)
    assert tokenizer.decode(letter["labels"][0][letter["labels"][0] != -100]) == "B</s>"
    out = student(**inputs)
    assert torch.isfinite(out.loss)
    # region_ids map <obj_N> to boxes: sample 0's <obj_1> is its second box
    e = student.build_inputs_embeds(inputs["input_ids"], inputs["frames"], inputs["timestamps"], inputs["boxes"],
                                    inputs["region_mask"], inputs["region_ids"])
    swapped = student.build_inputs_embeds(inputs["input_ids"], inputs["frames"], inputs["timestamps"],
                                          inputs["boxes"].flip(1), inputs["region_mask"], inputs["region_ids"].flip(1))
    assert torch.allclose(e, swapped)


def test_learned_tpe_table_per_frame_index(tokenizer, tmp_path):
    """tpe_kind="learned": one table row per frame index in the projector and the region encoder; the
    seconds no longer matter, the frame order does, and the tables train and round-trip."""
    from rgpt4d.models.student import RGPT4DForConditionalGeneration
    from rgpt4d.ops.tpe import tpe_downsample_layernorm_eager

    model = make_student(tokenizer, tpe_kind="learned").eval()
    table = model.projector.tpe_table
    assert table.shape == (T, model.config.vision_config["hidden_size"]) and table.requires_grad
    assert model.region_encoder.encoder.tpe_table.shape[0] == T
    batch = make_batch(tokenizer, model.config)
    with torch.no_grad():
        table.normal_(0, 1.0)
        model.region_encoder.encoder.tpe_table.normal_(0, 1.0)
        a = model(**batch).logits
        # seconds are ignored by a frame-index table ...
        assert torch.allclose(a, model(**dict(batch, timestamps=batch["timestamps"] * 3.0 + 1.0)).logits)
        # ... and the prologue adds row t to frame t (checked against the eager reference)
        x = torch.randn(2, T, model.config.patch_grid ** 2, table.shape[1])
        idx = torch.arange(T).expand(2, T)
        ref = tpe_downsample_layernorm_eager(x, idx, table, model.projector.norm_weight, model.projector.norm_bias,
                                             grid=model.grid, window=model.config.downsample_window)
        torch.testing.assert_close(model.projector.prologue(x, batch["timestamps"], model.grid), ref)
    model.train()
    model(**batch).loss.backward()
    assert table.grad.abs().sum() > 0 and model.region_encoder.encoder.tpe_table.grad.abs().sum() > 0
    model.save_pretrained(tmp_path)
    loaded = RGPT4DForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert loaded.config.tpe_kind == "learned"
    torch.testing.assert_close(loaded.projector.tpe_table, table)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model.eval()(**batch).logits)


def test_bad_tpe_kind(tokenizer):
    with pytest.raises(ValueError, match="tpe_kind"):
        make_student(tokenizer, tpe_kind="rotary")


def test_bf16_through_the_whole_model(tokenizer):
    """The student in bf16 end to end (as trained under bf16 on a GPU): finite loss, bf16 logits, gradients
    on every trainable parameter, and logits close to the fp32 model's."""
    model = make_student(tokenizer)
    batch = make_batch(tokenizer, model.config)
    with torch.no_grad():
        ref = model.eval()(**batch).logits
    model16 = make_student(tokenizer).to(torch.bfloat16).train()
    out = model16(**batch)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    out.loss.backward()
    missing = [n for n, p in model16.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == [] and all(p.grad.dtype == torch.bfloat16 for p in model16.parameters() if p.requires_grad)
    with torch.no_grad():
        got = model16.eval()(**batch).logits.float()
    assert (got - ref).abs().max() < 0.02 * ref.abs().max() + 0.01  # bf16 rounding; measured 0.006 of 0.66


def test_region_geometry_and_motion_embeddings():
    """Pooling to 1x1 and averaging over frames forget where a box is, how big it is and how the
    region changes: the optional geometry and motion embeddings give those back."""
    from rgpt4d.models.student import RegionTokenEncoder

    torch.manual_seed(0)
    B, T, g, D = 1, 4, 4, 8
    flat = torch.ones(B, T, g, g, D)  # the same feature everywhere: pooling cannot tell boxes apart
    boxes = torch.tensor([[[0.0, 0.0, 8.0, 8.0], [4.0, 4.0, 16.0, 12.0]]])
    valid = torch.ones(B, 2, dtype=torch.bool)
    ts = torch.arange(T, dtype=torch.float32)[None]
    kw = dict(tpe=False, spatial_scale=g / 16, max_frames=T, image_size=16)
    plain = RegionTokenEncoder(D, 16, 8, **kw)
    out = plain(flat, boxes, valid, ts)
    assert torch.allclose(out[0, 0], out[0, 1])
    geo = RegionTokenEncoder(D, 16, 8, geometry=True, **kw)
    out = geo(flat, boxes, valid, ts)
    assert not torch.allclose(out[0, 0], out[0, 1])
    # the motion embedding sees the change between the first and second half of the frames
    changing = flat.clone()
    changing[:, : T // 2] *= 0.5
    changing[:, T // 2:] *= 1.5  # same time average as `flat`
    assert torch.allclose(plain(changing, boxes, valid, ts), plain(flat, boxes, valid, ts), atol=1e-6)
    mot = RegionTokenEncoder(D, 16, 8, motion=True, **kw)
    assert not torch.allclose(mot(changing, boxes, valid, ts), mot(flat, boxes, valid, ts), atol=1e-4)
    (geo(flat, boxes, valid, ts).sum() + mot(changing, boxes, valid, ts).sum()).backward()
    assert geo.box_embed.weight.grad.abs().sum() > 0 and mot.motion_proj.weight.grad.abs().sum() > 0
    # relative: what all regions of a frame share (a constant added everywhere) no longer reaches the token
    rel = RegionTokenEncoder(D, 16, 8, relative=True, geometry=True, motion=True, **kw)
    varied = torch.randn(B, T, g, g, D)
    shift = torch.randn(D)
    assert torch.allclose(rel(varied + shift, boxes, valid, ts), rel(varied, boxes, valid, ts), atol=1e-4)
    assert not torch.allclose(plain(varied + shift, boxes, valid, ts), plain(varied, boxes, valid, ts), atol=1e-4)
    with pytest.raises(ValueError, match="geometry=True needs image_size"):
        RegionTokenEncoder(D, 16, 8, tpe=False, geometry=True)


@pytest.mark.parametrize("backend", ["eager", "cpu"])
def test_fused_sft_loss_equals_the_transformers_loss_and_gradients(tokenizer, backend):
    # return_logits=False (training): L_SFT from rgpt4d.ops.fused_linear_cross_entropy on the LM head,
    # no logits; the same loss and gradients as transformers' LM head + ForCausalLMLoss
    from rgpt4d.ops import set_backend

    model = make_student(tokenizer)
    batch = make_batch(tokenizer, model.config)
    ref = model(**batch, output_visual_hidden=True)
    ref.loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    set_backend(backend)
    try:
        out = model(**batch, output_visual_hidden=True, return_logits=False)
        out.loss.backward()
    finally:
        set_backend(None)
    assert out.logits is None
    torch.testing.assert_close(out.visual_hidden, ref.visual_hidden)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == ref_grads.keys()
    for n, g in grads.items():
        torch.testing.assert_close(g, ref_grads[n], rtol=1e-4, atol=1e-6 * max(1.0, float(ref_grads[n].abs().max())),
                                   msg=n)


@pytest.mark.parametrize("backend", ["eager", "cpu"])
def test_llm_through_rgpt4d_ops_equals_stock_transformers(tokenizer, backend):
    # use_rgpt4d_llm_ops routes Qwen2's RMSNorm, SwiGLU and RoPE through rgpt4d.ops: backend eager is
    # transformers' own code (bitwise equal), the fused kernels agree to rounding, forward and backward
    from transformers import Qwen2ForCausalLM

    from rgpt4d.models.student import _Qwen2Attention, _Qwen2MLP, _Qwen2RMSNorm
    from rgpt4d.ops import set_backend

    model = make_student(tokenizer)
    lm = model.language_model
    kinds = {type(m) for m in lm.modules()}
    assert {_Qwen2Attention, _Qwen2MLP, _Qwen2RMSNorm} <= kinds
    stock = Qwen2ForCausalLM._from_config(lm.config, attn_implementation=lm.config._attn_implementation)
    stock.load_state_dict(lm.state_dict())
    assert not {_Qwen2Attention, _Qwen2MLP, _Qwen2RMSNorm} & {type(m) for m in stock.modules()}
    ids = torch.randint(0, lm.config.vocab_size, (2, 23), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    ref = stock(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    ref.square().mean().backward()
    set_backend(backend)
    try:
        out = lm(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        out.square().mean().backward()
    finally:
        set_backend(None)
    if backend == "eager":
        assert torch.equal(out, ref)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for (n, p), q in zip(lm.named_parameters(), stock.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6 * max(1.0, float(q.grad.abs().max())), msg=n)
