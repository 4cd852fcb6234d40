"""Build rgpt4d and its compiled extension rgpt4d._C.

CPU kernels are always built. CUDA kernels are built when FORCE_CUDA=1, or when a GPU and
nvcc are both present. TORCH_CUDA_ARCH_LIST defaults to "8.0;9.0". MAX_JOBS defaults to what
the free memory allows (about 3 GiB per compile job). Setting RGPT4D_NO_EXT=1 skips the
extension entirely (the package then runs on the eager backend).
"""

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _default_max_jobs() -> str:
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        avail_gib = int(info["MemAvailable"].strip().split()[0]) / 2**20
    except (OSError, KeyError, ValueError):
        avail_gib = 8.0
    return str(max(1, min(os.cpu_count() or 1, int(avail_gib // 3))))


def _guess_cuda_home() -> None:
    # torch takes CUDA_HOME from the environment, else from `which nvcc` — which is wrong when
    # nvcc is a symlink in /usr/local/bin (it would pick /usr/local). Resolve the real toolkit.
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for home in candidates:  # a toolkit root has both nvcc and the runtime headers
        if os.path.exists(os.path.join(home, "bin", "nvcc")) and os.path.exists(
                os.path.join(home, "include", "cuda_runtime.h")):
            os.environ["CUDA_HOME"] = home
            return


def _extensions():
    if _env_flag("RGPT4D_NO_EXT"):
        return [], {}
    _guess_cuda_home()
    import torch
    from torch.utils import cpp_extension

    os.environ.setdefault("MAX_JOBS", _default_max_jobs())
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

    cuda_home = cpp_extension.CUDA_HOME
    with_cuda = _env_flag("FORCE_CUDA") or (torch.cuda.is_available() and cuda_home is not None)
    if with_cuda and cuda_home is None:
        sys.exit("rgpt4d: FORCE_CUDA=1 but no CUDA toolkit was found (set CUDA_HOME)")

    cpp = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    cuda_cpp = [s for s in cpp if s.endswith("_cuda.cpp")]
    cpu_cpp = [s for s in cpp if s not in cuda_cpp]
    cu = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))

    include_dirs = [os.path.join(ROOT, "csrc")]
    # -fopenmp: at::parallel_for is an OpenMP region compiled into *this* library (ATen's
    # Parallel-inl.h); without the flag the pragma is dropped and every at::parallel_for in csrc/
    # runs on one thread. The runtime is torch's own libgomp (already loaded, same soname).
    # -std=c++20: the sources are C++20 (std::bit_cast in csrc/lm). torch 2.14's BuildExtension passes
    # -std=c++20 itself; torch 2.11's passes -std=c++17 unless a -std flag is given here.
    cxx_flags = ["-O3", "-fno-math-errno", "-fopenmp", "-std=c++20"]
    link_flags = ["-fopenmp"]
    nvcc_flags = ["-O3", "-lineinfo", "-std=c++20"]
    arch = os.environ["TORCH_CUDA_ARCH_LIST"] if with_cuda else "none"
    info = (f"torch {torch.__version__}; cuda kernels {'yes' if with_cuda else 'no'}; arch {arch}; "
            f"cxx {' '.join(cxx_flags)}" + (f"; nvcc {' '.join(nvcc_flags)}" if with_cuda else ""))
    define_macros = [("RGPT4D_BUILD_INFO", '"' + info.replace('"', "") + '"')]
    if with_cuda and _env_flag("RGPT4D_CUDA_CHECK"):
        # `make cuda-check`: compile only the CUDA sources (the CPU ones are compiled by the normal
        # build); the resulting library is never loaded.
        cpu_cpp = [s for s in cpu_cpp if os.path.basename(s) == "init.cpp"]
        nvcc_flags += ["-Xptxas", "-v"]  # registers and spills of every kernel, reported by make cuda-check
    if with_cuda:
        # cusparse.h / cublas headers of the pip CUDA wheels live here.
        import site

        for sp in site.getsitepackages() + [site.getusersitepackages()]:
            inc = os.path.join(sp, "nvidia", "cu13", "include")
            if os.path.isdir(inc):
                include_dirs.append(inc)
        define_macros.append(("RGPT4D_WITH_CUDA", "1"))
        ext = cpp_extension.CUDAExtension(
            "rgpt4d._C",
            sources=cpu_cpp + cuda_cpp + cu,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={
                "cxx": cxx_flags,
                "nvcc": nvcc_flags,
            },
            extra_link_args=link_flags,
        )
    else:
        ext = cpp_extension.CppExtension(
            "rgpt4d._C",
            sources=cpu_cpp,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    cmdclass = {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}
    return [ext], cmdclass


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["rgpt4d", "rgpt4d.*"]) + ["rgpt4d.kernels"],
    package_dir={"rgpt4d.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
