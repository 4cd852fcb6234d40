"""The base install (torch + numpy) runs every op: `import rgpt4d.ops` and each op work with the
model stack's packages (transformers, tokenizers, safetensors, matplotlib, tqdm, nvtx, PIL) and
triton absent. A subprocess sees a copy of this venv's site-packages (symlinks) without those
packages, run with `python -S`, so they are not installed as far as it can tell."""

import os
import subprocess
import sys
from pathlib import Path

import rgpt4d

BLOCKED = ("transformers", "tokenizers", "safetensors", "matplotlib", "tqdm", "nvtx", "PIL", "triton",
           "torchvision", "xformers", "av")

SCRIPT = r'''
import sys

import importlib
import importlib.util

BLOCKED = set(sys.argv[1].split(","))
for name in BLOCKED:  # the simulation holds: none of them can be imported
    assert importlib.util.find_spec(name) is None, name

import torch

import rgpt4d
import rgpt4d.ops as ops
from rgpt4d.ops import registry

loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
assert not loaded, f"blocked packages were imported: {loaded}"
assert registry.extension_loaded(), registry.unavailable_reasons()
why = ops.unavailable_reasons()
assert "triton" in why and "not installed" in why["triton"], why
assert ops.available_backends()[:2] == ["eager", "cpu"], ops.available_backends()
try:
    ops.tpe_add(torch.zeros(1, 1, 1, 4), torch.zeros(1, 1), backend="triton")
except ops.BackendUnavailableError as e:
    assert "triton is not installed" in str(e), e
else:
    raise AssertionError("backend='triton' ran without triton")

g = torch.Generator().manual_seed(0)


def r(*shape, dtype=torch.float64):
    return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_()


def run(name, fn, *args):
    """fn(*args, backend=...) on the compiled CPU backend and on eager: outputs and gradients agree."""
    results = []
    for backend in ("cpu", "eager"):
        leaves = [a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
                  for a in args]
        out = fn(*leaves, backend=backend)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        outs = [o for o in outs if isinstance(o, torch.Tensor) and o.is_floating_point()]
        if any(o.requires_grad for o in outs):
            sum((o * (1 + torch.arange(o.numel(), dtype=o.dtype).view(o.shape))).sum() for o in outs).backward()
        grads = [a.grad for a in leaves if isinstance(a, torch.Tensor) and a.requires_grad]
        results.append((outs, grads))
    (o1, g1), (o2, g2) = results
    assert len(o1) == len(o2) > 0 and len(g1) == len(g2), name
    for a, b in zip(o1 + g1, o2 + g2):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=lambda m: f"{name}: {m}")
    print("ok", name)


B, T, N, D = 2, 3, 5, 8
ts = torch.rand(B, T, generator=g, dtype=torch.float64) * 10
run("tpe_add", lambda x, t, backend: ops.tpe_add(x, t, backend=backend), r(B, T, N, D), ts)
run("tpe_add_", lambda x, t, backend: ops.tpe_add_(x.clone(), t, backend=backend),  # inference-only
    r(B, T, N, D).detach(), ts)
run("tpe_downsample_layernorm",
    lambda x, t, w, b, backend: ops.tpe_downsample_layernorm(x, t, None, w, b, grid=(3, 4), window=2, backend=backend),
    r(B, T, 12, D), ts, r(4 * D), r(4 * D))
feats = r(B, T, 4, 7, 6)
boxes = torch.tensor([[0.5, 0.5, 4.0, 5.0], [1.0, 0.0, 5.5, 3.0]], dtype=torch.float64).expand(B, T, 2, 4)
run("region_pool", lambda f, bx, backend: ops.region_pool(f, bx, output_size=(2, 2), timestamps=ts, backend=backend),
    feats, boxes)
run("mask_pool", lambda f, m, backend: ops.mask_pool(f, m, timestamps=ts, backend=backend), feats,
    torch.rand(B, T, 2, 9, 8, generator=g, dtype=torch.float64))
rois = torch.tensor([[0, 0.5, 0.5, 4.0, 5.0], [1, 1.0, 0.0, 5.5, 3.0]], dtype=torch.float64)
run("roi_align", lambda x, b, backend: ops.roi_align(x, b, (2, 3), 1.0, 2, True, backend=backend), r(2, 4, 7, 6), rois)
run("pixel_shuffle_act", lambda x, backend: ops.pixel_shuffle_act(x, 2, "exp", backend=backend), r(2, 8, 3, 5))
run("rms_norm", lambda x, w, backend: ops.rms_norm(x, w, backend=backend), r(3, 5, D), r(D))
run("swiglu", lambda a, b, backend: ops.swiglu(a, b, backend=backend), r(3, 5, D), r(3, 5, D))
cos, sin = torch.randn(1, 5, D, dtype=torch.float64), torch.randn(1, 5, D, dtype=torch.float64)
run("rope", lambda q, k, backend: ops.rope(q, k, cos, sin, backend=backend), r(2, 3, 5, D), r(2, 1, 5, D))
target = torch.tensor([1, 4, -100, 0, 6, 2])
run("fused_linear_cross_entropy",
    lambda h, w, backend: ops.fused_linear_cross_entropy(h, w, target, backend=backend), r(6, D), r(7, D))
run("fused_linear_latent_loss",
    lambda h, w, b, t, backend: ops.fused_linear_latent_loss(h, w, b, t, backend=backend),
    r(6, D), r(5, D), r(5), torch.randn(6, 5, dtype=torch.float64))
run("p4d_loss",
    lambda lp, lt, d, dt, backend: ops.p4d_loss(lp, lt, {"depth": d}, {"depth": dt}, backend=backend).total,
    r(2, 3, 4), torch.randn(2, 3, 4, dtype=torch.float64), r(2, 1, 4, 4), torch.rand(2, 1, 4, 4, dtype=torch.float64))
run("attention", lambda q, k, v, backend: ops.attention(q, k, v, causal=True, backend=backend),
    r(1, 2, 5, D), r(1, 2, 5, D), r(1, 2, 5, D))
enc = ops.tpe_sinusoid(ts, D, dtype=torch.float64)
torch.testing.assert_close(enc[..., 0], torch.sin(ts))  # dimension 0: sin(t / base^0)
print("ok tpe_sinusoid")
print("all ops ran")
'''


