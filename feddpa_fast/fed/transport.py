"""``Transport``: what carries a run's messages. ``Run.run`` (fed/runner.py) plays the rounds
over one; ``InProcess`` (fed/in_process.py, every client in this process) and the Flower
ServerApp's ``GridTransport`` (fed/flower/server_app.py, one SuperNode per client) implement it,
moving the same validated safetensors blobs."""
from __future__ import annotations

from typing import Protocol, runtime_checkable

__all__ = ["Transport"]


@runtime_checkable
class Transport(Protocol):
    """The four exchanges of a run between the server and its clients."""

    def exchange(self, r: int, sampled: list[str], broadcasts: dict[str, bytes]
                 ) -> tuple[dict[str, bytes | BaseException], list[dict]]:
        """Round ``r`` on the ``sampled`` clients, given the server's blob for each.

        Returns:
            ({client: its reply blob, or the exception it failed with}, the clients' training
            statistics). A client with nothing to upload has no entry.
        """

    def post_train(self, rounds: int, broadcasts: dict[str, bytes]) -> None:
        """The method's post step (FedDPA-F's local fine-tuning, ...) on every client."""

    def round_score(self, r: int) -> tuple[float, list[str]]:
        """(mean own-task score after round ``r``, the clients that gave none)."""

    def finish(self, wall_start: float) -> dict:
        """The final evaluation, results.json and the outputs; returns the results."""
