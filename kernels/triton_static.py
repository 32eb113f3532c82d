"""Compiling a Triton launch ahead of time for a GPU architecture, without a GPU, and reading
what the hardware would get: registers, spills, shared memory, the matrix instructions and TMA.

    report = compile_report(launch, "sm_90a")      # launch: a triton_launch.Launch

The argument specialisation is Triton's own: the kernel's binder (the function a real launch
calls) turns the launch's arguments into the signature, the constexprs and the attributes, so
16-divisible pointers, sizes and strides get ``tt.divisibility = 16`` and an integer 1 becomes a
constant exactly as on a GPU. Tensors may live on the ``meta`` device: their data_ptr() is 0,
i.e. aligned, as the caching allocator's blocks are. Then ``triton.compile`` runs for the
target, and the cubin is read with the ``cuobjdump`` that the Triton wheel ships.

Used by bench/gpu_static.py (the report and its CI gate) and by the CUDA autotuner's prune
(kernels/triton_autotune.py), so both judge a config by the same compile.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import re
import subprocess
import tempfile
from pathlib import Path

import triton

# capability and ptx arch of each target name
TARGETS = {"sm_80": 80, "sm_90a": 90, "sm_100a": 100}


@dataclasses.dataclass(frozen=True)
class StaticReport:
    """What one compiled launch uses on its target."""

    regs: int
    spill_bytes: int      # stack frame + spill stores/loads reported by the compiler
    stl: int              # STL (local store) instructions in the SASS
    ldl: int              # LDL (local load) instructions in the SASS
    smem_bytes: int       # shared memory per program (Triton's metadata.shared)
    mma: str              # HGMMA (wgmma, sm_90), HMMA (mma.sync), UTCMMA/tcgen05, or none
    tma: bool             # UTMALDG (TMA tile loads) present

    @property
    def spills(self) -> bool:
        return self.spill_bytes > 0 or self.stl > 0 or self.ldl > 0


def triton_bin(name: str) -> str:
    """Path of a CUDA tool shipped inside the Triton wheel (ptxas, cuobjdump, nvdisasm)."""
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: this Triton wheel ships no {name}")
    return str(path)


def target_supported(target: str) -> bool:
    """Whether the installed Triton's ptxas can build ``target`` (sm_100a needs a newer one)."""
    if target != "sm_100a":
        return True
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    return (bin_dir / "ptxas-blackwell").exists() or _ptxas_knows("sm_100a")


@functools.cache
def _ptxas_knows(arch: str) -> bool:
    out = subprocess.run([triton_bin("ptxas"), "--help"], capture_output=True, text=True)
    return arch in out.stdout


def _binder(kernel, backend):
    from triton.runtime.jit import create_function_from_signature
    return create_function_from_signature(kernel.signature, kernel.params, backend)


def compile_launch(launch, target: str):
    """triton.compile of ``launch`` for ``target`` with a real launch's specialisation."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    gpu = GPUTarget("cuda", TARGETS[target], 32)
    backend = make_backend(gpu)
    kernel = launch.kernel
    kwargs = dict(launch.args, num_warps=launch.num_warps, num_stages=launch.num_stages)
    bound, specialization, options = _binder(kernel, backend)(**kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound,
                                                              specialization, options)
    src = ASTSource(kernel, signature, constexprs, attrs)
    return triton.compile(src, target=gpu, options=options.__dict__)


def read_cubin(cubin: bytes, shared: int) -> StaticReport:
    """Registers and stack from cuobjdump's resource report; STL/LDL, MMA and TMA from SASS."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        usage = subprocess.run([triton_bin("cuobjdump"), "--dump-resource-usage", path],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([triton_bin("cuobjdump"), "--dump-sass", path],
                              capture_output=True, text=True, check=True).stdout
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    stack = int(re.search(r"STACK:(\d+)", usage).group(1))
    local = int(re.search(r"LOCAL:(\d+)", usage).group(1))
    opcodes = re.findall(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", sass,
                         flags=re.M)
    count = lambda prefix: sum(op.startswith(prefix) for op in opcodes)  # noqa: E731
    if count("HGMMA"):
        mma = "HGMMA"
    elif count("UTCHMMA") or count("UTCMMA") or count("UTCQMMA"):
        mma = "tcgen05"
    elif count("HMMA"):
        mma = "HMMA"
    else:
        mma = "none"
    return StaticReport(regs=regs, spill_bytes=stack + local, stl=count("STL"),
                        ldl=count("LDL"), smem_bytes=shared, mma=mma,
                        tma=count("UTMALDG") > 0)


def compile_key(launch, target: str) -> tuple:
    """What decides the binary of ``launch`` on ``target``: constexprs by value; tensors by
    dtype and 16-byte alignment; runtime ints as Triton specialises them (== 1, % 16)."""
    constexprs = {p.name for p in launch.kernel.params if p.is_constexpr}

    def spec(name, v):
        if name in constexprs:
            return v
        if hasattr(v, "data_ptr"):
            return (str(v.dtype), v.data_ptr() % 16 == 0)
        if isinstance(v, int) and not isinstance(v, bool):
            return ("int", v == 1, v % 16 == 0)
        return v

    args = tuple(sorted((k, spec(k, v)) for k, v in launch.args.items()))
    return (target, launch.kernel.fn.__name__, args, launch.num_warps, launch.num_stages)


def compile_report(launch, target: str) -> StaticReport:
    """Compile ``launch`` for ``target`` and read its resources (no GPU needed)."""
    compiled = compile_launch(launch, target)
    return read_cubin(compiled.asm["cubin"], compiled.metadata.shared)
