"""The Flower deployment engine (feddpa_fast/fed/flower/): message encoding, the run config,
and a real deployment on 127.0.0.1 (flower-superlink, two flower-supernodes, `flwr run`) whose
result must equal the built-in loop's, bit for bit, including across a restarted ServerApp."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")

from fed_fixtures import tiny_bert_dir  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from feddpa_fast.fed import wire  # noqa: E402
from feddpa_fast.fed.checkpoint import load_checkpoint  # noqa: E402
from feddpa_fast.fed.config import RunConfig  # noqa: E402
from feddpa_fast.fed.flower import codec  # noqa: E402
from feddpa_fast.fed.flower.run_config import from_flower  # noqa: E402
from feddpa_fast.fed.runner import run  # noqa: E402

pytestmark = pytest.mark.flower
APP_DIR = Path(codec.__file__).resolve().parent / "app"
BIN = Path(sys.executable).parent
DEADLINE_S = 300  # the whole deployment (two submissions, four rounds of training in all)


def test_messages_carry_the_blob_unchanged():
    tensors = {"base_model.model.l.lora_A.weight": torch.randn(4, 8)}
    blob = wire.encode(tensors, {"round": 3, "client": "server", "num_examples": 0})
    step, r, back = codec.decode_request(codec.encode_request("round", 3, blob))
    assert (step, r, back) == ("round", 3, blob)
    decoded, meta = wire.decode(back, tensors, round=3, sender="server")
    assert torch.equal(decoded["base_model.model.l.lora_A.weight"],
                       tensors["base_model.model.l.lora_A.weight"])
    reply = codec.encode_reply("sentiment", 3, blob, {"loss_global": 0.5, "loss_local": 1})
    assert codec.decode_reply(reply) == ("sentiment", 3, blob,
                                          {"loss_global": 0.5, "loss_local": 1.0})
    assert codec.decode_reply(codec.encode_reply("x", 0, None, {}))[2:] == (None, {})
    assert codec.decode_request(codec.encode_request("post", 2))[2] is None


def test_run_config_conversions():
    """(The App file's table against RunConfig: tests/fed/test_config.py.)"""
    assert from_flower({"max-steps": 0, "targets": "query, value"}) \
        == RunConfig(max_steps=None, targets=("query", "value"))
    with pytest.raises(ValueError, match="unknown"):
        from_flower({"epochs": 3})


# ---- the deployment -----------------------------------------------------------------------
def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _wait_port(port: int, proc: subprocess.Popen, deadline: float) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"port {port} not open in time")


def _session_members(sids: set[int]) -> list[str]:
    """Live (non-zombie) processes in any of the sessions ``sids``."""
    left = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()
        if fields[0] != "Z" and int(fields[3]) in sids:
            left.append(text[: text.rindex(")") + 1])
    return left


def _flwr(args, env, timeout=60):
    res = subprocess.run([str(BIN / "flwr"), *args], env=env, capture_output=True, text=True,
                         timeout=timeout, cwd=env["FLWR_HOME"])
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


def _run_status(run_id, env) -> str:
    out = json.loads(_flwr(["ls", "local", "--run-id", str(run_id), "--format", "json"], env))
    return out["runs"][0]["status"]


