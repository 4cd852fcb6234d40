"""Compile every Triton kernel of kernels/ for an H100 (sm_90) with the installed Triton, no GPU needed,
at the configurations its launcher picks for the paper's shapes; report registers and spills.

    python -m tests.ops.triton_sm90 [--family tpe,p4d,lm,heads,regional] [--json]

How: the host wrappers in kernels/*.py run on fake CUDA tensors (torch's FakeTensorMode: shapes and
dtypes, no memory, no device) with JITFunction.run replaced by a recorder, so each launch's
arguments, constexprs and options are exactly what the launcher chooses on a GPU. Each recorded
launch is compiled with triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32)) (Triton's
cache makes a second run fast), and its PTX is assembled again with Triton's ptxas -v for the
register and spill counts. Float arguments are typed as Triton's JIT types them: by their
annotation (`eps: tl.float64`), else fp32.

Must run in a process without TRITON_INTERPRET=1 (tests/ops/test_triton_compile.py starts one).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time

FAMILIES = ("tpe", "p4d", "lm", "heads", "regional")

_DT = {"float32": "fp32", "float64": "fp64", "bfloat16": "bf16", "float16": "fp16", "int64": "i64", "int32": "i32",
       "int16": "i16", "int8": "i8", "uint8": "u8", "bool": "i1"}


# ---- the paper-shaped launches of each family ----------------------------------------------

def _tpe(K, torch, dtypes):
    for dt in dtypes:
        x = torch.randn(1, 16, 729, 1152, device="cuda", dtype=dt)
        secs = torch.rand(1, 16, device="cuda")
        table = torch.randn(500, 1152, device="cuda", dtype=dt)
        rows = torch.randint(0, 500, (1, 16), device="cuda")
        w = torch.randn(9 * 1152, device="cuda", dtype=dt)
        yield f"tpe_add sin {dt}", lambda: K.tpe_add(x, secs)
        yield f"tpe_add learned {dt}", lambda: K.tpe_add(x, rows, table)
        yield f"tpe_table_grad {dt}", lambda: K.tpe_table_grad(x, rows, 500, True)
        yield f"tpe_table_grad atomic {dt}", lambda: K.tpe_table_grad(x, rows, 500, False)
        out, mean, rstd = None, None, None

        def fwd():
            nonlocal out, mean, rstd
            out, mean, rstd = K.tpe_ds_ln_fwd(x, secs, None, w, w, 27, 27, 3, 1e-5)
        yield f"tpe_ds_ln_fwd D1152 window3 {dt}", fwd
        yield f"tpe_ds_ln_bwd D1152 window3 {dt}", lambda: K.tpe_ds_ln_bwd(out, x, secs, None, w, mean, rstd, 27, 27, 3)


def _p4d(K, torch, dtypes):
    for dt in dtypes:
        lat = torch.randn(1, 2048, 1408, device="cuda", dtype=dt)
        d = torch.rand(1, 16, 1, 224, 224, device="cuda", dtype=dt) + 0.1
        f = torch.randn(1, 16, 2, 224, 224, device="cuda", dtype=dt)
        mask = torch.rand(1, 16, 1, 224, 224, device="cuda") > 0.2
        m1 = torch.zeros(1, dtype=torch.bool, device="cuda")
        preds, targets = [lat, d, f], [lat.clone(), d.clone(), f.clone()]
        yield f"p4d_loss paper {dt}", lambda: K.p4d_loss(preds, targets, [m1, mask, m1], [1, 1, 1], [0, 0, 0],
                                                         [1.0, 1.0, 1.0], [2, 2 | 4 | 1, 2], [0.5, 1.0, 0.1],
                                                         True, 1e-6)
        h = torch.randn(4096, 2560, device="cuda", dtype=dt)
        wt = torch.randn(1408, 2560, device="cuda", dtype=dt)
        b = torch.randn(1408, device="cuda", dtype=dt)
        t = torch.randn(4096, 1408, device="cuda", dtype=dt)
        yield f"fused_linear_latent_loss {dt}", lambda: K.linear_loss_fwd(h, wt, b, t, None, 0, 1.0, 1, 4096,
                                                                          True, True, True)


def _lm(K, torch, dtypes):
    for dt in dtypes:
        # the cross-entropy rows of one chunk of logits (linear_cross_entropy selects its rows with a
        # data-dependent nonzero, which fake tensors cannot run: its row launcher directly)
        logits = torch.randn(512, 151936, device="cuda", dtype=dt)
        tgt = torch.randint(0, 151936, (512,), device="cuda")
        row_loss = torch.empty(512, device="cuda", dtype=torch.float64)
        yield f"cross_entropy rows V151936 {dt}", lambda: K._rows(logits, tgt, 1.0 / 512, True, row_loss)
        x = torch.randn(4096, 2560, device="cuda", dtype=dt)
        g = torch.ones(2560, device="cuda", dtype=dt)
        rstd = torch.ones(4096, device="cuda", dtype=torch.float64 if dt == torch.float64 else torch.float32)
        yield f"rms_norm D2560 {dt}", lambda: K.rms_norm(x, g, 1e-6)
        yield f"rms_norm_backward D2560 {dt}", lambda: K.rms_norm_backward(x, x, g, rstd, True, False)
        u = torch.randn(4096, 9728, device="cuda", dtype=dt)
        yield f"swiglu {dt}", lambda: K.swiglu(u, u)
        yield f"swiglu_backward {dt}", lambda: K.swiglu_backward(u, u, u)
        q = torch.randn(1, 16, 2048, 128, device="cuda", dtype=dt)
        cs = torch.randn(1, 2048, 128, device="cuda", dtype=dt)
        yield f"rope D128 {dt}", lambda: K.rope(q, q, cs, cs)
        yield f"rope backward D128 {dt}", lambda: K.rope(q, q, cs, cs, backward=True)


def _heads(K, torch, dtypes):
    for dt in dtypes:
        x = torch.randn(16, 256 * 16, 16, 16, device="cuda", dtype=dt)
        yield f"pixel_shuffle_act r4 {dt}", lambda: K.pixel_shuffle_act(x, 4, 1, 20.0)
        g = torch.randn(16, 256, 64, 64, device="cuda", dtype=dt)
        yield f"pixel_shuffle_act_backward r4 {dt}", lambda: K.pixel_shuffle_act_backward(g, x, 4, 1, 20.0)


def _regional(K, torch, dtypes):
    for dt in dtypes:
        feat = torch.randn(1, 256, 200, 200, device="cuda", dtype=dt)
        boxes = torch.rand(512, 5, device="cuda", dtype=dt) * 100
        boxes[:, 0] = 0
        for sr in (2, -1):  # 2: Mask R-CNN's setting; -1 (the ops' default): adaptive, ceil(bin size)
            yield f"roi_align fwd 7x7 sr{sr} {dt}", lambda sr=sr: K.roi_align_fwd(feat, boxes, 0.25, 7, 7, sr, True)
            g = torch.randn(512, 256, 7, 7, device="cuda", dtype=dt)
            for det in (False, True):  # atomic; sorted entries + segmented sums
                yield (f"roi_align bwd sr{sr} deterministic={det} {dt}",
                       lambda sr=sr, det=det: K.roi_align_bwd(g, boxes, 0.25, 7, 7, sr, True, 1, 200, 200, False, det))
        # region_pool: 4D-RGPT's region tokens, B 2, T 16, 8 regions, C 1152 on the 27x27 grid, TPE fused
        rf = torch.randn(2, 16, 1152, 27, 27, device="cuda", dtype=dt)
        rb = torch.rand(2, 16, 8, 4, device="cuda", dtype=dt) * 27
        rv = torch.rand(2, 16, 8, device="cuda") > 0.3
        rt = torch.rand(2, 16, device="cuda")
        yield f"region_pool fwd 1x1 {dt}", lambda: K.region_pool_fwd(rf, rb, rv, rt, None, 1.0, 1, 1, -1, True)
        rg = torch.randn(2, 16, 8, 1152, 1, 1, device="cuda", dtype=dt)
        for det in (False, True):
            yield (f"region_pool bwd deterministic={det} {dt}",
                   lambda det=det: K.region_pool_bwd(rg, rb, rv, 1.0, 1, 1, -1, True, 27, 27, False, det))
        fm = torch.randn(2, 16, 1152, 27, 27, device="cuda", dtype=dt)
        masks = torch.rand(2, 16, 8, 384, 384, device="cuda", dtype=dt)
        secs = torch.rand(2, 16, device="cuda")
        res = {}

        def mp_fwd():
            res["out"] = K.mask_pool_fwd(fm, masks, secs, None, 1e-6)
        yield f"mask_pool fwd 384->27 {dt}", mp_fwd

        def mp_bwd():
            out = res["out"]
            resized, inv_z = out[1], out[2]
            K.mask_pool_bwd(out[0], fm, masks, resized, inv_z, True, True, False)
        yield f"mask_pool bwd 384->27 {dt}", mp_bwd


CASES = {"tpe": _tpe, "p4d": _p4d, "lm": _lm, "heads": _heads, "regional": _regional}


@contextlib.contextmanager
def _patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


# ---- recording and compiling ---------------------------------------------------------------

def _arg_type(param, value):
    """The signature type Triton's JIT gives this argument (None: a constexpr)."""
    import torch

    ann = getattr(param, "annotation_type", "") or ""
    if ann:
        return ann
    if isinstance(value, torch.Tensor):
        return "*" + _DT[str(value.dtype).replace("torch.", "")]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return None if value == 1 else ("i32" if -2**31 <= value < 2**31 else "i64")  # 1 is specialised
    if isinstance(value, float):
        return "fp32"
    if value is None:
        return None
    raise TypeError(f"{param.name}: unexpected argument {value!r}")


