"""The import name `kernels` belongs to Hugging Face's package (transformers >= 5.25 imports it
from transformers.modeling_utils); the repo's kernels/ directory must never shadow it, and
feddpa_fast.kernels must load from a source checkout and from a wheel's layout
(docs/ARCHITECTURE.md, "The import name kernels")."""
import importlib.metadata
import shutil
import subprocess
import sys
from pathlib import Path

import feddpa_fast.kernels

ROOT = Path(__file__).resolve().parents[2]

# Run from the repo root, the way `python -m pytest` or a shell opened in the clone puts that
# root first on sys.path.
FROM_ROOT = """
import sys, pathlib
import transformers.modeling_utils, peft, torch
import feddpa_fast.kernels as ours
root = pathlib.Path.cwd().resolve()
x, w = torch.randn(3, 8), torch.randn(4, 8)
a, b = torch.randn(2, 8), torch.randn(4, 2)
y = ours.lora_linear(x, w, None, a, b, torch.ones(1, 2))
assert y.shape == (3, 4), y.shape
try:
    import kernels
except ImportError:
    print("kernels: not importable")
else:
    where = getattr(kernels, "__file__", None)
    if where is None:  # a namespace package over the repo's kernels/ (no hub package installed)
        assert not [n for n in vars(kernels) if not n.startswith("__")], vars(kernels)
        print("kernels: empty namespace")
    else:  # the hub package (a venv inside the clone, e.g. .ci/venv, is fine)
        assert root / "kernels" not in pathlib.Path(where).resolve().parents, where
        assert "site-packages" in where or "dist-packages" in where, where
        print("kernels:", where)
"""


def _hub_kernels_installed() -> bool:
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def test_repo_root_never_shadows_the_hub_kernels_package():
    out = subprocess.run([sys.executable, "-c", FROM_ROOT], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    if _hub_kernels_installed():
        # transformers >= 5.25 requires it, so this is the branch CI takes.
        assert out.stdout.startswith("kernels: ") and "packages" in out.stdout, out.stdout
    else:
        assert "kernels: not importable" in out.stdout or "empty namespace" in out.stdout


def test_repo_root_holds_no_regular_package_named_kernels():
    assert not (ROOT / "kernels" / "__init__.py").exists()


def test_wheel_layout_holds_every_kernel_module(tmp_path):
    # build_py is the step of a wheel build that lays out the Python files (setup.py, BuildPy);
    # the native library is then copied in as the wheel's build_ext would place it.
    subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)],
                   cwd=ROOT, check=True, capture_output=True, timeout=120)
    package = tmp_path / "feddpa_fast" / "kernels"
    expected = {p.name for p in (ROOT / "kernels").glob("*.py")} | {"__init__.py"}
    assert expected <= {p.name for p in package.glob("*.py")}
    assert not (tmp_path / "kernels").exists()
    library = feddpa_fast.kernels.native_library_path()
    shutil.copy(library, package / library.name)
    code = ("import feddpa_fast.kernels as k, torch\n"
            "print(k.__path__)\n"
            "print(k.lora_linear(torch.ones(2, 4), torch.ones(3, 4), None, torch.ones(1, 4),"
            " torch.ones(3, 1), torch.ones(1, 1)).sum().item())\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300, env={"PYTHONPATH": str(tmp_path),
                                                      "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-4000:]
    # only the wheel's own directory: nothing reaches back into the repo's kernels/
    assert out.stdout.splitlines()[0] == str([str(package)]), out.stdout
    assert float(out.stdout.splitlines()[1]) == 2 * 3 * (4 + 4)  # base 4, LoRA branch 4
