"""Shared helpers of the CLI tests (a uniquely named module: both test folders have a conftest)."""

from pathlib import Path

from lightning.pytorch import Callback

REPO = Path(__file__).resolve().parents[2]


def tiny_qa_args(tiny_bert, qa_files, tmp_path, *, attention="topk"):
    """CLI arguments for a seconds-long QA run on the tiny model."""
    return [
        "--model=topk_lightning.modules.ExtractiveQAModule",
        f"--model.backbone={tiny_bert}",
        f"--model.attention={attention}",
        "--model.topk=8",
        "--model.query_chunk_size=32",
        "--model.version_2_with_negative=true",
        "--model.learning_rate=1e-3",
        "--data=topk_lightning.data.QADataModule",
        f"--data.tokenizer={tiny_bert}",
        f"--data.train_file={qa_files['train']}",
        f"--data.validation_file={qa_files['validation']}",
        "--data.max_length=96",  # ~150-token contexts: several windows per example
        "--data.doc_stride=32",
        "--data.max_question_length=24",
        "--data.batch_size=4",
        f"--data.cache_dir={tmp_path / 'cache'}",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={tmp_path / 'run'}",
    ]


class InterruptAfterStep(Callback):
    """Raises KeyboardInterrupt (what Ctrl-C raises) once ``step`` optimiser steps have run."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            raise KeyboardInterrupt


class RecordTraining(Callback):
    """Records, before every training batch, the step, the learning rate and a fingerprint of the batch."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, float, int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        self.rows.append((trainer.global_step, lr, int(batch["input_ids"].sum())))


def callback(cli, kind):
    return next(cb for cb in cli.trainer.callbacks if isinstance(cb, kind))