def _submit(overrides: str, env) -> int:
    out = _flwr(["run", str(APP_DIR), "local", "-c", overrides, "--format", "json"], env)
    return int(json.loads(out[out.index("{"):])["run-id"])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_deployment_equals_the_builtin_loop_and_resumes(tmp_path):
    start = time.monotonic()
    deadline = start + DEADLINE_S
    model = tiny_bert_dir(tmp_path)
    settings = dict(model=str(model), clients=2, rounds=2, max_steps=2, batch_size=8,
                    test_limit=4, lr=1e-2, rank=4, alpha=8.0, seed=3)
    home = tmp_path / "flwr-home"
    home.mkdir()
    link, node0, node1 = _free_ports(3)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "local"\n\n[superlink.local]\n'
        f'address = "127.0.0.1:{link}"\ninsecure = true\n')
    env = {**os.environ, "FLWR_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    out = tmp_path / "flower-out"
    overrides = " ".join(
        f"{k.replace('_', '-')}={json.dumps(v) if isinstance(v, str) else v}"
        for k, v in {**settings, "out": str(out)}.items())
    logs, procs = {}, []

    def start_proc(name, args):
        logs[name] = open(tmp_path / f"{name}.log", "w")
        procs.append(subprocess.Popen([str(BIN / args[0]), *args[1:]], env=env, cwd=tmp_path,
                                      stdout=logs[name], stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, start_new_session=True))
        return procs[-1]

    def log_text():
        return "\n".join(f"--- {n}\n" + (tmp_path / f"{n}.log").read_text()[-4000:]
                         for n in logs)

    try:
        superlink = start_proc("superlink", [
            "flower-superlink", "--insecure", "--isolation", "subprocess", "--host", "127.0.0.1",
            "--port", str(link), "--disable-runtime-dependency-installation"])
        _wait_port(link, superlink, deadline)
        for i, port in enumerate((node0, node1)):
            node = start_proc(f"supernode{i}", [
                "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link}",
                "--host", "127.0.0.1", "--port", str(port),
                "--node-config", f"partition-id={i} state-dir='{tmp_path / f'node{i}'}'"])
            _wait_port(port, node, deadline)

        # First submission: stopped once round 0 is checkpointed (a ServerApp that dies).
        run_id = _submit(overrides, env)
        ckpt = out / "checkpoint.safetensors"
        while not ckpt.exists():
            assert time.monotonic() < deadline, "no checkpoint in time\n" + log_text()
            assert not _run_status(run_id, env).startswith("finished"), \
                f"{_run_status(run_id, env)}\n{log_text()}"
            time.sleep(0.3)
        _flwr(["stop", str(run_id), "local"], env)
        assert load_checkpoint(ckpt)[1]["rounds_done"] == 1
        while not (status := _run_status(run_id, env)).startswith("finished"):
            assert time.monotonic() < deadline, "the stopped run did not finish\n" + log_text()
            time.sleep(0.5)
        assert status == "finished:stopped", status  # stopped during round 1
        first_row = (out / "metrics.jsonl").read_text().splitlines()[0]

        # Second submission, same config: resumes at round 1 and finishes.
        run_id = _submit(overrides, env)
        while not (status := _run_status(run_id, env)).startswith("finished"):
            assert time.monotonic() < deadline, "the run did not finish in time\n" + log_text()
            time.sleep(1)
        assert status == "finished:completed", status + "\n" + log_text()
        # round 0 was not redone: its metrics line is the first submission's
        assert (out / "metrics.jsonl").read_text().splitlines()[0] == first_row
    finally:
        sids = {p.pid for p in procs}  # start_new_session: pid == session id == group id
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        end = time.monotonic() + 20
        while _session_members(sids) and time.monotonic() < end:
            time.sleep(0.2)
        for sid in sids:
            try:
                os.killpg(sid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in procs:
            p.wait(timeout=10)
        for f in logs.values():
            f.close()
        time.sleep(0.5)
        assert not _session_members(sids), _session_members(sids)

    flower_global, state = load_checkpoint(out / "checkpoint.safetensors")
    assert state["rounds_done"] == 2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1]
    assert all(r["accepted"] == r["sampled"] and len(r["sampled"]) == 2 for r in rows)

    # The built-in loop, same RunConfig, same thread count as the apps (torch-threads = 1).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(RunConfig(**settings, out=str(tmp_path / "builtin")), progress=False)
    finally:
        torch.set_num_threads(threads)
    builtin_global, builtin_state = load_checkpoint(tmp_path / "builtin" / "checkpoint.safetensors")
    assert builtin_state == state
    assert set(flower_global) == set(builtin_global)
    for k in builtin_global:  # bit-equal
        assert torch.equal(flower_global[k], builtin_global[k]), k
    # The local adapters stayed on the SuperNodes' disks and equal the built-in loop's.
    for i in (0, 1):
        (client_dir,) = (tmp_path / f"node{i}").iterdir()
        local = load_file(client_dir / "local_r0001.safetensors")
        ref = load_file(tmp_path / "builtin" / "clients" / client_dir.name /
                        "local_r0001.safetensors")
        assert local.keys() == ref.keys() and all(torch.equal(local[k], ref[k]) for k in ref)
    assert (out / "adapters" / "global" / "adapter_model.safetensors").is_file()
    assert time.monotonic() - start < DEADLINE_S + 60