def _record(family, dtypes):
    """[(case label, JITFunction, signature, constexprs, options)] of the family's launches."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from triton.runtime.jit import JITFunction

    import importlib
    K = importlib.import_module(f"rgpt4d.kernels.{family}")
    launches = []
    label = [""]

    def record(self, *args, grid, warmup=False, **kwargs):
        opts = {k: kwargs.pop(k) for k in ("num_warps", "num_stages", "num_ctas", "maxnreg") if k in kwargs}
        values = dict(zip(self.arg_names, args))
        values.update(kwargs)
        sig, const = {}, {}
        for p in self.params:
            v = values.get(p.name, p.default)
            ty = None if p.is_constexpr else _arg_type(p, v)
            if ty is None:
                const[p.name] = v
                sig[p.name] = "constexpr"
            else:
                sig[p.name] = ty
        launches.append((label[0], self, sig, const, opts))

    from torch._subclasses import fake_impls

    def all_nonzero(fake_mode, func, arg):
        # data-dependent sizes (boolean masks of valid regions): every element counts, the largest launch
        with fake_mode:
            return torch.empty((arg.numel(), arg.dim()), dtype=torch.int64, device=arg.device)

    def bincount(fake_mode, func, arg, weights=None, minlength=0):
        # counts per image id: the ids lie below minlength (the launchers pass the image count)
        with fake_mode:
            return torch.empty((max(minlength, 1),), dtype=torch.int64 if weights is None else weights.dtype,
                               device=arg.device)

    def scalar(fake_mode, func, arg):
        # a host read of a device value (the deterministic RoI backward sizes its entry buffers by the
        # sample count): a count of 2^20, one pass of the sorted backward
        return 1 << 20 if not arg.dtype.is_floating_point else 1.0

    impls = fake_impls.op_implementations_dict
    with contextlib.ExitStack() as stack:
        stack.enter_context(_patched(JITFunction, "run", record))
        for op, impl in ((torch.ops.aten.nonzero.default, all_nonzero), (torch.ops.aten.bincount.default, bincount),
                         (torch.ops.aten._local_scalar_dense.default, scalar)):
            stack.callback(lambda op=op, old=impls.get(op): impls.__setitem__(op, old) if old else impls.pop(op))
            impls[op] = impl
        # fake tensors have no device to switch to; pinned host memory needs a driver
        stack.enter_context(_patched(torch.cuda, "device_of", lambda obj: contextlib.nullcontext()))
        orig_tensor = torch.tensor
        stack.enter_context(_patched(torch, "tensor", lambda *a, pin_memory=False, **k: orig_tensor(*a, **k)))
        stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
        for name, run in CASES[family](K, torch, dtypes):
            label[0] = name
            run()
    return launches


def _ptxas_usage(ptx: str, arch: str) -> dict:
    """Registers and spill bytes of the PTX from ptxas -v (Triton's ptxas), cached next to Triton's
    cache by the PTX's hash (Triton's cache keeps the PTX, not ptxas's report)."""
    import hashlib

    from triton import knobs

    ptxas = knobs.nvidia.ptxas.path
    cache = os.path.join(os.environ.get("TRITON_CACHE_DIR") or os.path.expanduser("~/.triton/cache"), "rgpt4d-ptxas")
    key = hashlib.sha256((ptxas + arch + ptx).encode()).hexdigest()
    path = os.path.join(cache, key + ".json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    usage = _run_ptxas(ptxas, ptx, arch)
    if usage["ptxas_rc"] == 0:
        os.makedirs(cache, exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump(usage, f)
        os.replace(path + ".tmp", path)
    return usage


def _run_ptxas(ptxas: str, ptx: str, arch: str) -> dict:
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        r = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", src, "-o", os.path.join(d, "k.cubin")],
                           capture_output=True, text=True, timeout=600)
    log = r.stdout + r.stderr
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return {"registers": int(regs.group(1)) if regs else None,
            "spill_stores": int(spill.group(1)) if spill else None,
            "spill_loads": int(spill.group(2)) if spill else None, "ptxas_rc": r.returncode,
            "ptxas_log": log[-2000:] if r.returncode else ""}


def _ttir_scalar_types(ttir: str, fn_name: str) -> list[str]:
    """Types of the scalar (non-pointer) arguments of the kernel's tt.func in TTIR (its one-line signature)."""
    line = next((ln for ln in ttir.splitlines() if f"tt.func public @{fn_name}(" in ln), "")
    return re.findall(r"%[\w.]+: (i\d+|f\d+|bf16)\b", line.split(" attributes ")[0])


def run(families, dtype_names, arch="sm_90a"):
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    dtypes = [getattr(torch, d) for d in dtype_names]
    target = GPUTarget("cuda", 90, 32)
    results = []
    for fam in families:
        try:
            launches = _record(fam, dtypes)
        except Exception as e:  # a launcher that cannot run on fake tensors: reported, not hidden
            results.append({"family": fam, "case": "(recording the launches)", "kernel": "", "error": repr(e)})
            continue
        seen = set()
        for label, fn, sig, const, opts in launches:
            key = (fn.__name__, tuple(sorted(sig.items())), tuple(sorted((k, str(v)) for k, v in const.items())),
                   tuple(sorted(opts.items())))
            if key in seen:
                continue
            seen.add(key)
            row = {"family": fam, "case": label, "kernel": fn.__name__,
                   "config": ", ".join(f"{k}={v}" for k, v in {**const, **opts}.items()),
                   "float_args": {n: t for n, t in sig.items() if t in ("fp32", "fp64")}}
            t0 = time.perf_counter()
            try:
                k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const), target=target, options=opts)
                row.update(_ptxas_usage(k.asm["ptx"], arch))
                row["ttir_scalar_types"] = _ttir_scalar_types(k.asm["ttir"], fn.__name__)
                row["error"] = ""
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e)[-1500:]}"
            row["seconds"] = round(time.perf_counter() - t0, 2)
            results.append(row)
    return results


def main(argv=None) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("triton_sm90: unset TRITON_INTERPRET (the interpreter does not compile)")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", default=",".join(FAMILIES))
    p.add_argument("--dtypes", default="float32,bfloat16,float64")
    p.add_argument("--json", action="store_true", help="one JSON list on stdout")
    args = p.parse_args(argv)
    res = run(args.family.split(","), args.dtypes.split(","))
    if args.json:
        print(json.dumps(res))
        return 0
    for r in res:
        status = r["error"] or (f"{r['registers']} registers, spill stores {r['spill_stores']} B, loads "
                                f"{r['spill_loads']} B")
        print(f"{r['family']:8s} {r['kernel']:32s} {r['case']:45s} {r.get('seconds', 0):6.1f} s  {status}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
