"""The source distribution builds and installs: `python -m build --sdist --no-isolation` of a clean
copy of this checkout gives a tarball holding every file the build needs (MANIFEST.in), and
`pip install --no-build-isolation` of that tarball into a fresh venv compiles rgpt4d._C, installs
rgpt4d.kernels, and runs an op against the eager reference.

The fresh venv sees this interpreter's packages (torch, setuptools, ninja, triton) through a .pth
file, as a user's venv that already has torch; rgpt4d itself comes only from the tarball
(--ignore-installed: pip neither looks at nor touches the rgpt4d of the running environment).
It compiles every C++ source of the extension (CPU kernels; no CUDA here): a few minutes.
"""

import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

RUN_OP = r'''
import os, sys
import torch
import rgpt4d, rgpt4d.kernels, rgpt4d.ops as ops
from rgpt4d.ops import registry

venv = sys.argv[1]
for mod in (rgpt4d, rgpt4d.kernels):
    assert os.path.realpath(mod.__file__).startswith(os.path.realpath(venv)), mod.__file__
assert registry.extension_loaded(), registry.unavailable_reasons()
assert os.path.realpath(registry.extension_info()["path"]).startswith(os.path.realpath(venv))
import rgpt4d.kernels.tpe  # the Triton kernels installed as a package (needs triton to import)
x = torch.randn(2, 3, 7, 6, dtype=torch.float64)
rois = torch.tensor([[0, 0.5, 0.5, 4.0, 5.0], [1, 1.0, 0.0, 5.5, 3.0]], dtype=torch.float64)
out = ops.roi_align(x, rois, (2, 3), 1.0, 2, True, backend="cpu")
torch.testing.assert_close(out, ops.roi_align_eager(x, rois, (2, 3), 1.0, 2, True), rtol=1e-12, atol=1e-12)
t = torch.rand(2, 3, dtype=torch.float64)
y = ops.tpe_add(torch.randn(2, 3, 4, 8, dtype=torch.float64), t, backend="cpu")
print("op ran", tuple(out.shape), tuple(y.shape))
'''


def _clean_copy(dest: Path) -> None:
    """The files git would put in a fresh clone (tracked, plus untracked ones not ignored), as they
    are in the working tree."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file() and not src.is_symlink():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


@pytest.mark.slow
def test_sdist_builds_installs_and_runs(tmp_path):
    if not (ROOT / "setup.py").is_file() or not (ROOT / ".git").exists():
        pytest.skip(f"not a source checkout ({ROOT} has no setup.py or .git): nothing to package")
    pytest.importorskip("build", reason="the `build` package is not installed (requirements.txt installs it)")
    src, dist, venv = tmp_path / "src", tmp_path / "dist", tmp_path / "venv"
    _clean_copy(src)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET", "FORCE_CUDA")}

    r = subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(dist), str(src)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (tarball,) = dist.glob("rgpt4d-*.tar.gz")

    # Every file the build reads is in the tarball.
    with tarfile.open(tarball) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    needed = ["setup.py", "pyproject.toml", "MANIFEST.in", "README.md"]
    needed += [p.relative_to(src).as_posix() for p in (src / "csrc").rglob("*") if p.is_file()]
    needed += [p.relative_to(src).as_posix() for p in (src / "kernels").glob("*.py")]
    needed += [p.relative_to(src).as_posix() for p in (src / "rgpt4d").rglob("*.py")]
    missing = sorted(set(needed) - names)
    assert not missing, f"files the build needs are missing from {tarball.name}: {missing}"
    assert any(n.endswith(".h") for n in names) and any(n.endswith(".cu") for n in names)

    # A fresh venv that has torch: this interpreter's site-packages through a .pth file.
    # --without-pip: pip, setuptools and wheel are the running environment's (a venv's bundled setuptools
    # may predate what pyproject.toml needs).
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    vpy = venv / "bin" / "python"
    vsite = Path(subprocess.run([str(vpy), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                capture_output=True, text=True, check=True).stdout.strip())
    (vsite / "running_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    start = time.perf_counter()
    r = subprocess.run([str(vpy), "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--ignore-installed",
                        "--no-index", "-v", str(tarball)], capture_output=True, text=True, env=env, cwd=tmp_path,
                       timeout=3600)
    build_s = time.perf_counter() - start
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-3000:]
    print(f"pip install of the sdist (compiles rgpt4d._C): {build_s:.0f} s")

    r = subprocess.run([str(vpy), "-c", RUN_OP, str(venv)], capture_output=True, text=True, env=env, cwd=tmp_path,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "op ran (2, 3, 2, 3) (2, 3, 4, 8)" in r.stdout
