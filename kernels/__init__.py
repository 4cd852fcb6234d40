"""Triton kernels of rgpt4d, one file per op family, installed as `rgpt4d.kernels`.

The files import only torch, triton and each other: _common.py (the accumulation dtype, fp64 for
fp64 inputs and fp32 otherwise), linear_loss.py (the chunked Linear + loss driver of lm.py and
p4d.py) and tpe.py's encoding (regional.py). Copied together into another code base they also
import as top-level modules. Set TRITON_INTERPRET=1 before importing a file to run its kernels on
CPU tensors (the interpreter).
"""

import os as _os


def _fix_interpreter_loop_bounds():
    """Let the interpreter of triton < 3.8 take a runtime value as a `range` bound under numpy >= 2.4.

    That interpreter holds every scalar as a 1-element array and turns a loop bound into an index
    with `int(array)`, which numpy 2.4 rejects for arrays of ndim > 0 ("only 0-dimensional arrays can
    be converted to Python scalars"), so every `for i in range(0, n, BLOCK)` with a runtime `n` fails.
    Triton 3.8 squeezes the array first; this installs the same `__index__` for older versions. The
    compiled (GPU) path never runs this code.
    """
    if _os.environ.get("TRITON_INTERPRET", "0") != "1":
        return
    try:  # optional: triton (only the interpreter needs this patch)
        import triton
        from triton.runtime import interpreter
    except ImportError:
        return
    patch = getattr(interpreter, "_patch_lang_tensor", None)
    version = tuple(int(p) for p in triton.__version__.split(".")[:2] if p.isdigit())
    if patch is None or version >= (3, 8) or getattr(patch, "_squeezes_index", False):
        return

    def _patch_lang_tensor(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    _patch_lang_tensor._squeezes_index = True
    interpreter._patch_lang_tensor = _patch_lang_tensor


_fix_interpreter_loop_bounds()
