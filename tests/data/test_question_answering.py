"""QADataModule: batches per docs/CONTRACTS.md, padding, files over the built-in dataset, caching, Lightning."""

import json
import logging

import pytest
import torch

from topk_lightning.data import QADataModule

CONTEXT = "The Normans gave their name to Normandy, a region in France. " * 30


def write_flat(path, n=6, answers=True):
    records = []
    for i in range(n):
        record = {"id": f"ex{i}", "question": f"Where is Normandy {i}?", "context": CONTEXT[: 200 + 150 * i]}
        if answers:
            record["answers"] = ({"text": ["France"], "answer_start": [53]} if i % 3 else
                                 {"text": [], "answer_start": []})
        records.append(record)
    path.write_text("\n".join(json.dumps(r) for r in records))
    return str(path)


def make(tmp_path, tokenizer_path, **kwargs):
    defaults = dict(tokenizer=tokenizer_path, max_length=128, doc_stride=32, max_question_length=16, batch_size=4,
                    pad_to_multiple_of=64, cache_dir=str(tmp_path / "cache"))
    return QADataModule(**{**defaults, **kwargs})


def test_batches_follow_the_contract(tmp_path, tokenizer_path):
    path = write_flat(tmp_path / "qa.jsonl")
    dm = make(tmp_path, tokenizer_path, train_file=path, validation_file=path, predict_file=path)
    dm.setup("fit")
    train = next(iter(dm.train_dataloader()))
    assert set(train) == {"input_ids", "attention_mask", "token_type_ids", "start_positions", "end_positions"}
    val = next(iter(dm.val_dataloader()))
    assert set(val) == set(train) | {"example_id", "offset_mapping", "context", "answers"}
    for batch in (train, val):
        batch_size, length = batch["input_ids"].shape
        assert length % 64 == 0 and length <= 128
        for key in ("input_ids", "attention_mask", "token_type_ids", "start_positions", "end_positions"):
            assert batch[key].dtype == torch.long and batch[key].shape[0] == batch_size
    assert val["offset_mapping"].shape == (*val["input_ids"].shape, 2)
    assert val["example_id"] == ["ex0", "ex1", "ex2", "ex3"]  # ex3 and later need two or more windows
    assert val["answers"] == [[], ["France"], ["France"], []] and val["context"][0] == CONTEXT[:200]
    # padding: mask 0, pad id, offsets -1
    padded = val["attention_mask"] == 0
    assert padded.any() and (val["input_ids"][padded] == 0).all() and (val["offset_mapping"][padded] == -1).all()
    # labels point at "France" through the offsets
    for i in range(4):
        start, end = int(val["start_positions"][i]), int(val["end_positions"][i])
        if start:
            begin, finish = val["offset_mapping"][i, start, 0], val["offset_mapping"][i, end, 1]
            assert val["context"][i][begin:finish] == "France"
    dm.setup("predict")
    predict = next(iter(dm.predict_dataloader()))
    assert "start_positions" in predict  # the predict file has answers


def test_predict_without_answers(tmp_path, tokenizer_path):
    dm = make(tmp_path, tokenizer_path, predict_file=write_flat(tmp_path / "p.jsonl", answers=False))
    dm.setup("predict")
    batch = next(iter(dm.predict_dataloader()))
    assert "start_positions" not in batch and "end_positions" not in batch
    assert batch["answers"] == [[]] * 4 and batch["example_id"][0] == "ex0"
    assert dm.val_dataloader() == [] and dm.test_dataloader() == []


def test_files_override_the_builtin_dataset(tmp_path, tokenizer_path, caplog):
    path = write_flat(tmp_path / "qa.jsonl")
    with caplog.at_level(logging.INFO, logger="topk_lightning.data.question_answering"):
        dm = make(tmp_path, tokenizer_path, dataset="needle", train_file=path)
    assert any("built-in dataset 'needle' is ignored" in r.getMessage() for r in caplog.records)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.splits["train"]) == 10 and dm.splits["validation"] is None
    assert not (tmp_path / "cache" / "needle").exists()


def test_needle_datamodule_and_feature_cache(tmp_path, tokenizer_path):
    kwargs = dict(dataset="needle", needle_train_examples=6, needle_eval_examples=3, needle_document_words=300,
                  max_length=512, doc_stride=64, limit_eval_examples=2)
    dm = make(tmp_path, tokenizer_path, **kwargs)
    dm.prepare_data()
    dm.setup("fit")
    train_ids = {e["id"] for e in dm.load_examples("train")}
    val = list(dm.val_dataloader())
    val_ids = {i for batch in val for i in batch["example_id"]}
    assert len(train_ids) == 6 and len(val_ids) == 2 and not train_ids & val_ids
    assert max(dm.splits["train"].lengths) > 300  # documents of ~300 words exceed 300 tokens
    cached = sorted(p.name for p in (tmp_path / "cache" / "features").iterdir())
    assert len(cached) == 2 and all(name.endswith(".arrow") for name in cached)  # no temporaries left
    again = make(tmp_path, tokenizer_path, **kwargs)
    again.setup("fit")
    assert sorted(p.name for p in (tmp_path / "cache" / "features").iterdir()) == cached
    first, second = next(iter(dm.val_dataloader())), next(iter(again.val_dataloader()))
    assert torch.equal(first["input_ids"], second["input_ids"]) and first["example_id"] == second["example_id"]


