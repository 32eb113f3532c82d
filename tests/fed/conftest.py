"""Fixtures the federated tests share: one tiny BERT directory per session (the tiny run's
config comes from fed_fixtures.tiny_cfg), a spy on what clients upload, and finished runs that
several tests only read."""
from typing import NamedTuple

import pytest
from fed_fixtures import tiny_bert_dir, tiny_cfg


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory):
    return tiny_bert_dir(tmp_path_factory.mktemp("models"))


def spy_uploads(monkeypatch) -> list:
    """Every blob a client encodes from now on, as (metadata, tensors), in order."""
    from feddpa_fast.fed import client as client_mod
    from feddpa_fast.fed import wire

    sent, original = [], wire.encode

    def spy(tensors, meta):
        if meta["client"] != "server":
            sent.append((dict(meta), {k: v.clone() for k, v in tensors.items()}))
        return original(tensors, meta)

    monkeypatch.setattr(client_mod.wire, "encode", spy)
    return sent


@pytest.fixture
def uploads_seen(monkeypatch):
    return spy_uploads(monkeypatch)


class FinishedRun(NamedTuple):
    results: dict
    out: object  # Path of the run directory
    uploads: list  # spy_uploads' record of the run


@pytest.fixture(scope="session")
def finished_run(bert_dir, tmp_path_factory):
    """``finished_run(algo)``: the tiny run of ``algo``, run once per session (per xdist
    worker) and shared by the tests that only read it. Do not write into ``out``."""
    from feddpa_fast.fed.runner import run

    done = {}

    def get(algo: str) -> FinishedRun:
        if algo not in done:
            out = tmp_path_factory.mktemp("finished") / algo
            with pytest.MonkeyPatch.context() as monkeypatch:
                uploads = spy_uploads(monkeypatch)
                results = run(tiny_cfg(bert_dir, out, algo=algo), progress=False)
            done[algo] = FinishedRun(results, out, uploads)
        return done[algo]

    return get
