"""What Triton's on-disk cache key of an sm_90a compile depends on: the measurement behind the
GPU check's choice to warm the cache on the GPU machine rather than ship one compiled here
(docs/gpu.md, "Warming Triton's cache").

    python bench/gpu_cache_key.py            (any Python with triton; no torch, no GPU)

Compiles a one-line kernel for sm_90a with ``triton.compile`` (the function a real launch
calls) into a fresh cache and prints the key's parts: triton_key() (a hash of Triton's own
files, its compiled libtriton included, which differs per CPython build of the wheel), the
backend's hash (the ptxas version and the arch), the options' hash (libdevice by content), the
cache-invalidating environment variables, and the name of the cache entry it wrote. Two
machines share cache entries only where every part agrees.
"""
from __future__ import annotations

import os
import platform
import sys
import tempfile
from pathlib import Path


def main() -> int:
    cache = tempfile.mkdtemp(prefix="triton-key-")
    os.environ["TRITON_CACHE_DIR"] = cache
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.cache import get_cache_key, triton_key

    @triton.jit
    def copy(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)

    target = GPUTarget("cuda", 90, 32)
    src = ASTSource(copy, {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"},
                    constexprs={"BLOCK": 128})
    backend = make_backend(target)
    options = backend.parse_options({"num_warps": 4})
    compiled = triton.compile(src, target=target, options=options.__dict__)
    env = {k: v for k, v in os.environ.items() if k.startswith(("TRITON_", "MLIR_", "LLVM_"))
           and k != "TRITON_CACHE_DIR"}
    entries = sorted(p.name for p in Path(cache).iterdir())
    size = sum(f.stat().st_size for f in Path(cache).rglob("*") if f.is_file())
    print(f"python {platform.python_version()}, triton {triton.__version__} "
          f"({Path(triton.__file__).parent})")
    print(f"triton_key sha256: {__import__('hashlib').sha256(triton_key().encode()).hexdigest()}")
    print(f"backend hash: {backend.hash()}")
    print(f"options hash: {options.hash()}")
    print(f"environment in the key: {env or 'none'}")
    key = get_cache_key(src, backend, options, env_vars={})
    print(f"full key sha256: {__import__('hashlib').sha256(key.encode()).hexdigest()}")
    print(f"cache entry: {entries} ({size} bytes), kernel hash {compiled.hash}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
