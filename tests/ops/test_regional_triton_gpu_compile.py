"""The Triton regional kernels compile for an H100 (sm_90) with Triton's own ptxas, no GPU needed:
catches GPU-only compile errors (constexpr specialisation, tl.dot shapes) that the interpreter does
not see. Slow when Triton's cache is cold (minutes on 2 cores): opt in with RGPT4D_TRITON_GPU_COMPILE=1."""

import os
import subprocess
import sys

import pytest

SCRIPT = r'''
import os
os.environ.pop("TRITON_INTERPRET", None)
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import rgpt4d.kernels.regional as K

def compile_one(fn, types, consts):
    sig = {n: ("constexpr" if n in consts else types.get(n, "i32")) for n in fn.arg_names}
    triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32))

for ACC, f, feat in ((tl.float32, "*fp32", "*bf16"), (tl.float64, "*fp64", "*fp64")):
    i64 = {n: "i64" for n in ("s_outer", "s_inner", "sC", "sH", "sW", "s0", "s1", "s2", "sy", "sx")}
    fl = {n: "fp32" for n in ("spatial_scale", "offset", "log_base", "eps")}
    ptrs = {n: f for n in ("boxes_ptr", "table_ptr", "grad_ptr", "gbuf_ptr", "m_ptr", "mt_ptr", "invz_ptr", "gn_ptr",
                           "gf_ptr", "gfr_ptr", "s_ptr", "gm_ptr")}
    ptrs.update(feat_ptr=feat, out_ptr=feat, img_ptr="*i64", ts_ptr="*i64", order_ptr="*i64", start_ptr="*i64")
    types = {**i64, **fl, **ptrs}
    dot = ACC == tl.float32
    compile_one(K._roi_pool_fwd_kernel, types, dict(ALIGNED=True, HAS_ENC=True, HAS_TABLE=True, ACC=ACC, BLOCK_P=64,
                                                    BLOCK_S=4, BLOCK_C=32))
    compile_one(K._roi_pool_bwd_atomic_kernel, types, dict(ALIGNED=False, ACC=ACC, BLOCK_P=1, BLOCK_S=16, BLOCK_C=512))
    compile_one(K._roi_pool_bwd_ordered_kernel, types, dict(ALIGNED=False, ACC=ACC, BLOCK_C=128))
    compile_one(K._resize_masks_kernel, types, dict(ACC=ACC, BLOCK_P=1024))
    compile_one(K._mask_pool_fwd_kernel, {**types, "ts_ptr": f}, dict(HAS_ENC=True, HAS_TABLE=False, ACC=ACC,
                USE_DOT=dot, BLOCK_R=16, BLOCK_P=64, BLOCK_C=64))
    compile_one(K._mask_pool_dfeat_kernel, {**types, "feat_ptr": f}, dict(ACC=ACC, USE_DOT=dot, BLOCK_R=16,
                BLOCK_P=64, BLOCK_C=64))
    compile_one(K._mask_pool_gf_kernel, {**types, "feat_ptr": f}, dict(ACC=ACC, USE_DOT=dot, BLOCK_R=16, BLOCK_P=64,
                BLOCK_C=64))
    compile_one(K._resize_transpose_kernel, types, dict(ACC=ACC, NY=8, NX=8, BLOCK_Q=128))
print("compiled")
'''


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("RGPT4D_TRITON_GPU_COMPILE") != "1",
                    reason="opt-in (minutes with a cold Triton cache): set RGPT4D_TRITON_GPU_COMPILE=1")
def test_triton_regional_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, cwd=root, timeout=1800)
    assert r.returncode == 0 and "compiled" in r.stdout, r.stderr[-4000:]
