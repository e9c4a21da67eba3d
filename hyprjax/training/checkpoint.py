"""Training checkpoints through orbax: the adapter leaves and the optimizer state, by step.

One `CheckpointManager` owns saving, keeping (the last `keep`) and restoring. orbax writes each
step to a temporary directory and renames it when complete, so a kill mid-save leaves the
previous checkpoint whole and the half-written one is ignored (and cleaned up) on restore. The
data order is a function of (seed, step) (training/data.py `batch_at`) and nothing else is random
after initialisation, so the step number is all a resumed run needs to continue exactly.
"""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp


class Checkpoints:
    def __init__(self, directory: str | Path, *, every: int, keep: int = 2):
        self.every = every
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False,
                                               cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(Path(directory).absolute(), options=options)

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, lora, opt_state, *, force: bool = False) -> None:
        """Save after `step` optimizer steps, on every `every`-th step (or when forced)."""
        if force or step % self.every == 0:
            if self.manager.latest_step() != step:
                self.manager.save(step, args=ocp.args.StandardSave({"lora": lora, "opt_state": opt_state}),
                                  force=True)
                self.manager.wait_until_finished()

    def restore(self, lora, opt_state) -> tuple[int, object, object] | None:
        """(step, lora, opt_state) of the latest checkpoint, shaped like the given ones; None if none."""
        step = self.manager.latest_step()
        if step is None:
            return None
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, {"lora": lora, "opt_state": opt_state})
        got = self.manager.restore(step, args=ocp.args.StandardRestore(target))
        return step, got["lora"], got["opt_state"]

    def close(self) -> None:
        self.manager.close()
