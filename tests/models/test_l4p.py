"""Teacher4D.from_l4p on a tiny checkpoint written here in L4P's Lightning layout (every name and
rule of ../shared/CHECKPOINTS.md kept, every size scaled down), against a plain reference forward of
the same weights written below from the documented layout."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rgpt4d.models.teacher import Teacher4D, TeacherOutput, l4p_spec

DIM, DEPTH, HEADS, MLP, PATCH, TUBELET = 32, 3, 4, 48, 4, 2
IMAGE, FRAMES = 16, 4
HOOKS = (1, 2, 2, 3)
LAYER_DIMS, FEATURES, LAST = (8, 16, 24, 24), 16, 8
# act_postprocess / fusion factors of L4P's dense heads and of its camray head
DENSE = (((1, 2, 2), (1, 1, 1), (0, 0, 0), (-1, -1, -1)), ((1, 2, 2), (1, 2, 2), (2, 2, 2), (2, 2, 2)))
CAMRAY = (((1, 0, 0), (1, 0, 0), (0, 0, 0), (-1, -1, -1)), ((1, 1, 1), (1, 1, 1), (2, 1, 1), (2, 2, 2)))
TASKS = {"depth": (1, DENSE), "flow_2d_backward": (2, DENSE), "dyn_mask": (1, DENSE), "camray": (6, CAMRAY)}


def _r(g, *shape, scale=None):
    fan = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
    return torch.randn(*shape, generator=g) * (scale if scale is not None else fan ** -0.5)


def _resample_weight(g, c, s):
    if all(x == 0 for x in s):
        return None
    if any(x > 0 for x in s):  # ConvTranspose3d, kernel = stride = 2^s: weight [in, out, k...]
        return _r(g, c, c, *(2 ** x for x in s), scale=0.3)
    k = tuple((2 ** -x // 2) * 2 + 1 for x in s)  # Conv3d downsampling
    return _r(g, c, c, *k)


def write_l4p_checkpoint(path, tasks=tuple(TASKS), seed=0):
    """A Lightning checkpoint: {'state_dict': {l4p_model.video_encoder.*, l4p_model.task_heads.*}}."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    e = "l4p_model.video_encoder."
    sd[e + "patch_embed.proj.weight"] = _r(g, DIM, 3, TUBELET, PATCH, PATCH)
    sd[e + "patch_embed.proj.bias"] = _r(g, DIM, scale=0.1)
    for i in range(DEPTH):
        b = f"{e}blocks.{i}."
        for n in ("norm1", "norm2"):
            sd[b + n + ".weight"] = 1 + _r(g, DIM, scale=0.1)
            sd[b + n + ".bias"] = _r(g, DIM, scale=0.1)
        sd[b + "attn.qkv.weight"] = _r(g, 3 * DIM, DIM)
        sd[b + "attn.q_bias"] = _r(g, DIM, scale=0.1)
        sd[b + "attn.v_bias"] = _r(g, DIM, scale=0.1)
        sd[b + "attn.proj.weight"] = _r(g, DIM, DIM)
        sd[b + "attn.proj.bias"] = _r(g, DIM, scale=0.1)
        sd[b + "mlp.fc1.weight"] = _r(g, MLP, DIM)
        sd[b + "mlp.fc1.bias"] = _r(g, MLP, scale=0.1)
        sd[b + "mlp.fc2.weight"] = _r(g, DIM, MLP)
        sd[b + "mlp.fc2.bias"] = _r(g, DIM, scale=0.1)
    sd[e + "norm.weight"] = 1 + _r(g, DIM, scale=0.1)
    sd[e + "norm.bias"] = _r(g, DIM, scale=0.1)
    for task in tasks:
        out, (post, _) = TASKS[task]
        h = f"l4p_model.task_heads.{task}.task_head.dpt."
        for i, c in enumerate(LAYER_DIMS):
            sd[f"{h}act_postprocess.{i}.0.weight"] = _r(g, c, DIM, 1, 1, 1)
            sd[f"{h}act_postprocess.{i}.0.bias"] = _r(g, c, scale=0.1)
            w = _resample_weight(g, c, post[i])
            if w is not None:
                sd[f"{h}act_postprocess.{i}.1.weight"] = w
                sd[f"{h}act_postprocess.{i}.1.bias"] = _r(g, c, scale=0.1)
            rn = _r(g, FEATURES, c, 3, 3, 3)
            sd[f"{h}scratch.layer{i + 1}_rn.weight"] = rn  # registered twice in L4P: the same tensor
            sd[f"{h}scratch.layer_rn.{i}.weight"] = rn
        for k in range(1, 5):
            f = f"{h}scratch.refinenet{k}."
            sd[f + "out_conv.weight"] = _r(g, FEATURES, FEATURES, 1, 1, 1)
            sd[f + "out_conv.bias"] = _r(g, FEATURES, scale=0.1)
            for u in (1, 2):
                for c in (1, 2):
                    sd[f"{f}resConfUnit{u}.conv{c}.weight"] = _r(g, FEATURES, FEATURES, 3, 3, 3, scale=0.02)
                    sd[f"{f}resConfUnit{u}.conv{c}.bias"] = _r(g, FEATURES, scale=0.1)
        sd[h + "head1.0.weight"] = _r(g, FEATURES // 2, FEATURES, 3, 3, 3)
        sd[h + "head1.0.bias"] = _r(g, FEATURES // 2, scale=0.1)
        sd[h + "head2.0.weight"] = _r(g, LAST, FEATURES // 2, 3, 3, 3)
        sd[h + "head2.0.bias"] = _r(g, LAST, scale=0.1)
        sd[h + "head2.2.weight"] = _r(g, out, LAST, 1, 1, 1, scale=0.1)
        sd[h + "head2.2.bias"] = _r(g, out, scale=0.1)
    # a sparse head 4D-RGPT drops
    sd["l4p_model.task_heads.track_2d.sam_head.mask_tokens.weight"] = _r(g, 4, 8)
    torch.save({"state_dict": sd, "epoch": 3, "global_step": 100}, path)
    return sd


# ---- the reference: L4P's forward, written out plainly from the layout --------------------------


def ref_sinusoid(n, d):
    table = np.array([[p / np.power(10000, 2 * (j // 2) / d) for j in range(d)] for p in range(n)])
    table[:, 0::2] = np.sin(table[:, 0::2])
    table[:, 1::2] = np.cos(table[:, 1::2])
    return torch.tensor(table, dtype=torch.float32)


def ref_features(sd, video):
    """video [B, 3, T, H, W] normalised -> L4P's list of DEPTH + 1 features [B, N, C]."""
    e = "l4p_model.video_encoder."
    x = F.conv3d(video, sd[e + "patch_embed.proj.weight"], sd[e + "patch_embed.proj.bias"],
                 stride=(TUBELET, PATCH, PATCH))
    x = x.flatten(2).transpose(1, 2)
    x = x + ref_sinusoid(x.shape[1], DIM)
    feats = [x]
    for i in range(DEPTH):
        b = f"{e}blocks.{i}."
        y = F.layer_norm(x, (DIM,), sd[b + "norm1.weight"], sd[b + "norm1.bias"], eps=1e-6)
        bias = torch.cat([sd[b + "attn.q_bias"], torch.zeros(DIM), sd[b + "attn.v_bias"]])
        qkv = y @ sd[b + "attn.qkv.weight"].T + bias
        B, N, _ = qkv.shape
        q, k, v = qkv.reshape(B, N, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
        att = ((q * (DIM // HEADS) ** -0.5) @ k.transpose(-1, -2)).softmax(-1)
        o = (att @ v).transpose(1, 2).reshape(B, N, DIM)
        x = x + o @ sd[b + "attn.proj.weight"].T + sd[b + "attn.proj.bias"]
        y = F.layer_norm(x, (DIM,), sd[b + "norm2.weight"], sd[b + "norm2.bias"], eps=1e-6)
        y = F.gelu(y @ sd[b + "mlp.fc1.weight"].T + sd[b + "mlp.fc1.bias"])
        x = x + y @ sd[b + "mlp.fc2.weight"].T + sd[b + "mlp.fc2.bias"]
        feats.append(x)
    feats[-1] = F.layer_norm(feats[-1], (DIM,), sd[e + "norm.weight"], sd[e + "norm.bias"], eps=1e-6)
    return feats


def ref_head(sd, task, feats, hooks, T, H, W):
    """L4P's DPT head -> [B, C, T, H', W'] (H' = H for dense maps, the token grid for camray)."""
    h = f"l4p_model.task_heads.{task}.task_head.dpt."
    post, fusion = TASKS[task][1]
    nt, nh, nw = T // TUBELET, H // PATCH, W // PATCH
    layers = []
    for i, hook in enumerate(hooks):
        x = feats[hook].reshape(feats[hook].shape[0], nt, nh, nw, DIM).permute(0, 4, 1, 2, 3)
        x = F.conv3d(x, sd[f"{h}act_postprocess.{i}.0.weight"], sd[f"{h}act_postprocess.{i}.0.bias"])
        s = post[i]
        if any(v > 0 for v in s):
            stride = tuple(2 ** v for v in s)
            x = F.conv_transpose3d(x, sd[f"{h}act_postprocess.{i}.1.weight"], sd[f"{h}act_postprocess.{i}.1.bias"],
                                   stride=stride)
        elif any(v < 0 for v in s):
            stride = tuple(2 ** -v for v in s)
            x = F.conv3d(x, sd[f"{h}act_postprocess.{i}.1.weight"], sd[f"{h}act_postprocess.{i}.1.bias"],
                         stride=stride, padding=tuple(v // 2 for v in stride))
        layers.append(F.conv3d(x, sd[f"{h}scratch.layer{i + 1}_rn.weight"], padding=1))

    def rcu(x, p):
        y = F.conv3d(F.relu(x), sd[p + "conv1.weight"], sd[p + "conv1.bias"], padding=1)
        return x + F.conv3d(F.relu(y), sd[p + "conv2.weight"], sd[p + "conv2.bias"], padding=1)

    def fuse(k, x, skip=None):
        p = f"{h}scratch.refinenet{k}."
        if skip is not None:
            x = x + rcu(skip, p + "resConfUnit1.")
        x = rcu(x, p + "resConfUnit2.")
        x = F.interpolate(x, scale_factor=fusion[k - 1], mode="trilinear", align_corners=True)
        return F.conv3d(x, sd[p + "out_conv.weight"], sd[p + "out_conv.bias"])

    p4 = fuse(4, layers[3])[:, :, :layers[2].shape[2], :layers[2].shape[3]]
    p1 = fuse(1, fuse(2, fuse(3, p4, layers[2]), layers[1]), layers[0])
    out = F.conv3d(p1, sd[h + "head1.0.weight"], sd[h + "head1.0.bias"], padding=1)
    size = (T, nh, nw) if task == "camray" else (T, H, W)
    if tuple(out.shape[-3:]) != size:
        out = F.interpolate(out, size=size, mode="trilinear", align_corners=True)
    out = F.relu(F.conv3d(out, sd[h + "head2.0.weight"], sd[h + "head2.0.bias"], padding=1))
    out = F.conv3d(out, sd[h + "head2.2.weight"], sd[h + "head2.2.bias"])
    return torch.exp(out) if task == "depth" else out


def ref_normalize(frames01):
    """[B, T, 3, H, W] in [0, 1] at the teacher's size -> [B, 3, T, H, W] ImageNet-normalised."""
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 1, 3, 1, 1)
    return ((frames01 - mean) / std).permute(0, 2, 1, 3, 4)


# ---- tests ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def l4p_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("l4p") / "l4p.ckpt"
    sd = write_l4p_checkpoint(path)
    return path, sd


def _load(path, **kw):
    return Teacher4D.from_l4p(path, hooks=HOOKS, image_size=IMAGE, num_frames=FRAMES, num_heads=HEADS, **kw)


def test_encode_equals_reference_forward(l4p_ckpt):
    path, sd = l4p_ckpt
    teacher = _load(path)
    assert isinstance(teacher, Teacher4D)
    cfg = teacher.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size, cfg.patch_size, cfg.tubelet_size) == \
        (DIM, DEPTH, MLP, PATCH, TUBELET)
    assert cfg.heads == ("depth", "flow", "motion", "camray")
    frames = torch.randint(0, 256, (2, FRAMES, 3, IMAGE, IMAGE), dtype=torch.uint8)
    layers = teacher.encode(frames)
    feats = ref_features(sd, ref_normalize(frames.float() / 255))
    assert len(layers) == 4
    for hook, got in zip(HOOKS, layers):
        assert got.shape == (2, FRAMES // 2, IMAGE // PATCH, IMAGE // PATCH, DIM)
        torch.testing.assert_close(got, feats[hook].unflatten(1, got.shape[1:4]), atol=1e-5, rtol=1e-5)
    # float frames in [0, 1] are the same frames
    torch.testing.assert_close(teacher.encode(frames.float() / 255)[0], layers[0])
    torch.testing.assert_close(teacher.latent(frames), layers[-1])


def test_heads_equal_reference_forward(l4p_ckpt):
    path, sd = l4p_ckpt
    teacher = _load(path)
    frames = torch.rand(1, FRAMES, 3, IMAGE, IMAGE)
    out = teacher(frames)
    assert isinstance(out, TeacherOutput)
    feats = ref_features(sd, ref_normalize(frames))
    ref = {t: ref_head(sd, t, feats, HOOKS, FRAMES, IMAGE, IMAGE) for t in TASKS}
    assert out.depth.shape == (1, FRAMES, IMAGE, IMAGE) and out.flow.shape == (1, FRAMES, 2, IMAGE, IMAGE)
    assert out.motion.shape == (1, FRAMES, IMAGE, IMAGE)
    assert out.camray.shape == (1, FRAMES, 6, IMAGE // PATCH, IMAGE // PATCH)
    torch.testing.assert_close(out.depth, ref["depth"][:, 0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.flow, ref["flow_2d_backward"].permute(0, 2, 1, 3, 4), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.motion, ref["dyn_mask"][:, 0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.camray, ref["camray"].permute(0, 2, 1, 3, 4), atol=1e-5, rtol=1e-4)
    assert (out.depth > 0).all()
    # the heads through predict_heads on the layers encode gives (the path P4D takes)
    preds = teacher.predict_heads(out.layers)
    torch.testing.assert_close(preds["flow"], out.flow)


def test_tasks_select_heads_and_encoder_alone(l4p_ckpt, tmp_path):
    path, sd = l4p_ckpt
    assert list(_load(path, tasks=()).heads) == []
    t = _load(path, tasks=("flow", "dyn_mask"))
    assert list(t.heads) == ["flow", "motion"]
    out = t(torch.rand(1, FRAMES, 3, IMAGE, IMAGE))
    assert out.depth is None and out.camray is None and out.flow is not None
    # a checkpoint with only some heads: tasks=None takes those
    part = tmp_path / "part.ckpt"
    write_l4p_checkpoint(part, tasks=("depth",))
    assert list(_load(part).heads) == ["depth"]
    with pytest.raises(ValueError, match="tasks: the checkpoint has no 'camray' head"):
        _load(part, tasks=("camray",))
    with pytest.raises(ValueError, match="tasks: 'normals' is not one of"):
        _load(path, tasks=("normals",))
    # frozen
    assert not any(p.requires_grad for p in t.parameters())


def test_bad_inputs(l4p_ckpt, tmp_path):
    path, _ = l4p_ckpt
    with pytest.raises(ValueError, match="hooks: four encoder layers in 1..3"):
        Teacher4D.from_l4p(path, hooks=(1, 2, 3, 4), image_size=IMAGE, num_frames=FRAMES, num_heads=HEADS)
    with pytest.raises(ValueError, match="num_heads: 5 does not divide"):
        Teacher4D.from_l4p(path, hooks=HOOKS, image_size=IMAGE, num_frames=FRAMES, num_heads=5)
    with pytest.raises(FileNotFoundError, match="no L4P checkpoint"):
        Teacher4D.from_l4p(tmp_path / "missing.ckpt")
    bad = tmp_path / "bad.ckpt"
    torch.save({"state_dict": {"model.weight": torch.zeros(2)}}, bad)
    with pytest.raises(ValueError, match="not an L4P checkpoint"):
        Teacher4D.from_l4p(bad)
    t = _load(path)
    with pytest.raises(ValueError, match="frames: the teacher takes"):
        t.encode(torch.rand(1, FRAMES + 2, 3, IMAGE, IMAGE))


def test_load_reads_l4p_spec(l4p_ckpt):
    path, _ = l4p_ckpt
    spec = l4p_spec(path, hooks=HOOKS, image_size=IMAGE, num_frames=FRAMES, num_heads=HEADS, tasks=("depth",))
    t = Teacher4D.load(spec)
    assert t.config.head_layers == HOOKS and list(t.heads) == ["depth"]
    frames = torch.rand(1, FRAMES, 3, IMAGE, IMAGE)
    torch.testing.assert_close(t.encode(frames)[2], _load(path).encode(frames)[2])
    with pytest.raises(ValueError, match="unknown option 'frames'"):
        Teacher4D.load(f"l4p:{path}?frames=4")


def test_teacher_cache_cli_with_l4p(l4p_ckpt, tmp_path):
    """`rgpt4d teacher cache --teacher PATH.ckpt ...`: per video, the L4P teacher's hooked layers and
    explicit outputs; the cache index records the spec, which Teacher4D.load reads back."""
    import json

    from safetensors.torch import load_file

    from rgpt4d.cli import main
    from rgpt4d.data import Synth4DVideos

    path, _ = l4p_ckpt
    data, out = tmp_path / "data", tmp_path / "cache"
    assert main(["data", "make", "--out", str(data), "--num-videos", "12", "--frames", str(FRAMES), "--size", "24",
                 "--min-objects", "2", "--max-objects", "4",
                 "--workers", "1", "--val-fraction", "0.25", "--test-fraction", "0.25", "--overwrite",
                 "--quiet"]) == 0
    assert main(["teacher", "cache", "--teacher", str(path), "--data", str(data), "--out", str(out),
                 "--image-size", str(IMAGE), "--num-frames", str(FRAMES), "--hooks", ",".join(map(str, HOOKS)),
                 "--splits", "train", "--batch-size", "2", "--quiet"]) == 0
    index = json.loads((out / "cache_index.json").read_text())
    assert index["teacher"].startswith("l4p:") and index["videos"]
    teacher = Teacher4D.load(index["teacher"])
    assert teacher.config.head_layers == HOOKS
    ds = Synth4DVideos(data, "train", fields=("rgb",))
    item = ds[0]
    cached = load_file(str(out / f"{item['video_id']}.safetensors"))
    want = teacher(item["frames"][None])
    assert cached["layers"].shape == (4, FRAMES // 2, IMAGE // PATCH, IMAGE // PATCH, DIM)
    torch.testing.assert_close(cached["latent"].float(), want.latent[0], atol=2e-3, rtol=2e-3)  # stored as fp16
    torch.testing.assert_close(cached["flow"].float(), want.flow[0], atol=2e-3, rtol=2e-3)
    assert cached["depth"].shape == (FRAMES, IMAGE, IMAGE)
    # a student trains with L_LD and L_ED from this cache, through the L4P teacher's frozen heads (the
    # heads P4D has targets for: the cache holds depth, flow and motion)
    from rgpt4d.train import train_config, train_student

    cache3 = tmp_path / "cache3"
    assert main(["teacher", "cache", "--teacher", f"l4p:{path}", "--data", str(data), "--out", str(cache3),
                 "--image-size", str(IMAGE), "--num-frames", str(FRAMES), "--hooks", ",".join(map(str, HOOKS)),
                 "--tasks", "depth,flow,motion", "--splits", "train", "--quiet"]) == 0
    res = train_student(train_config("smoke", steps=1, batch_size=2, warmup=0, device="cpu"), data, cache3,
                        tmp_path / "student", progress=False, log=None)
    assert res["steps"] == 1 and res["loss_ld"] > 0 and res["loss_ed"] > 0 and math.isfinite(res["loss"])
    # a folder teacher takes no L4P options
    assert main(["teacher", "cache", "--teacher", str(tmp_path), "--data", str(data), "--out", str(out),
                 "--hooks", "1,2,2,3", "--quiet"]) == 2