def _site_packages_without(blocked, dest: Path) -> Path:
    """dest/ with a symlink to every entry of this interpreter's site-packages except the blocked
    packages and their .dist-info (names compared case-insensitively, "-"/"_" alike)."""
    import torch

    src = Path(torch.__file__).resolve().parents[1]
    skip = {b.lower() for b in blocked} | {"pillow"}  # PIL's distribution is called pillow
    dest.mkdir()
    for entry in src.iterdir():
        top = entry.name.split("-")[0].split(".")[0].lower().replace("-", "_")
        if top not in skip and not entry.name.endswith(".pth"):
            (dest / entry.name).symlink_to(entry)
    return dest


def test_ops_run_without_the_model_stack_and_triton(tmp_path):
    sp = _site_packages_without(BLOCKED, tmp_path / "site-packages")
    root = Path(rgpt4d.__file__).resolve().parents[1]
    # the rgpt4d under test: a source checkout's, else the installed one (in the filtered copy)
    path = [str(root), str(sp)] if (root / "setup.py").is_file() else [str(sp)]
    # No TRITON_INTERPRET: the point is the base install; RGPT4D_BACKEND unset so the ops pick their
    # backend as a user's would. -S: no site-packages but the filtered copy on PYTHONPATH.
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "RGPT4D_BACKEND", "PYTHONPATH")}
    env["PYTHONPATH"] = os.pathsep.join(path)
    r = subprocess.run([sys.executable, "-S", "-c", SCRIPT, ",".join(BLOCKED)], capture_output=True, text=True,
                       env=env, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "all ops ran" in r.stdout
    assert r.stdout.count("ok ") == 15, r.stdout
