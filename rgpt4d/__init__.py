"""rgpt4d: fused kernels for 4D-RGPT (TPE, regional pooling, P4D loss) and the stack built on them.

`import rgpt4d` works with or without the compiled extension; `rgpt4d.ops.available_backends()`
says what this install can run and `rgpt4d env` (or `python -m rgpt4d.env`) says why.
"""

__version__ = "0.1.0"

from rgpt4d import ops  # noqa: E402,F401

__all__ = ["ops", "__version__"]
