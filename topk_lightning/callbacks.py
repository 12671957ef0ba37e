"""`LastCheckpoint`: every fit leaves a checkpoint of its last state, and a fit resumed from it continues exactly.

The CLI adds it to every ``fit`` (unless checkpointing is off); from Python, pass it to the ``Trainer``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

log = logging.getLogger(__name__)

__all__ = ["LastCheckpoint"]


class LastCheckpoint(Callback):
    """Save ``last.ckpt`` when a fit ends -- normally, by Ctrl-C or by an exception -- so it can be resumed.

    When:

    - right after the optimiser step that reaches ``max_steps``: the checkpoint is then mid-epoch, so resuming with a
      larger ``max_steps`` continues the same epoch (a recipe's ``max_epochs: 1`` does not end it early);
    - at the end of training otherwise (``max_epochs`` reached, early stopping, ...);
    - on an exception or Ctrl-C, once at least one optimiser step has run: the state after the last finished step.

    Where: ``dirpath``, else the directory of the trainer's ``ModelCheckpoint`` (``<log dir>/checkpoints``), else
    where a ``ModelCheckpoint`` would put it.

    Resuming (``trainer.fit(..., ckpt_path=".../last.ckpt")``, or ``--ckpt_path`` on the command line) restores the
    weights, optimiser, scheduler and loop counters (Lightning) and, from this callback's state, torch's random state
    at the saved step, so dropout continues with the draws an uninterrupted run would make. With the project's data
    modules the batches continue where they stopped too (`topk_lightning.data.sampling`), so a resumed run ends with
    the weights of an uninterrupted one.

    Attributes:
        path: the checkpoint's path once known (set when training starts).
        validated_last_step: ``False`` when training steps ran after the last validation of this fit (the CLI then
            runs a final validation).
    """

    FILENAME = "last.ckpt"

    def __init__(self, dirpath: str | os.PathLike | None = None) -> None:
        self.dirpath = dirpath
        self.path: Path | None = None
        self.validated_last_step = True
        self._saved_at_step: int | None = None
        self._rng_at_batch_start: dict[str, Any] | None = None
        self._rng_to_save: dict[str, Any] | None = None
        self._rng_to_restore: dict[str, Any] | None = None

    # ------------------------------------------------------------------ when to save
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.path = Path(trainer.strategy.broadcast(str(self._directory(trainer) / self.FILENAME)))
        self.validated_last_step = True
        self._saved_at_step = None

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._rng_to_restore is not None:
            # Restored here, not on load: what runs between loading and the first batch may draw random numbers.
            _set_rng_state(self._rng_to_restore)
            self._rng_to_restore = None
        self._rng_at_batch_start = _rng_state()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.validated_last_step = False
        if trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps:
            self._save(trainer)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self.validated_last_step = True

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._save(trainer)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if self.path is None or trainer.global_step == 0 or trainer.state.fn != TrainerFn.FITTING:
            return  # training never started or no step finished (nothing worth resuming), or not a fit at all
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        if progress.processed < progress.ready and self._rng_at_batch_start is not None:
            # Interrupted inside a step: Lightning resumes with that batch, so restore the state it started from.
            self._rng_to_save = self._rng_at_batch_start
        try:
            # No barrier (trainer.save_checkpoint has one): after an exception the other processes may never reach it.
            checkpoint = trainer._checkpoint_connector.dump_checkpoint()
            trainer.strategy.save_checkpoint(checkpoint, self.path)
        finally:
            self._rng_to_save = None
        rank_zero_info(f"Interrupted at step {trainer.global_step}; saved the last state to {self.path} "
                       "(resume with --ckpt_path)")

    # ------------------------------------------------------------------ state: torch's random state
    def state_dict(self) -> dict[str, Any]:
        return {"rng": self._rng_to_save or _rng_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._rng_to_restore = state_dict.get("rng")

    # ------------------------------------------------------------------ helpers
    def _save(self, trainer: Trainer) -> None:
        if self.path is None or trainer.global_step == 0 or self._saved_at_step == trainer.global_step:
            return
        trainer.save_checkpoint(self.path)
        self._saved_at_step = trainer.global_step
        rank_zero_info(f"Saved the last state (step {trainer.global_step}) to {self.path}")

    def _directory(self, trainer: Trainer) -> Path:
        if self.dirpath is not None:
            return Path(self.dirpath)
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath:
                return Path(callback.dirpath)
        # ModelCheckpoint's own default: <save_dir>/<name>/<version>/checkpoints of the first logger.
        if trainer.loggers:
            logger = trainer.loggers[0]
            version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
            return Path(logger.save_dir or trainer.default_root_dir) / str(logger.name) / version / "checkpoints"
        return Path(trainer.default_root_dir) / "checkpoints"


def _rng_state() -> dict[str, Any]:
    """torch's CPU and CUDA generator states (what dropout draws from), as tensors: loadable with weights_only."""
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            rank_zero_warn(f"the checkpoint holds the random state of {len(cuda)} GPUs, this machine has "
                           f"{torch.cuda.device_count()}: GPU random numbers are not restored")
