"""SequenceClassificationModule: pooling, metrics, export of the head."""

import pytest
import torch

from topk_lightning.modules import SequenceClassificationModule


def test_mean_pooling_ignores_padding(tiny_bert):
    module = SequenceClassificationModule(backbone=tiny_bert, attention="sdpa", pooling="mean", num_labels=3)
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    torch.testing.assert_close(module.pool(hidden, mask), torch.tensor([[2.0, 3.0]]))
    module.hparams.pooling = "cls"
    torch.testing.assert_close(module.pool(hidden, mask), torch.tensor([[1.0, 2.0]]))


def test_steps_metrics_and_export(tmp_path, tiny_bert):
    import lightning.pytorch as pl
    from safetensors.torch import load_file

    module = SequenceClassificationModule(backbone=tiny_bert, attention="topk", topk=4, num_labels=3)
    batch = {"input_ids": torch.randint(1000, 2000, (4, 12)), "attention_mask": torch.ones(4, 12, dtype=torch.long),
             "labels": torch.tensor([0, 1, 2, 1])}
    assert module(batch).shape == (4, 3)
    loader = torch.utils.data.DataLoader([batch], batch_size=None, collate_fn=lambda b: b)
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=loader)
    assert {"val/acc", "val/f1", "val/loss"} <= set(trainer.callback_metrics)
    predictions = trainer.predict(module, dataloaders=loader)
    assert predictions[0].shape == (4,)
    out = module.export(tmp_path / "export")
    head = load_file(out / "classification_head.safetensors")
    torch.testing.assert_close(head["1.weight"], module.head[1].weight)


def test_bad_arguments(tiny_bert):
    with pytest.raises(ValueError, match="num_labels"):
        SequenceClassificationModule(backbone=tiny_bert, num_labels=1)
    with pytest.raises(ValueError, match="pooling"):
        SequenceClassificationModule(backbone=tiny_bert, pooling="max")