def test_needle_short_training_long_evaluation_and_mentions(tmp_path, tokenizer_path):
    dm = make(tmp_path, tokenizer_path, dataset="needle", needle_train_examples=4, needle_eval_examples=4,
              needle_document_words=20, needle_eval_document_words=400, needle_distractors=6, needle_mentions=0)
    train, val = dm.load_examples("train"), dm.load_examples("validation")
    assert all(len(e["context"].split()) < 20 + 7 * 12 for e in train)  # filler plus seven facts
    assert all(len(e["context"].split()) >= 400 for e in val)
    for example in train + val:  # no mentions: every entity is named once, in its fact
        asked = example["question"].rstrip("?").split(" the ")[-1].removesuffix(" built").removesuffix(" painted")
        assert example["context"].count(asked) == 1, (asked, example["context"])
    with_mentions = make(tmp_path, tokenizer_path, dataset="needle", needle_train_examples=4, needle_eval_examples=4,
                         needle_document_words=20, needle_distractors=6, needle_mentions=2)
    for example in with_mentions.load_examples("train"):
        asked = example["question"].rstrip("?").split(" the ")[-1].removesuffix(" built").removesuffix(" painted")
        assert example["context"].count(asked) == 3  # its fact and two filler sentences


def test_join_paragraphs_datamodule(tmp_path, tokenizer_path, squad_file):
    dm = make(tmp_path, tokenizer_path, validation_file=str(squad_file), join_paragraphs=True, max_length=8192,
              doc_stride=128, limit_eval_examples=3, eval_batch_size=3)
    dm.setup("validate")
    (batch,) = list(dm.val_dataloader())
    assert batch["input_ids"].shape[0] == 3 and 3000 < batch["input_ids"].shape[1] <= 8192
    assert batch["input_ids"].shape[1] % 64 == 0
    assert len(batch["context"][0]) > 20000 and batch["answers"][0] == ["France"] * 4
    start, end = int(batch["start_positions"][0]), int(batch["end_positions"][0])
    assert start > 0
    offsets = batch["offset_mapping"][0]
    assert batch["context"][0][offsets[start, 0] : offsets[end, 1]] == "France"


def test_group_by_length_sampler(tmp_path, tokenizer_path):
    from topk_lightning.data.sampling import LengthGroupedSampler

    path = write_flat(tmp_path / "qa.jsonl", n=12)
    dm = make(tmp_path, tokenizer_path, train_file=path, group_by_length=True, batch_size=2, max_length=512)
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, LengthGroupedSampler)
    batches = list(loader)
    assert sum(len(b["input_ids"]) for b in batches) == len(dm.splits["train"])


def test_bad_file_through_the_datamodule(tmp_path, tokenizer_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"id": "x1", "question": "q?", "context": "abc",
                                 "answers": {"text": ["zzz"], "answer_start": [0]}}]))
    dm = make(tmp_path, tokenizer_path, train_file=str(path))
    with pytest.raises(ValueError, match=r"bad\.json: example id 'x1': answer text 'zzz' not found"):
        dm.setup("fit")
    dm = make(tmp_path, tokenizer_path, train_file=str(path), validation_file=write_flat(tmp_path / "ok.jsonl"),
              skip_invalid=True)
    with pytest.raises(ValueError, match=r"bad\.json: no usable examples for the train split"):
        dm.setup("fit")
    dm.setup("validate")
    assert dm.skipped == {"train": 1, "validation": 0} and len(dm.splits["validation"]) == 10
    dm = make(tmp_path, tokenizer_path, train_file=str(tmp_path / "missing.json"))
    with pytest.raises(FileNotFoundError, match="missing.json"):
        dm.setup("fit")


def test_argument_checks(tmp_path):
    with pytest.raises(ValueError, match="doc_stride"):
        QADataModule(max_length=128, doc_stride=100, max_question_length=32)
    with pytest.raises(ValueError, match="unknown built-in dataset"):
        QADataModule(dataset="squad")


def test_lightning_fit_with_sanity_check(tmp_path, tokenizer_path):
    import lightning as L

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.embedding = torch.nn.Embedding(30522, 4)
            self.head = torch.nn.Linear(4, 2)
            self.stages = []

        def training_step(self, batch, _):
            assert "offset_mapping" not in batch
            self.stages.append("train")
            logits = self.head(self.embedding(batch["input_ids"]))
            return torch.nn.functional.cross_entropy(logits[..., 0], batch["start_positions"])

        def validation_step(self, batch, _):
            assert "offset_mapping" in batch and len(batch["example_id"]) == len(batch["input_ids"])
            self.stages.append("val")

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    path = write_flat(tmp_path / "qa.jsonl")
    dm = make(tmp_path, tokenizer_path, train_file=path, validation_file=path)
    model = Tiny()
    trainer = L.Trainer(max_steps=2, limit_val_batches=1, num_sanity_val_steps=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=dm)
    assert model.stages[0] == "val" and model.stages.count("train") == 2
    assert len(dm.splits["train"]) == len(dm.splits["validation"]) == 10
    assert "offset_mapping" not in dm.splits["train"][0] and "offset_mapping" in dm.splits["validation"][0]
