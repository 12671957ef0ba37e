"""DDP on CPU: 2 processes (gloo) through the `lightning` console script; metrics cover the whole validation set."""

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cli_helpers import tiny_qa_args


@pytest.mark.slow
def test_ddp_two_cpu_processes_gather_validation(tmp_path, tiny_bert, qa_files):
    script = shutil.which("lightning", path=str(Path(sys.executable).parent)) or shutil.which("lightning")
    assert script, "the lightning console script is not installed"
    ckpt_dir = tmp_path / "ckpt"
    args = [
        script, "fit", *tiny_qa_args(tiny_bert, qa_files, tmp_path),
        "--trainer.strategy=ddp", "--trainer.devices=2",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={tmp_path / 'logs'}",
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint", f"--trainer.callbacks.dirpath={ckpt_dir}",
        "--trainer.callbacks.filename=last",
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "distributed_backend=gloo" in proc.stdout + proc.stderr
    assert "All distributed processes registered. Starting with 2 processes" in proc.stdout + proc.stderr

    rows = list(csv.DictReader(open(next((tmp_path / "logs").rglob("metrics.csv")))))
    ddp_f1 = [float(r["val/f1"]) for r in rows if r.get("val/f1")]
    assert len(ddp_f1) == 1

    # The same weights validated by one process give the same score: every window was gathered and scored once.
    from topk_lightning.cli import build_cli

    single = build_cli(["validate", *tiny_qa_args(tiny_bert, qa_files, tmp_path),
                        f"--ckpt_path={ckpt_dir / 'last.ckpt'}"])
    assert float(single.trainer.callback_metrics["val/f1"]) == pytest.approx(ddp_f1[0], abs=1e-3)
    assert len(single.model.predictions) == 6
