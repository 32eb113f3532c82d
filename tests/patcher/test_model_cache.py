"""The verified directory cache (feddpa_fast/fed/model_cache.py): built once, reused when intact,
rebuilt (never loaded) when corrupt, and never left half-written."""
import json
from pathlib import Path

import pytest

from feddpa_fast.fed import model_cache
from feddpa_fast.fed.model_cache import MANIFEST, cache_root, cached_dir, verify

KEY = {"source": "test", "format": 1}


class Builder:
    """Writes two files; counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, out: Path) -> None:
        self.calls += 1
        (out / "weights.bin").write_bytes(bytes(range(256)) * 64)
        (out / "config.json").write_text('{"hidden": 8}')


def _leftovers(root: Path):
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


def test_built_once_then_reused(tmp_path):
    build = Builder()
    first = cached_dir("m", KEY, build, root=tmp_path)
    assert first == tmp_path / "m" and build.calls == 1
    assert cached_dir("m", KEY, build, root=tmp_path) == first and build.calls == 1
    manifest = json.loads((first / MANIFEST).read_text())
    assert manifest["key"] == KEY and set(manifest["files"]) == {"weights.bin", "config.json"}
    assert verify(first, KEY) is None and _leftovers(tmp_path) == []


def _flip_a_byte(d):
    data = bytearray((d / "weights.bin").read_bytes())
    data[1000] ^= 0xFF
    (d / "weights.bin").write_bytes(bytes(data))


def _truncate(d):
    (d / "weights.bin").write_bytes((d / "weights.bin").read_bytes()[:100])


@pytest.mark.parametrize("damage, reason", [
    (_flip_a_byte, "weights.bin: checksum differs"),
    (_truncate, "weights.bin: size differs"),
    (lambda d: (d / "config.json").unlink(), "config.json: missing"),
    (lambda d: (d / MANIFEST).unlink(), "no manifest"),
    (lambda d: (d / MANIFEST).write_text("{not json"), "unreadable manifest"),
])
def test_a_corrupt_cache_is_detected_and_rebuilt(tmp_path, damage, reason):
    build = Builder()
    path = cached_dir("m", KEY, build, root=tmp_path)
    damage(path)
    assert verify(path, KEY).startswith(reason)
    assert cached_dir("m", KEY, build, root=tmp_path) == path and build.calls == 2
    assert verify(path, KEY) is None
    assert (path / "weights.bin").read_bytes() == bytes(range(256)) * 64
    assert _leftovers(tmp_path) == []


def test_a_cache_built_from_another_source_is_rebuilt(tmp_path):
    build = Builder()
    cached_dir("m", KEY, build, root=tmp_path)
    assert verify(tmp_path / "m", {**KEY, "format": 2}) == "built from something else"
    cached_dir("m", {**KEY, "format": 2}, build, root=tmp_path)
    assert build.calls == 2


def test_a_failed_build_leaves_no_directory(tmp_path):
    def broken(out):
        (out / "weights.bin").write_bytes(b"half")
        raise RuntimeError("killed mid-build")

    with pytest.raises(RuntimeError, match="killed mid-build"):
        cached_dir("m", KEY, broken, root=tmp_path)
    assert list(tmp_path.iterdir()) == []
    # An intact build is returned without calling the builder at all.
    good = cached_dir("m", KEY, Builder(), root=tmp_path)
    assert cached_dir("m", KEY, broken, root=tmp_path) == good


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(model_cache.ENV_VAR, str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"
    monkeypatch.delenv(model_cache.ENV_VAR)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "feddpa_fast"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "feddpa_fast"
