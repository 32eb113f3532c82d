"""``RunState``: what a checkpoint records besides the global adapter (fed/checkpoint.py), typed,
with the one rule that says whether a run is finished.

The record carries a schema version. Schema 1 (every checkpoint before 2026-12-07) left out of
the run's identity the options added after checkpoints existed, whenever they held the value
such runs ran with, and named two options as the trainer then did (``rank``, ``targets``);
``from_json`` reads it through ``_SCHEMA_1_VALUES`` and ``_SCHEMA_1_NAMES``, so an old run
still resumes and compares equal to the same run started today. Schema 2 records every option,
under DualLoRAConfig's names (``r``, ``target_modules``). Schema 3 adds the base model's
``dtype`` and ``compile``; every run before it ran its base in fp32, eagerly
(``_SCHEMA_2_VALUES``). Schema 4 adds ``cohort_size``; every run before it trained its clients
one at a time (``_SCHEMA_3_VALUES``).
"""
from __future__ import annotations

import dataclasses

__all__ = ["RunState", "SCHEMA"]

SCHEMA = 4
# Options added after schema 3, with the value every run written before them ran with.
_SCHEMA_3_VALUES = {"cohort_size": 1}
# Options added after schema 2, with the value every run written before them ran with.
_SCHEMA_2_VALUES = {"dtype": "fp32", "compile": False}
# What a schema-1 identity meant where it recorded nothing: these options did not exist when
# such runs were written (prompt_format: runs before it were Alpaca, whatever the model).
_SCHEMA_1_VALUES = {"num_beams": 1, "max_new_tokens": 32, "prompt_format": "alpaca",
                    "search_examples": None, "wire_dtype": "fp32", "dp_clip": None,
                    "dp_noise_multiplier": 0.0, "dp_delta": 1e-5}
_SCHEMA_1_NAMES = {"rank": "r", "targets": "target_modules"}  # old name -> today's


@dataclasses.dataclass(frozen=True)
class RunState:
    """The state of a run at a checkpoint.

    Attributes:
        config: the run's ``RunConfig.identity()`` (what a resumed run must share).
        seed: the run seed (every random stream derives from it and the round).
        rounds_done: federated rounds committed.
        post_done: the method's post step (FedDPA-F's local fine-tuning, ...) committed.
        sample_rates: one per round attempt so far: the DP accountant's steps.
        data_sha256: {file: digest} of the data directory the run trains on.
    """

    config: dict
    seed: int
    rounds_done: int
    post_done: bool = False
    sample_rates: tuple[float, ...] = ()
    data_sha256: dict = dataclasses.field(default_factory=dict)

    def finished(self, rounds: int, post_step: str | None) -> bool:
        """True when all ``rounds`` and the method's ``post_step`` (if any) are committed."""
        return self.rounds_done >= rounds and (self.post_done or not post_step)

    def to_json(self) -> dict:
        """The JSON-able record (schema ``SCHEMA``)."""
        return {"schema": SCHEMA, "config": self.config, "seed": self.seed,
                "rounds_done": self.rounds_done, "post_done": self.post_done,
                "sample_rates": list(self.sample_rates), "data_sha256": dict(self.data_sha256)}

    @classmethod
    def from_json(cls, record: dict) -> RunState:
        """The state of a record written by ``to_json`` (any schema up to ``SCHEMA``).

        Raises:
            ValueError: a record of a newer schema, or without its required fields.
        """
        schema = record.get("schema", 1)
        if not isinstance(schema, int) or not 1 <= schema <= SCHEMA:
            raise ValueError(f"run state of schema {schema!r}; this version reads 1..{SCHEMA}")
        missing = [k for k in ("config", "seed", "rounds_done") if k not in record]
        if missing:
            raise ValueError(f"run state without {missing}")
        config = dict(record["config"])
        if schema == 1:
            config = {_SCHEMA_1_NAMES.get(k, k): v for k, v in config.items()}
            config = {**_SCHEMA_1_VALUES, **config}
        if schema <= 2:
            config = {**_SCHEMA_2_VALUES, **config}
        if schema <= 3:
            config = {**_SCHEMA_3_VALUES, **config}
        return cls(config=config, seed=int(record["seed"]),
                   rounds_done=int(record["rounds_done"]),
                   post_done=bool(record.get("post_done", False)),
                   sample_rates=tuple(float(r) for r in record.get("sample_rates", ())),
                   data_sha256=dict(record.get("data_sha256") or {}))
