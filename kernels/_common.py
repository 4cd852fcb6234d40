"""What every kernel file shares: the accumulation dtype rule. Imports only torch and triton.

    acc_dtype(*dtypes) -> torch.float64 when any input dtype is float64, else torch.float32
        (bf16 and fp16 inputs accumulate in fp32). Host buffers of sums and statistics use it.
    acc_types(*dtypes) -> (the Triton dtype, the torch dtype) of that rule: the kernels' ACC
        constexpr and the host buffers of one launch.
    acc_scalar(x, ACC) (@triton.jit) -> a float kernel argument in the accumulation dtype.
"""

import torch
import triton
import triton.language as tl


def acc_dtype(*dtypes):
    return torch.float64 if torch.float64 in dtypes else torch.float32


def acc_types(*dtypes):
    acc = acc_dtype(*dtypes)
    return (tl.float64 if acc == torch.float64 else tl.float32), acc


@triton.jit
def acc_scalar(x, ACC: tl.constexpr):
    """A float argument in the accumulation dtype. Float arguments are annotated tl.float64: the
    compiler would type a Python float fp32 (fp64 kernels would see eps, beta, log(base) rounded to
    1e-7); the interpreter passes the Python float itself, which takes the dtype of the zero it is
    added to."""
    return (tl.zeros([], ACC) + x).to(ACC)
