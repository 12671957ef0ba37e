"""recipes/qa-t5.yaml end to end: recipes/tiny_t5.py writes the tiny T5, the recipe fine-tunes its encoder."""

import runpy

import pytest

from cli_helpers import REPO
from topk_lightning.cli import build_cli


@pytest.mark.slow
def test_t5_recipe_two_steps(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the recipe reads ./outputs/tiny-t5 and writes under ./outputs/qa-t5
    runpy.run_path(str(REPO / "recipes" / "tiny_t5.py"))["main"](["outputs/tiny-t5"])
    cli = build_cli([
        "fit", "--config", str(REPO / "recipes/qa-t5.yaml"),
        "--trainer.max_steps=2", "--trainer.limit_val_batches=1",
        "--data.needle_train_examples=2", "--data.needle_eval_examples=2", "--data.eval_batch_size=2",
        "--data.needle_document_words=250",  # shorter documents keep the test to seconds; the rest is as shipped
        f"--data.cache_dir={tmp_path / 'cache'}",
        f"--export_dir={tmp_path / 'export'}",
    ])
    model = cli.model
    assert type(model.backbone).__name__ == "T5EncoderModel"
    assert model.backbone.config._attn_implementation == "topk"
    assert cli.trainer.global_step == 2
    assert {"val/em", "val/f1", "val/loss", "train/loss"} <= set(cli.trainer.callback_metrics)
    assert list((tmp_path / "outputs" / "qa-t5").glob("csv/version_0/checkpoints/best-step*.ckpt"))
    assert (tmp_path / "export" / "qa_head.safetensors").is_file()
    assert (tmp_path / "export" / "tokenizer.json").is_file()
