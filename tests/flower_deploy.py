"""A real Flower deployment on 127.0.0.1 for the tests: one flower-superlink, N flower-supernodes
(one per client), ``flwr run`` submissions, and a teardown that checks every process it
started is gone."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from feddpa_fast.fed.flower import codec

APP_DIR = Path(codec.__file__).resolve().parent / "app"
BIN = Path(sys.executable).parent


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def session_members(sids: set[int]) -> list[str]:
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


def overrides(settings: dict) -> str:
    """``flwr run -c`` text of a {field: value} dict (field names with underscores)."""
    return " ".join(f"{k.replace('_', '-')}={json.dumps(v) if isinstance(v, str) else v}"
                    for k, v in settings.items())


class Deployment:
    """``with Deployment(tmp_path, nodes=2, deadline_s=300) as d:`` starts the SuperLink and
    the SuperNodes (node i: partition i, state dir ``tmp_path / f"node{i}"``); on exit every
    process started is terminated, and ``d.leftovers`` lists any that survived."""

    def __init__(self, tmp_path: Path, nodes: int, deadline_s: float):
        self.tmp_path, self.nodes = tmp_path, nodes
        self.deadline = time.monotonic() + deadline_s
        self.home = tmp_path / "flwr-home"
        self.procs: list[subprocess.Popen] = []
        self.logs: dict[str, object] = {}
        self.leftovers: list[str] = []

    def __enter__(self):
        self.home.mkdir(exist_ok=True)
        link, *node_ports = free_ports(1 + self.nodes)
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "local"\n\n[superlink.local]\n'
            f'address = "127.0.0.1:{link}"\ninsecure = true\n')
        # The SuperLink starts flower-superexec by name, so this interpreter's bin directory
        # goes first on PATH: a venv used without being activated (.ci/run) still works.
        path = os.pathsep.join([str(BIN), os.environ.get("PATH", "")])
        self.env = {**os.environ, "PATH": path, "FLWR_HOME": str(self.home),
                    "PYTHONUNBUFFERED": "1"}
        try:
            superlink = self._start("superlink", [
                "flower-superlink", "--insecure", "--isolation", "subprocess", "--host",
                "127.0.0.1", "--port", str(link), "--disable-runtime-dependency-installation"])
            self._wait_port(link, superlink)
            for i, port in enumerate(node_ports):
                node = self._start(f"supernode{i}", [
                    "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link}",
                    "--host", "127.0.0.1", "--port", str(port), "--node-config",
                    f"partition-id={i} state-dir='{self.tmp_path / f'node{i}'}'"])
                self._wait_port(port, node)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        self.logs[name] = open(self.tmp_path / f"{name}.log", "w")
        self.procs.append(subprocess.Popen(
            [str(BIN / args[0]), *args[1:]], env=self.env, cwd=self.tmp_path,
            stdout=self.logs[name], stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True))
        return self.procs[-1]

    def _wait_port(self, port: int, proc: subprocess.Popen) -> None:
        while time.monotonic() < self.deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"port {port} not open in time")

    def log_text(self) -> str:
        return "\n".join(f"--- {n}\n" + (self.tmp_path / f"{n}.log").read_text()[-4000:]
                         for n in self.logs)

    def flwr(self, args, timeout=60) -> str:
        res = subprocess.run([str(BIN / "flwr"), *args], env=self.env, capture_output=True,
                             text=True, timeout=timeout, cwd=self.home)
        assert res.returncode == 0, res.stdout + res.stderr
        return res.stdout

    def status(self, run_id: int) -> str:
        out = json.loads(self.flwr(["ls", "local", "--run-id", str(run_id), "--format",
                                    "json"]))
        return out["runs"][0]["status"]

    def submit(self, settings: dict) -> int:
        out = self.flwr(["run", str(APP_DIR), "local", "-c", overrides(settings), "--format",
                         "json"])
        return int(json.loads(out[out.index("{"):])["run-id"])

    def wait(self, run_id: int, done_file: Path | None = None, poll_s: float = 1.0,
             status_every_s: float = 10.0) -> str:
        """The run's final status (``finished:...``); fails past the deadline.

        Each status query is a `flwr ls` process, about 1.3 s of CPU on this 2-core machine:
        polled every second it took most of a core from the SuperNodes it waits for. With
        ``done_file`` (a file the run writes last, e.g. results.json) the test watches that file
        and asks Flower only every ``status_every_s`` (a failed run) or once the file is there.
        """
        next_query = time.monotonic()
        while True:
            assert time.monotonic() < self.deadline, "the run did not finish\n" + self.log_text()
            done = done_file is None or done_file.exists()
            if done or time.monotonic() >= next_query:
                status = self.status(run_id)
                if status.startswith("finished"):
                    return status
                next_query = time.monotonic() + (poll_s if done else status_every_s)
            time.sleep(0.2)

    def wait_for_file(self, run_id: int, path: Path, status_every_s: float = 10.0) -> None:
        """Until ``path`` exists; fails past the deadline or if the run finishes first."""
        next_query = time.monotonic() + status_every_s
        while not path.exists():
            assert time.monotonic() < self.deadline, f"no {path.name} in time\n" + self.log_text()
            if time.monotonic() >= next_query:
                status = self.status(run_id)
                assert not status.startswith("finished"), f"{status}\n{self.log_text()}"
                next_query = time.monotonic() + status_every_s
            time.sleep(0.2)

    def __exit__(self, *exc):
        sids = {p.pid for p in self.procs}  # start_new_session: pid == session id == group id
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        end = time.monotonic() + 20
        while session_members(sids) and time.monotonic() < end:
            time.sleep(0.2)
        for sid in sids:
            try:
                os.killpg(sid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in self.procs:
            p.wait(timeout=10)
        for f in self.logs.values():
            f.close()
        time.sleep(0.5)
        self.leftovers = session_members(sids)
        return False
