"""Every fit leaves last.ckpt and ends with a validation; a fit resumed from last.ckpt continues exactly."""

import csv

import pytest
import torch

from cli_helpers import RecordTraining, callback, tiny_qa_args
from topk_lightning.callbacks import LastCheckpoint
from topk_lightning.cli import build_cli
from topk_lightning.modules import linear_warmup_decay


def run_args(tiny_bert, qa_files, tmp_path, *extra):
    # 3 batches per epoch, up to 4 steps: the resumed part crosses an epoch boundary. The tiny BERT has dropout
    # (0.1 on hidden states and attention probabilities), so resuming is exact only if the random state is restored.
    return ["fit", *tiny_qa_args(tiny_bert, qa_files, tmp_path), "--seed_everything=0",
            "--trainer.limit_train_batches=3", "--trainer.max_epochs=2", "--trainer.limit_val_batches=1",
            "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={tmp_path / 'logs'}",
            "--trainer.callbacks+=cli_helpers.RecordTraining", *extra]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_bert, qa_files):
    tmp_path = tmp_path_factory.mktemp("uninterrupted")
    cli = build_cli(run_args(tiny_bert, qa_files, tmp_path, "--trainer.max_steps=4"))
    assert cli.trainer.global_step == 4
    return cli


def test_a_run_cut_short_by_max_steps_leaves_last_ckpt_and_validates_once_more(tmp_path, tiny_bert, qa_files):
    cli = build_cli(run_args(tiny_bert, qa_files, tmp_path, "--trainer.max_steps=2",
                             "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                             "--trainer.callbacks.monitor=val/f1", "--trainer.callbacks.mode=max"))
    last = callback(cli, LastCheckpoint)
    assert last.path.is_file() and last.path.name == "last.ckpt" and str(last.path.parent) == cli.trainer.checkpoint_callback.dirpath
    assert torch.load(last.path, weights_only=True)["global_step"] == 2  # loadable as LightningCLI loads it
    # stopped mid-epoch (2 of 3 batches): no validation in the loop, so one after it, logged at step 2
    assert "val/f1" in cli.trainer.callback_metrics and last.validated_last_step is False
    rows = list(csv.DictReader(open(next((tmp_path / "logs").rglob("metrics.csv")))))
    assert [r["step"] for r in rows if r.get("val/f1")] == ["2"]


def test_an_interrupted_run_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path, tiny_bert, qa_files,
                                                                          uninterrupted):
    with pytest.raises(SystemExit) as exit_info:  # Lightning turns Ctrl-C into exit status 1 after saving
        build_cli(run_args(tiny_bert, qa_files, tmp_path / "first", "--trainer.max_steps=4",
                           "--trainer.callbacks+=cli_helpers.InterruptAfterStep", "--trainer.callbacks.step=2"))
    assert exit_info.value.code == 1
    (last,) = (tmp_path / "first").rglob("last.ckpt")
    assert torch.load(last, weights_only=True)["global_step"] == 2

    # --model.topk=3 is overridden by the checkpoint's hyperparameters: the same top-k model is rebuilt
    resumed = build_cli(run_args(tiny_bert, qa_files, tmp_path / "second", "--trainer.max_steps=4",
                                 "--model.topk=3", f"--ckpt_path={last}"))
    assert resumed.trainer.global_step == 4 and resumed.model.hparams.topk == 8
    reference = callback(uninterrupted, RecordTraining).rows
    assert callback(resumed, RecordTraining).rows == reference[2:]  # the same batches, with the same learning rates
    expected = uninterrupted.model.state_dict()
    for name, value in resumed.model.state_dict().items():
        torch.testing.assert_close(value, expected[name], msg=name)


@pytest.mark.parametrize("first_steps", [2, 3], ids=["mid-epoch", "end-of-epoch"])
def test_a_finished_run_resumed_with_more_steps_follows_the_longer_schedule(tmp_path, tiny_bert, qa_files,
                                                                           uninterrupted, first_steps):
    build_cli(run_args(tiny_bert, qa_files, tmp_path / "first", f"--trainer.max_steps={first_steps}"))
    (last,) = (tmp_path / "first").rglob("last.ckpt")
    resumed = build_cli(run_args(tiny_bert, qa_files, tmp_path / "second", "--trainer.max_steps=4",
                                 f"--ckpt_path={last}"))
    rows = callback(resumed, RecordTraining).rows
    steps = list(range(first_steps, 4))
    assert [step for step, _, _ in rows] == steps
    # the shorter run had decayed its learning rate to 0; from its last step on the 4-step schedule applies
    assert [lr for _, lr, _ in rows] == pytest.approx([1e-3 * linear_warmup_decay(s, warmup_steps=0, total_steps=4)
                                                       for s in steps])
    # and the data continues with the batches an uninterrupted run sees (the rest of epoch 0, or epoch 1)
    reference = callback(uninterrupted, RecordTraining).rows
    assert [batch for _, _, batch in rows] == [batch for _, _, batch in reference[first_steps:]]
