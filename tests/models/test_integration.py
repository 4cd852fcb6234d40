"""apply_rgpt4d on a tiny model of every supported family, against eager computations written
here from the contract (not from the adapters): TPE through a hook on the projector input in
float64, region grids and box scales, P4D latent + explicit losses."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers", reason="the integration needs transformers")

from rgpt4d.integrations.tiny import IMAGE, OBJ, TEXT, VIDEO, available, tiny_inputs, tiny_model
from rgpt4d.integrations.transformers import apply_rgpt4d, attach_p4d, detach_p4d, p4d_loss, remove_rgpt4d
from tests.models.conftest import train_step

# (family, video): every family, images as frames and videos where the family takes them
CASES = [("llava", False), ("llava_onevision", False), ("llava_onevision", True), ("llava_next_video", True),
         ("qwen2_vl", False), ("qwen2_vl", True), ("qwen2_5_vl", False), ("qwen2_5_vl", True),
         ("qwen3_vl", False), ("qwen3_vl", True), ("internvl", False)]
IDS = [f"{f}-{'video' if v else 'images'}" for f, v in CASES]
FRAMES = 4


def _have(family, video=True):
    import inspect

    import transformers

    if family == "llava_onevision" and not video and "batch_num_images" not in inspect.signature(
            transformers.LlavaOnevisionForConditionalGeneration.forward).parameters:
        pytest.skip(f"transformers {transformers.__version__}'s LLaVA-OneVision takes no multi-image input")
    if not available(family):
        pytest.skip(f"transformers {transformers.__version__} has no {family} model")


def part(model, name):
    """model.<name> (transformers 4.x) or model.model.<name> (5.x)."""
    return getattr(model, name) if hasattr(model, name) else getattr(model.model, name)


def projector_of(model, family):
    """The projector, named here independently of the adapters."""
    return part(model, "visual").merger if family.startswith("qwen") else part(model, "multi_modal_projector")


def row_timestamps(family, model, ts, video):
    """Seconds of each projector-input row, from the contract: a row is one frame's tokens
    (LLaVA family, InternVL) or one patch vector (Qwen, its frame group's mean timestamp)."""
    flat = ts.reshape(-1).double()
    if not family.startswith("qwen"):
        return flat
    vc = model.config.vision_config
    patches = (32 // vc.patch_size) ** 2  # the tiny Qwen frames are 32 x 32 pixels
    if video:
        flat = flat.view(-1, vc.temporal_patch_size).mean(-1)  # frames merged in time: their mean
    return flat.repeat_interleave(patches)


def sinusoid(t, D):
    i = torch.arange(D) // 2
    angle = t[:, None] / (10000.0 ** (2.0 * i / D))
    return torch.where(torch.arange(D) % 2 == 0, torch.sin(angle), torch.cos(angle))  # float64


class eager_tpe:
    """Within it, the unpatched model gets the encoding added to its projector input by hand, in
    float64."""

    def __init__(self, model, family, ts, video):
        self.rows = row_timestamps(family, model, ts, video)
        self.projector = projector_of(model, family)

    def hook(self, module, args):
        x, rows = args[0], self.rows
        assert x.shape[0] == rows.numel()
        enc = sinusoid(rows, x.shape[-1]).view(x.shape[0], *([1] * (x.dim() - 2)), x.shape[-1])
        return ((x.double() + enc).to(x.dtype),) + args[1:]

    def __enter__(self):
        self.handle = self.projector.register_forward_pre_hook(self.hook)

    def __exit__(self, *exc):
        self.handle.remove()


def eager_tpe_logits(model, family, kw, ts, video):
    with eager_tpe(model, family, ts, video), torch.no_grad():
        return model(**kw).logits


@pytest.mark.parametrize("family,video", CASES, ids=IDS)
def test_tpe_matches_the_eager_encoding_at_the_projector(family, video):
    _have(family, video)
    model = tiny_model(family)
    kw, ts = tiny_inputs(family, model, frames=FRAMES, video=video)
    with torch.no_grad():
        before = model(**kw).logits
    ref = eager_tpe_logits(model, family, kw, ts, video)
    apply_rgpt4d(model)
    with torch.no_grad():
        same = model(**kw).logits
        patched = model(**kw, timestamps=ts).logits
        flat = model(**kw, timestamps=ts.reshape(-1)).logits  # [num_frames] works too
    assert torch.equal(before, same), "without timestamps the patched model must be bit-identical"
    assert not torch.allclose(before, patched, atol=1e-3), "timestamps changed nothing"
    torch.testing.assert_close(patched, ref, atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(flat, patched)
    remove_rgpt4d(model)
    assert "forward" not in model.__dict__ and "generate" not in model.__dict__
    with torch.no_grad():
        assert torch.equal(model(**kw).logits, before)


GEN_CASES = [("llava", False), ("llava_onevision", True), ("llava_next_video", True), ("qwen2_vl", True),
             ("qwen2_5_vl", False), ("qwen3_vl", True), ("internvl", False)]


@pytest.mark.parametrize("family,video", GEN_CASES, ids=[f"{f}-{'video' if v else 'images'}" for f, v in GEN_CASES])
def test_generate_uses_the_timestamps_and_regions(family, video):
    _have(family, video)
    model = tiny_model(family)
    kw, ts = tiny_inputs(family, model, frames=FRAMES, video=video, obj=True)
    gen = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True,
               pad_token_id=0)
    with eager_tpe(model, family, ts, video):
        ref = model.generate(**kw, **gen).logits[0]
    # how far this transformers' generate is from its own forward (4.46's Qwen2-VL video: 3e-3)
    with torch.no_grad():
        plain = model(**kw).logits[:, -1]
    drift = float((model.generate(**kw, **gen).logits[0] - plain).abs().max())
    apply_rgpt4d(model)
    out = model.generate(**kw, timestamps=ts, **gen)
    assert out.sequences.shape == (2, kw["input_ids"].shape[1] + 3)
    torch.testing.assert_close(out.logits[0], ref, atol=2e-4, rtol=2e-4)
    # after generate the model is back to no timestamps
    with torch.no_grad():
        assert torch.equal(model(**kw).logits[:, -1], plain)
    # region tokens at <obj_1> in generate: the first step is the patched forward's last position
    remove_rgpt4d(model)
    apply_rgpt4d(model, obj_token_ids=list(OBJ))
    boxes = torch.tensor([[[1.0, 2.0, 9.0, 10.0]], [[3.0, 3.0, 12.0, 15.0]]])
    with torch.no_grad():
        fwd = model(**kw, timestamps=ts, boxes=boxes).logits[:, -1]
    out = model.generate(**kw, timestamps=ts, boxes=boxes, **gen)
    torch.testing.assert_close(out.logits[0], fwd, atol=2e-4 + 2 * drift, rtol=2e-4)
    assert not torch.allclose(out.logits[0], ref, atol=1e-3), "the region token changed nothing in generate"


def test_timestamp_count_must_match_the_frames():
    model = apply_rgpt4d(tiny_model("qwen2_vl"))
    kw, ts = tiny_inputs("qwen2_vl", model, frames=FRAMES, video=True)
    with pytest.raises(ValueError, match=r"timestamps: one per frame given; got 7 timestamps for 8 video frame"):
        model(**kw, timestamps=ts.reshape(-1)[:7])
    with pytest.raises(ValueError, match="timestamps: must be finite"):
        model(**kw, timestamps=ts * float("nan"))
    model = apply_rgpt4d(tiny_model("llava"))
    kw, ts = tiny_inputs("llava", model, frames=FRAMES)
    with pytest.raises(ValueError, match="got 5 timestamps for 8 image frame"):
        model(**kw, timestamps=ts.reshape(-1)[:5])


# ---------------------------------------------------------------------------------------------
# Regions
# ---------------------------------------------------------------------------------------------


def _region_case(family, video):
    model = tiny_model(family)
    kw, ts = tiny_inputs(family, model, frames=FRAMES, video=video, obj=True)
    return model, kw, ts


@pytest.mark.parametrize("family,video", CASES, ids=IDS)
def test_region_tokens_read_the_grid_actually_pooled(family, video):
    _have(family, video)
    model, kw, ts = _region_case(family, video)
    captured = {}
    proj = projector_of(model, family)
    h0 = proj.register_forward_pre_hook(lambda mod, args: captured.setdefault("x", args[0].detach().clone()))
    apply_rgpt4d(model, obj_token_ids=list(OBJ))
    enc_in = {}

    def grab(mod, args):
        enc_in["features"], enc_in["boxes"], enc_in["valid"], enc_in["ts"] = args

    h1 = model.rgpt4d_region_encoder.register_forward_pre_hook(grab)
    H = W = 32 if family.startswith("qwen") else 16
    boxes = torch.tensor([[[0.0, 0.0, W, H]], [[2.0, 4.0, 9.0, 13.0]]])
    out = model(**kw, timestamps=ts, boxes=boxes)
    h0.remove(), h1.remove()
    x = captured["x"]
    feats = enc_in["features"]
    B, T = feats.shape[:2]
    gh, gw = feats.shape[2:4]
    # the box scale is the grid the region encoder receives over the frame's pixels
    torch.testing.assert_close(enc_in["boxes"], boxes * torch.tensor([gw / W, gh / H] * 2))
    torch.testing.assert_close(enc_in["boxes"][0, 0], torch.tensor([0.0, 0.0, gw, gh]))
    if family == "llava_next_video":
        assert (gh, gw) == (2, 2), "NeXT-Video pools the 4x4 patch grid to 2x2 before the projector"
    # the grid is the projector input laid out per frame (Qwen: m x m windows concatenated, raster order)
    if family.startswith("qwen"):
        vc = model.config.vision_config
        m = vc.spatial_merge_size
        if family == "qwen2_5_vl":
            # merging the grid in raster order must give what the tower outputs (reordered back)
            with torch.no_grad():
                merged = proj(feats.reshape(-1, x.shape[-1]))
                key = "pixel_values_videos" if video else "pixel_values"
                thw = kw["video_grid_thw" if video else "image_grid_thw"]
                tower = part(model, "visual")(kw[key], grid_thw=thw)
                tower = getattr(tower, "pooler_output", tower)
            torch.testing.assert_close(merged, tower, atol=1e-5, rtol=1e-5)
        else:
            torch.testing.assert_close(feats.reshape(-1, m * m * x.shape[-1]), x.reshape(-1, m * m * x.shape[-1]))
        frames_per_sample = FRAMES // vc.temporal_patch_size if video else FRAMES
        assert T == frames_per_sample
        if video:  # region timestamps are the merged frames' means
            torch.testing.assert_close(enc_in["ts"], ts.view(B, T, -1).mean(-1))
    else:
        rows = x[:, :] if x.dim() == 3 else x
        torch.testing.assert_close(feats.reshape(B * T, gh * gw, -1), rows)
        torch.testing.assert_close(enc_in["ts"], ts)
    # the tokens land at <obj_1> and are trainable
    out.logits.sum().backward()
    assert model.rgpt4d_region_encoder.linear_2.weight.grad.abs().sum() > 0
    with torch.no_grad():
        moved = model(**kw, timestamps=ts, boxes=boxes.flip(0)).logits
    assert not torch.allclose(moved, out.logits.detach())
    with pytest.raises(ValueError, match=rf"boxes: must lie inside the {W}x{H}"):
        model(**kw, timestamps=ts, boxes=boxes + W)
    kw["input_ids"][0, -1] = OBJ[1]  # <obj_2> with one region
    with pytest.raises(ValueError, match="refers to <obj_2> but only 1 region"):
        model(**kw, timestamps=ts, boxes=boxes)


# ---------------------------------------------------------------------------------------------
# P4D
# ---------------------------------------------------------------------------------------------


def lm_grid(family, video):
    """(frames T in the LM, h, w, tokens per frame, extra tokens per sample) of the tiny inputs."""
    if family.startswith("qwen"):
        return (FRAMES // 2 if video else FRAMES), 4, 4, 16, 0
    if family == "internvl":
        return FRAMES, 2, 2, 4, 0
    if video:
        return FRAMES, 2, 2, 4, (1 if family == "llava_onevision" else 0)
    return FRAMES, 4, 4, 16 + (1 if family == "llava_onevision" else 0), 0


class Heads(torch.nn.Module):
    """Frozen stand-in teacher heads: depth from the last grid, flow from the first."""

    def __init__(self, c):
        super().__init__()
        self.depth, self.flow = torch.nn.Linear(c, 1), torch.nn.Linear(c, 2)
        self.requires_grad_(False)

    def forward(self, grids):
        return {"depth": self.depth(grids[-1]).squeeze(-1), "flow": self.flow(grids[0])}


@pytest.mark.parametrize("family,video", CASES, ids=IDS)
def test_p4d_latent_and_explicit_losses_match_eager(family, video):
    _have(family, video)
    model = apply_rgpt4d(tiny_model(family))
    names = sorted(n for n, _ in model.named_parameters())
    T, h, w, per, extra = lm_grid(family, video)
    Ct, teacher_grid, tubelet = 8, (T // 2, 2, 3), 2
    attach_p4d(model, teacher_dim=Ct, teacher_grid=teacher_grid, tubelet=tubelet)
    kw, ts = tiny_inputs(family, model, frames=FRAMES, video=video)
    g = torch.Generator().manual_seed(1)
    B = kw["input_ids"].shape[0]
    targets = {"latent": torch.randn(B, *teacher_grid, Ct, generator=g),
               "depth": torch.randn(B, *teacher_grid, generator=g),
               "flow": torch.randn(B, *teacher_grid, 2, generator=g)}
    heads = Heads(Ct)
    out = model(**kw, timestamps=ts, output_hidden_states=True)
    hid = out.hidden_states[-1]
    lat = p4d_loss(model, hid, kw["input_ids"], targets)
    both = p4d_loss(model, hid, kw["input_ids"], targets, teacher_heads=heads)

    # eager, float64: the visual tokens in order, frames every `tubelet`, bilinear resize, D_4DP, losses
    ids = kw["input_ids"]
    tok = VIDEO if video else IMAGE
    vis = hid.double()[ids == tok].view(B, -1, hid.shape[-1])[:, :T * per].view(B, T, per, -1)[:, :, :h * w]
    vis = vis.reshape(B, T, h, w, -1)[:, ::tubelet]
    y = F.interpolate(vis.flatten(0, 1).permute(0, 3, 1, 2), size=teacher_grid[1:], mode="bilinear",
                      align_corners=False).permute(0, 2, 3, 1).unflatten(0, (B, teacher_grid[0]))
    d = model.rgpt4d_p4d
    lin = [(m.weight.double(), m.bias.double()) for m in (d.fc1, d.fc2, d.fc3)]
    z = F.gelu(F.linear(F.gelu(F.linear(y, *lin[0])), *lin[1]))
    latent = F.linear(z, *lin[2])
    ld = F.smooth_l1_loss(latent, targets["latent"].double())
    heads64 = Heads(Ct).double()
    heads64.load_state_dict(heads.state_dict())
    preds = heads64([latent] * 4)
    l_depth = F.smooth_l1_loss(preds["depth"], targets["depth"].double())
    l_flow = F.smooth_l1_loss(preds["flow"], targets["flow"].double())
    total = 0.5 * ld + 0.1 * (1.0 * l_depth + 0.1 * l_flow)  # the paper preset's weights

    torch.testing.assert_close(lat.total.double(), 0.5 * ld, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(both.total.double(), total, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(both.terms["depth"].double(), l_depth, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(both.terms["flow"].double(), l_flow, atol=1e-5, rtol=1e-4)
    both.total.backward()
    assert d.fc1.weight.grad.abs().sum() > 0
    assert heads.depth.weight.grad is None, "the teacher heads stay frozen"
    assert projector_of(model, family).parameters().__next__().grad is not None
    detach_p4d(model)
    assert sorted(n for n, _ in model.named_parameters()) == names


# ---------------------------------------------------------------------------------------------
# Unsupported models, kernels flag, examples
# ---------------------------------------------------------------------------------------------


def test_an_unsupported_model_names_its_class_and_what_is_missing():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    lm = Qwen2ForCausalLM(Qwen2Config(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=1, intermediate_size=32))
    with pytest.raises(TypeError, match=r"Qwen2ForCausalLM is not supported: .*multi_modal_projector.*merger"):
        apply_rgpt4d(lm)
    model = tiny_model("llava")
    owner = model if hasattr(model, "multi_modal_projector") else model.model
    del owner.multi_modal_projector
    with pytest.raises(TypeError, match=r"LlavaForConditionalGeneration lacks a `multi_modal_projector` module"):
        apply_rgpt4d(model)


def test_patching_twice_is_refused_and_remove_is_idempotent():
    model = apply_rgpt4d(tiny_model("llava"))
    with pytest.raises(RuntimeError, match="already patched"):
        apply_rgpt4d(model)
    remove_rgpt4d(model)
    remove_rgpt4d(model)
    assert "forward" not in model.__dict__
    assert not part(model, "multi_modal_projector")._forward_pre_hooks
    assert not part(model, "language_model")._forward_pre_hooks


@pytest.mark.parametrize("family,video", [("qwen2_vl", True), ("llava", False)], ids=["qwen2_vl-video", "llava-images"])
def test_kernels_flag_applies_the_kernels_with_tpe_and_remove_restores_the_model(family, video):
    """apply_rgpt4d(kernels=True) runs rgpt4d.integrations.kernels on the language model: a training
    step with labels and timestamps gives TPE-only's loss and gradients (fp32 tolerance) through the
    fused LM head (no logits); remove_rgpt4d leaves the model bit for bit as it was."""
    import transformers

    from rgpt4d.integrations.kernels import kernels_applied

    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip(f"apply_kernels patches transformers 5's module layout; this is transformers {transformers.__version__}")

    _have(family)
    model = tiny_model(family).train()
    kw, ts = tiny_inputs(family, model, frames=FRAMES, video=video, labels=True, text=TEXT["tiny"])
    assert (kw["labels"] != -100).sum() == 2 * (TEXT["tiny"] // 2)
    classes = {n: type(m) for n, m in model.named_modules()}
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    plain = train_step(model, kw)

    apply_rgpt4d(model)
    assert kernels_applied(model) == {}  # no kernels without the flag
    tpe = train_step(model, kw, timestamps=ts)
    remove_rgpt4d(model)
    assert not torch.equal(tpe[0], plain[0])  # TPE changes the loss: the comparison below sees it

    apply_rgpt4d(model, kernels=True)
    counts = kernels_applied(model)  # 2 decoder layers: 2 norms each and the final one
    assert counts == {"rms_norm": 5, "swiglu": 2, "rope": 2, "lm_head": 1}, counts
    loss, logits, grads = train_step(model, kw, timestamps=ts)
    assert logits is None and tpe[1] is not None  # the fused head + loss ran instead of transformers' head
    torch.testing.assert_close(loss, tpe[0])
    assert grads.keys() == tpe[2].keys()
    for n in grads:
        torch.testing.assert_close(grads[n], tpe[2][n], atol=1e-6, rtol=1e-4, msg=lambda m: f"{n}: {m}")

    remove_rgpt4d(model)
    assert kernels_applied(model) == {}
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert "forward" not in model.__dict__ and not model._forward_pre_hooks and not model._forward_hooks
    state = model.state_dict()
    assert state.keys() == weights.keys() and all(torch.equal(state[k], weights[k]) for k in weights)
    again = train_step(model, kw)
    assert torch.equal(again[0], plain[0]) and torch.equal(again[1], plain[1])
    assert again[2].keys() == plain[2].keys() and all(torch.equal(again[2][n], plain[2][n]) for n in plain[2])


EXAMPLES = sorted(p.name for p in (Path(__file__).resolve().parents[2] / "examples").glob("*_dropin.py"))


def test_there_is_an_example_per_family():
    assert EXAMPLES == sorted(f"{f}_dropin.py" for f in ("llava", "llava_onevision", "llava_next_video", "qwen2_vl",
                                                         "qwen2_5_vl", "qwen3_vl", "internvl"))


@pytest.mark.parametrize("name", EXAMPLES)
def test_the_example_runs(name, capsys, monkeypatch):
    import runpy

    _have(name[:-len("_dropin.py")], video=False)

    root = Path(__file__).resolve().parents[2] / "examples"
    monkeypatch.syspath_prepend(str(root))
    runpy.run_path(str(root / name), run_name="__main__")
    out = capsys.readouterr().out
    runs = out.count("== ")
    assert runs >= 1
    assert out.count("unchanged: True") == runs and out.count("patch removed before saving: True") == runs
    assert out.count("P4D loss") == runs


@pytest.mark.parametrize("family", ["llava_onevision", "llava_next_video"])
def test_tpe_on_any_resolution_images_gives_every_crop_its_image_time(family):
    """One image per sample at 32 x 32 pixels: the base crop and four 16-pixel tiles, all from one
    frame, all get that image's timestamp."""
    _have(family)
    model = tiny_model(family)
    g = torch.Generator().manual_seed(3)
    pv = torch.randn(2, 5, 3, 16, 16, generator=g)
    sizes = torch.tensor([[32, 32], [32, 32]])
    with torch.no_grad():  # the number of image tokens the model places (base + unpadded tiles + newlines)
        feats = model.get_image_features(pixel_values=pv, image_sizes=sizes, vision_feature_layer=-1,
                                         vision_feature_select_strategy="full")
        feats = getattr(feats, "pooler_output", feats)
    if feats[0].dim() == 3:
        pytest.skip("this transformers' get_image_features returns unpacked crops: the test cannot count the image "
                    "tokens (transformers 5 returns them packed)")
    n = feats[0].shape[0]
    ids = torch.cat([torch.full((2, 1), 5), torch.full((2, n), IMAGE), torch.randint(1, 50, (2, 3), generator=g)], 1)
    kw = {"input_ids": ids, "pixel_values": pv, "image_sizes": sizes}
    ts = torch.tensor([1.5, 7.25])
    rows = ts.double().repeat_interleave(5)

    def hook(module, args):
        x = args[0]
        assert x.shape[0] == rows.numel()
        return ((x.double() + sinusoid(rows, x.shape[-1])[:, None]).to(x.dtype),)

    h = projector_of(model, family).register_forward_pre_hook(hook)
    with torch.no_grad():
        ref = model(**kw).logits
    h.remove()
    apply_rgpt4d(model)
    with torch.no_grad():
        patched = model(**kw, timestamps=ts).logits
    torch.testing.assert_close(patched, ref, atol=2e-4, rtol=2e-4)
    with pytest.raises(ValueError, match="got 10 timestamps for 2 image frame"):
        model(**kw, timestamps=ts.repeat_interleave(5))


@pytest.mark.parametrize("family,video", [("llava", False), ("qwen2_5_vl", True)])
def test_bf16_model(family, video):
    """A bf16 model: TPE (computed in fp32 by the op) and region tokens run, close to the eager hook."""
    _have(family, video)
    model = tiny_model(family).to(torch.bfloat16)
    kw, ts = tiny_inputs(family, model, frames=FRAMES, video=video, obj=True)
    for k in ("pixel_values", "pixel_values_videos"):
        if k in kw:
            kw[k] = kw[k].to(torch.bfloat16)
    ref = eager_tpe_logits(model, family, kw, ts, video).float()
    apply_rgpt4d(model, obj_token_ids=list(OBJ))
    with torch.no_grad():
        patched = model(**kw, timestamps=ts).logits.float()
        regions = model(**kw, timestamps=ts, boxes=torch.tensor([[[0.0, 0, 8, 8]], [[1.0, 1, 9, 9]]])).logits
    torch.testing.assert_close(patched, ref, atol=3e-2, rtol=3e-2)
    assert regions.dtype == torch.bfloat16 and bool(torch.isfinite(regions).all())


def test_tpe_only_needs_no_grid_and_no_equal_frames_per_sample():
    """TPE alone works with frames spread unevenly over the samples; boxes without frames are an error."""
    model = tiny_model("llava")
    kw, ts = tiny_inputs("llava", model, batch=2, frames=FRAMES)
    kw["pixel_values"] = kw["pixel_values"][:7]  # 7 images: sample 0 has 4, sample 1 has 3
    P = (16 // 4) ** 2
    kw["input_ids"][1, 1 + 3 * P:1 + 4 * P] = 7
    flat = ts.reshape(-1)[:7]
    ref = eager_tpe_logits(model, "llava", kw, flat, False)
    apply_rgpt4d(model, obj_token_ids=list(OBJ))
    with torch.no_grad():
        torch.testing.assert_close(model(**kw, timestamps=flat).logits, ref, atol=2e-4, rtol=2e-4)
    with pytest.raises(ValueError, match="need the same number of frames per sample"):
        model(**kw, timestamps=flat, boxes=torch.zeros(2, 1, 4))
    kw.pop("pixel_values")
    with pytest.raises(ValueError, match="boxes: given without frames"):
        model(**kw, boxes=torch.zeros(2, 1, 4))
