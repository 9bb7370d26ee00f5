"""Train-state checkpoints under OUT/checkpoints: Orbax's CheckpointManager (atomic, keep the last K).

Each checkpoint holds the train state (parameters, optimizer state, step) and a JSON record of
what must match to resume (the model config, the LoRA setup) and where the data stands.
"""

from __future__ import annotations

import pathlib
from typing import Any

import orbax.checkpoint as ocp

CHECKPOINTS = "checkpoints"


class Checkpoints:
    def __init__(self, out: pathlib.Path, *, keep: int, create: bool):
        self.path = pathlib.Path(out).resolve() / CHECKPOINTS
        self.manager = ocp.CheckpointManager(
            self.path, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=create))

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, record: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        record=ocp.args.JsonSave(record)))

    def record(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(record=ocp.args.JsonRestore())).record

    def restore(self, step: int, like: Any) -> Any:
        """The state saved at `step`, onto the shardings and dtypes of `like` (a state of the same tree)."""
        return self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(like))).state

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
