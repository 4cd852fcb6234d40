"""The Triton regional kernels compile for an H100 (sm_90) with Triton's own ptxas, no GPU needed, at
the configurations their launchers pick for the paper shapes, with no register spills (ptxas -v), and
the fp64 kernels compute in fp64 (no fp32 scalar argument: a Python float would be compiled as one).
Catches GPU-only compile errors (constexpr specialisation, tl.dot shapes) that the interpreter does not
see. About a minute with a cold Triton cache on 2 cores (seconds when warm); the compiles run in a
subprocess (TRITON_INTERPRET must be unset before triton.jit runs)."""

import json
import os
import subprocess
import sys

import pytest

SCRIPT = r'''
import json, math, os, re, subprocess, sys, tempfile
os.environ.pop("TRITON_INTERPRET", None)
import torch, triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import rgpt4d.kernels.regional as K

PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
GPU = torch.device("cuda")  # the launchers' block choices for a GPU tensor (no GPU is touched)
rows = []

def compile_one(fn, types, consts, num_warps=4, label=""):
    sig = {n: ("constexpr" if n in consts else types.get(n, "i32")) for n in fn.arg_names}
    ck = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                        options=dict(num_warps=num_warps))
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        open(src, "w").write(ck.asm["ptx"])
        r = subprocess.run([PTXAS, "-arch=sm_90a", "-v", src, "-o", os.path.join(d, "k.o")], capture_output=True,
                           text=True)
    regs = re.search(r"Used (\d+) registers", r.stderr)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", r.stderr)
    ttir = ck.asm["ttir"]
    head = ttir[ttir.index("tt.func public"):].split("{", 1)[0]  # the kernel's signature
    rows.append(dict(kernel=fn.__name__, config=label, regs=int(regs.group(1)) if regs else -1,
                     spill_stores=int(spill.group(1)) if spill else -1, spill_loads=int(spill.group(2)) if spill else -1,
                     f32_args=len(re.findall(r": f32", head)), f64_loads=len(re.findall(r"tt.load .*: !tt.ptr<f64>", ttir)),
                     ptxas=r.returncode))

for ACC, f, feat in ((tl.float32, "*fp32", "*bf16"), (tl.float64, "*fp64", "*fp64")):
    i64 = {n: "i64" for n in ("s_outer", "s_inner", "sC", "sH", "sW", "s0", "s1", "s2", "sy", "sx", "s_lo", "s_hi",
                              "NPIX")}
    sc = "fp32" if ACC == tl.float32 else "*fp64"  # host floats: _host_scalar
    fl = {n: sc for n in ("spatial_scale", "log_base", "eps")}
    ptrs = {n: f for n in ("boxes_ptr", "table_ptr", "grad_ptr", "gbuf_ptr", "m_ptr", "mt_ptr", "invz_ptr", "gn_ptr",
                           "gf_ptr", "gfr_ptr", "s_ptr", "gm_ptr", "w_ptr")}
    ptrs.update(feat_ptr=feat, out_ptr=feat, gt_ptr=feat, img_ptr="*i64", ts_ptr="*i64", cnt_ptr="*i64",
                first_ptr="*i64", key_ptr="*i64", row_ptr="*i64", start_ptr="*i64")
    types = {**i64, **fl, **ptrs}
    name = "fp32" if ACC == tl.float32 else "fp64"
    # detector: roi_align 1x256x200x200, 512 boxes, 7x7, sampling ratio 2 and adaptive;
    # 4D-RGPT: region_pool C=1152 at 1x1 and 2x2 (adaptive), TPE table
    for P, ph, pw, C, sr, enc in ((49, 7, 7, 256, 2, False), (49, 7, 7, 256, -1, False), (1, 1, 1, 1152, -1, True),
                                  (4, 2, 2, 1152, -1, True)):
        BP, BS, BC, nw = K._pool_blocks(P, C, sr, GPU, torch.float32 if ACC == tl.float32 else torch.float64)
        label = f"{name} P{P} C{C} sr{sr}"
        compile_one(K._roi_pool_fwd_kernel, types, dict(ALIGNED=True, HAS_ENC=enc, HAS_TABLE=enc, ACC=ACC, BLOCK_P=BP,
                    BLOCK_S=BS, BLOCK_C=BC), nw, label)
        compile_one(K._roi_pool_bwd_atomic_kernel, types, dict(ALIGNED=False, ACC=ACC, BLOCK_P=BP, BLOCK_S=BS,
                    BLOCK_C=BC), nw, label)
        BX, BC = K._segment_blocks(C)
        for acc in (False, True):
            compile_one(K._roi_segment_sum_kernel, types, dict(ACCUMULATE=acc, ACC=ACC, BLOCK_X=BX, BLOCK_C=BC),
                        4, f"{label} accumulate={acc}")
    compile_one(K._roi_sample_counts_kernel, types, dict(ALIGNED=True, ACC=ACC, BLOCK_K=256), 4, name)
    compile_one(K._roi_entries_kernel, types, dict(ALIGNED=True, ACC=ACC, BLOCK_S=128), 4, name)
    # mask_pool: B=2, T=16, C=1152, 27x27 grid, R=8 masks at 384x384
    H = W = 27
    compile_one(K._resize_masks_kernel, types, dict(ACC=ACC, BLOCK_P=min(triton.next_power_of_2(H * W), 1024)), 4,
                name)
    dot, BR, BP, BC = K._mm_blocks(8, 1152, H * W, torch.float32 if ACC == tl.float32 else torch.float64)
    mm = dict(ACC=ACC, USE_DOT=dot, BLOCK_R=BR, BLOCK_P=BP, BLOCK_C=BC)
    compile_one(K._mask_pool_fwd_kernel, {**types, "ts_ptr": f}, dict(HAS_ENC=True, HAS_TABLE=False, **mm), 4, name)
    compile_one(K._mask_pool_dfeat_kernel, {**types, "feat_ptr": f}, mm, 4, name)
    compile_one(K._mask_pool_gf_kernel, {**types, "feat_ptr": f}, mm, 4, name)
    for Hm in (384, 4):  # downsampled masks (paper) and upsampled ones (more candidates per source pixel)
        NY, NX, BQ = K._transpose_blocks(Hm, Hm, H, W)
        compile_one(K._resize_transpose_kernel, types, dict(ACC=ACC, NY=NY, NX=NX, BLOCK_Q=BQ), 4,
                    f"{name} masks {Hm}x{Hm}")
print("ROWS" + json.dumps(rows))
'''


