"""The Flower run config, derived from ``RunConfig``'s declarations (fed/run_config.py).

Keys are the flag names without ``--`` (``max-steps``, ``weighting-k``); an unset optional
value is written 0 (numbers) or "" (strings), and ``target-modules`` as comma-separated names.
``EXTRA`` holds the settings of the apps themselves, not of the run. ``app/pyproject.toml``'s
``[tool.flwr.app.config]`` is ``app_config(RunConfig(out=APP_OUT))``, written by
``python -m feddpa_fast.fed.flower.flower_config`` (tests/fed/test_config.py keeps them equal).
"""
from __future__ import annotations

from pathlib import Path

from ..algorithms.feddpa_weighting import WeightingConfig
from ..options import ConfigError
from ..run_config import RunConfig, declared_options

__all__ = ["EXTRA", "app_config", "extra", "from_flower", "render_app_config"]

# CPU threads of every app (1: reproducible across processes), the seconds a round waits for
# its replies, the seconds the ServerApp waits for its SuperNodes.
EXTRA = {"torch-threads": 1, "round-timeout": 600.0, "node-wait": 120.0}


def _to_flower(value, meta):
    if value is None:
        return "" if meta["type"] in (str, tuple) else 0
    return ",".join(value) if meta["type"] is tuple else value


def app_config(cfg: RunConfig) -> dict:
    """The Flower run config of ``cfg`` (every key, then ``EXTRA``)."""
    out = {}
    for key, f, prefix in declared_options():
        owner = cfg.weighting if prefix else cfg
        out[key] = _to_flower(getattr(owner, f.name), f.metadata["option"])
    return {**out, **EXTRA}


def _from_flower(value, meta):
    if meta["optional"] and value in (0, "", 0.0):
        return None
    if meta["type"] is tuple:
        return tuple(t.strip() for t in str(value).split(",") if t.strip())
    if meta["type"] is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def from_flower(run_config: dict) -> RunConfig:
    """The RunConfig of a Flower run config.

    Raises:
        ConfigError: an unknown key, or a value RunConfig refuses.
    """
    known = {key: (f, prefix) for key, f, prefix in declared_options()}
    fields, weighting = {}, {}
    for key, value in run_config.items():
        if key in EXTRA:
            continue
        if key not in known:
            raise ConfigError(f"unknown run config key {key!r}")
        f, prefix = known[key]
        (weighting if prefix else fields)[f.name] = _from_flower(value, f.metadata["option"])
    return RunConfig(**fields, weighting=WeightingConfig(**weighting))


def extra(run_config: dict, key: str):
    """An app setting of ``EXTRA`` from the run config (its default when absent)."""
    return type(EXTRA[key])(run_config.get(key, EXTRA[key]))


def render_app_config(cfg: RunConfig) -> str:
    """``app_config(cfg)`` as the lines of a TOML table body (what app/pyproject.toml holds)."""
    import json

    return "".join(f"{key} = {json.dumps(value)}\n" for key, value in app_config(cfg).items())


APP_FILE = Path(__file__).resolve().parent / "app" / "pyproject.toml"
APP_OUT = "runs/flower-feddpa-t"  # the App's default output directory


def write_app_config(path: Path = APP_FILE) -> None:
    """Rewrites the ``[tool.flwr.app.config]`` table (the file's last) from RunConfig."""
    text = path.read_text()
    head = text[: text.index("[tool.flwr.app.config]\n")]
    path.write_text(head + "[tool.flwr.app.config]\n" + render_app_config(RunConfig(out=APP_OUT)))


# python -m feddpa_fast.fed.flower.flower_config: after a RunConfig change
if __name__ == "__main__":
    write_app_config()
