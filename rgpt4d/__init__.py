"""rgpt4d: fused kernels for 4D-RGPT (TPE, regional pooling, P4D loss) and the stack built on them.

`import rgpt4d` works with or without the compiled extension; `rgpt4d.ops.available_backends()`
says what this install can run and `rgpt4d env` (or `python -m rgpt4d.env`) says why.
"""

import importlib.util as _ilu
import os as _os
import sys as _sys

__version__ = "0.1.0"


def _use_checkout_kernels() -> None:
    # The Triton kernels live in the top-level kernels/ folder and are installed as rgpt4d.kernels
    # (setup.py package_dir). When this package is imported straight from a source checkout
    # (PYTHONPATH, a git worktree), bind rgpt4d.kernels to that checkout's kernels/ folder.
    here = _os.path.dirname(_os.path.abspath(__file__))
    src = _os.path.join(_os.path.dirname(here), "kernels")
    if "rgpt4d.kernels" in _sys.modules or _os.path.isdir(_os.path.join(here, "kernels")):
        return
    init = _os.path.join(src, "__init__.py")
    if not (_os.path.isfile(init) and _os.path.isfile(_os.path.join(_os.path.dirname(here), "setup.py"))):
        return
    spec = _ilu.spec_from_file_location("rgpt4d.kernels", init, submodule_search_locations=[src])
    module = _ilu.module_from_spec(spec)
    _sys.modules["rgpt4d.kernels"] = module
    spec.loader.exec_module(module)


_use_checkout_kernels()

from rgpt4d import ops  # noqa: E402,F401

__all__ = ["ops", "__version__"]
