"""Triton kernels of rgpt4d, one file per op family, installed as `rgpt4d.kernels`.

Each file imports only torch and triton, so it can be copied into another code base. Set
TRITON_INTERPRET=1 before importing a file to run its kernels on CPU tensors (the interpreter).
"""
