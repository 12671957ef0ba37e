"""Shared helpers of the CLI tests (a uniquely named module: both test folders have a conftest)."""

from pathlib import Path

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
