"""A verified, atomically written directory cache (used for the dequantized SmolLM2).

Layout: ``<root>/<name>/`` holds the built files plus ``feddpa_manifest.json``: the build key
(what the directory was built from) and every file's size and SHA-256. A directory is used only
when its manifest parses, its key equals the requested one and every file matches; anything
else (a truncated file, a flipped byte, a missing manifest, a build from another source) is
rebuilt, never loaded.

Writes are atomic: a build goes into a temporary sibling directory, each file and the manifest
are fsynced, and one ``os.rename`` puts it in place, so a build killed half way leaves no
directory that looks complete. Concurrent builders are safe: the loser of the rename race
uses the winner's directory when it verifies.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from ..atomic import atomic_write_bytes

__all__ = ["cache_root", "cached_dir", "verify", "MANIFEST", "ENV_VAR"]

MANIFEST = "feddpa_manifest.json"
ENV_VAR = "FEDDPA_FAST_CACHE"
log = logging.getLogger("feddpa_fast.cache")


def cache_root() -> Path:
    """``$FEDDPA_FAST_CACHE``, else ``$XDG_CACHE_HOME/feddpa_fast``, else
    ``~/.cache/feddpa_fast``."""
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "feddpa_fast"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _file_entries(directory: Path) -> dict:
    return {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(directory.iterdir()) if p.is_file() and p.name != MANIFEST}


def verify(directory: Path, key: dict) -> str | None:
    """None when ``directory`` is a complete build for ``key``, else why it is not."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except FileNotFoundError:
        return "no manifest"
    except (OSError, ValueError) as exc:
        return f"unreadable manifest ({exc})"
    if not isinstance(manifest, dict) or manifest.get("key") != key:
        return "built from something else"
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return "manifest lists no files"
    for name, entry in files.items():
        path = directory / name
        try:
            if path.stat().st_size != entry["bytes"]:
                return f"{name}: size differs"
        except FileNotFoundError:
            return f"{name}: missing"
        if _sha256(path) != entry["sha256"]:
            return f"{name}: checksum differs"
    return None


def _fsync_tree(directory: Path) -> None:
    for path in directory.iterdir():
        with path.open("rb") as f:
            os.fsync(f.fileno())
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def cached_dir(name: str, key: dict, build: Callable[[Path], None], *,
               root: Path | None = None) -> Path:
    """The verified directory ``<root>/<name>``, (re)built by ``build(tmp_dir)`` when needed.

    Args:
        name: the directory name under the cache root.
        key: JSON-serialisable description of the source; a cached build with another key is
            rebuilt.
        build: writes the files into the (empty) directory it is given.
        root: the cache root (default ``cache_root()``).

    Returns:
        The path of the complete, verified directory.
    """
    root = Path(root) if root is not None else cache_root()
    final = root / name
    reason = verify(final, key) if final.exists() else "not built yet"
    if reason is None:
        return final
    if final.exists():
        log.warning("cache %s is not usable (%s): rebuilding it", final, reason)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=root))
    try:
        build(tmp)
        manifest = {"key": key, "files": _file_entries(tmp)}
        _fsync_tree(tmp)
        atomic_write_bytes(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
        if final.exists() and verify(final, key) is None:  # another process finished first
            return final
        if final.exists():  # a bad build: move it out of the way first (rename is atomic)
            stale = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".stale", dir=root))
            os.rename(final, stale / name)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if verify(final, key) is None:  # another process finished first
                return final
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