def _compile_rows():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, cwd=root, timeout=1800)
    assert r.returncode == 0 and "ROWS" in r.stdout, r.stderr[-4000:]
    return json.loads(r.stdout.split("ROWS", 1)[1])


@pytest.fixture(scope="module")
def compiled():
    try:
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except ImportError as e:
        pytest.skip(f"triton with its NVIDIA backend is needed to compile for sm_90: {e}")
    return _compile_rows()


def test_triton_regional_kernels_compile_for_sm90_without_spills(compiled):
    for r in compiled:
        print(f"{r['kernel']:30s} {r['config']:36s} regs {r['regs']:3d}  spill stores {r['spill_stores']:5d} B  "
              f"loads {r['spill_loads']:5d} B")
    assert all(r["ptxas"] == 0 and r["regs"] > 0 for r in compiled), [r for r in compiled if r["ptxas"] != 0]
    spilled = [r for r in compiled if r["spill_stores"] or r["spill_loads"]]
    assert not spilled, spilled


def test_fp64_kernels_take_no_fp32_scalars(compiled):
    fp64 = [r for r in compiled if r["config"].startswith("fp64")]
    assert fp64
    assert all(r["f32_args"] == 0 for r in fp64), [r for r in fp64 if r["f32_args"]]
    # the host floats are read as fp64 from memory where the kernel takes them
    for name in ("_roi_pool_fwd_kernel", "_roi_pool_bwd_atomic_kernel", "_roi_entries_kernel", "_resize_masks_kernel",
                 "_mask_pool_fwd_kernel"):
        assert all(r["f64_loads"] > 0 for r in fp64 if r["kernel"] == name), name
    fp32 = [r for r in compiled if r["config"].startswith("fp32") and r["kernel"] == "_roi_pool_fwd_kernel"]
    assert all(r["f32_args"] > 0 for r in fp32)  # the check above can fail: fp32 kernels do take fp32 scalars
