"""ClassificationDataModule on small CSV / JSONL / parquet files."""

import csv
import json

import pytest
import torch

from topk_lightning.data import ClassificationDataModule
from topk_lightning.errors import InputError

ROWS = [
    {"id": "r0", "text": "a fine and moving film", "pair": "great", "label": "positive"},
    {"id": "r1", "text": "dull", "pair": "bad", "label": "negative"},
    {"id": "r2", "text": "neither good nor bad, " * 20, "pair": "meh", "label": "neutral"},
    {"id": "r3", "text": "loved it", "pair": "good", "label": "positive"},
    {"id": "r4", "text": "boring and long", "pair": "bad", "label": "negative"},
]


def write_csv(path, rows):
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def make(tmp_path, tokenizer_path, **kwargs):
    defaults = dict(tokenizer=tokenizer_path, batch_size=4, max_length=32, pad_to_multiple_of=8,
                    cache_dir=str(tmp_path / "cache"))
    return ClassificationDataModule(**{**defaults, **kwargs})


def test_csv_labels_inferred_and_batches(tmp_path, tokenizer_path):
    path = write_csv(tmp_path / "train.csv", ROWS)
    dm = make(tmp_path, tokenizer_path, train_file=path, validation_file=path)
    assert dm.label_names == ["negative", "neutral", "positive"] and dm.num_labels == 3
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert batch["labels"].tolist() == [2, 0, 1, 2]
    assert batch["input_ids"].shape == (4, 32)  # row r2 is truncated to max_length
    assert batch["input_ids"].dtype == torch.long
    lengths = batch["attention_mask"].sum(1).tolist()
    assert lengths[2] == 32 and lengths[1] == 3  # [CLS] dull [SEP]


def test_jsonl_pairs_given_label_names_and_int_labels(tmp_path, tokenizer_path):
    rows = [dict(r, label=["negative", "neutral", "positive"].index(r["label"])) for r in ROWS]
    rows[1]["label"] = "negative"  # names and indices may mix
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    dm = make(tmp_path, tokenizer_path, train_file=path, text_pair_column="pair",
              label_names=["negative", "neutral", "positive"], pad_to_multiple_of=16, max_length=64)
    dm.setup("fit")
    dataset = dm.splits["train"]
    assert [dataset[i]["labels"] for i in range(len(dataset))] == [2, 0, 1, 2, 0]
    assert dataset[1]["token_type_ids"].tolist() == [0, 0, 0, 1, 1]  # [CLS] dull [SEP] bad [SEP]
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[1] % 16 == 0


def test_integer_labels_inferred(tmp_path, tokenizer_path):
    rows = [{"text": "x", "label": 0}, {"text": "y", "label": 3}]
    dm = make(tmp_path, tokenizer_path, train_file=write_jsonl(tmp_path / "t.jsonl", rows))
    assert dm.label_names == ["0", "1", "2", "3"] and dm.num_labels == 4


def test_parquet_and_predict_without_labels(tmp_path, tokenizer_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"text": r["text"]} for r in ROWS]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "predict.parquet")
    dm = make(tmp_path, tokenizer_path, predict_file=str(tmp_path / "predict.parquet"), label_names=["a", "b"],
              limit_eval_examples=3)
    dm.setup("predict")
    batches = list(dm.predict_dataloader())
    assert "labels" not in batches[0] and len(batches[0]["input_ids"]) == 3


def test_bad_rows(tmp_path, tokenizer_path, caplog):
    rows = ROWS[:2] + [{"id": "r9", "text": "", "pair": "", "label": "positive"},
                       {"id": "r10", "text": "ok", "pair": "", "label": "angry"}]
    path = write_csv(tmp_path / "bad.csv", rows)
    dm = make(tmp_path, tokenizer_path, train_file=path, label_names=["negative", "positive"])
    with pytest.raises(ValueError, match=r"bad\.csv: row 2 \(id 'r9'\): column 'text' is empty"):
        dm.setup("fit")
    rows[2]["text"] = "fine"
    path = write_csv(tmp_path / "bad.csv", rows)
    dm = make(tmp_path, tokenizer_path, train_file=path, label_names=["negative", "positive"])
    with pytest.raises(ValueError, match=r"bad\.csv: row 3 \(id 'r10'\): unknown label 'angry'"):
        dm.setup("fit")
    dm = make(tmp_path, tokenizer_path, train_file=path, label_names=["negative", "positive"], skip_invalid=True)
    with caplog.at_level("WARNING"):
        dm.setup("fit")
    assert len(dm.splits["train"]) == 3 and dm.skipped == {"train": 1}
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"skipped 1 invalid row(s) of 4 in {path}; first: {path}: row 3 (id 'r10'): unknown label 'angry'; "
        "expected one of ['negative', 'positive'] or an index below 2"
    ]
    with pytest.raises(ValueError, match="missing label column 'category'"):
        make(tmp_path, tokenizer_path, train_file=path, label_column="category", label_names=["a"]).setup("fit")


def test_passage_separator_restarts_positions_at_every_passage(tmp_path, tokenizer_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    passages = ["loch ness is a lake in scotland", "the river thames flows through london", "owls hunt at night"]
    rows = [{"text": "is the thames in london", "pair": "\n\n".join(passages), "label": "yes"},
            {"text": "do owls sleep by day", "pair": passages[2], "label": "no"}]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    dm = make(tmp_path, tokenizer_path, train_file=path, validation_file=path, text_pair_column="pair",
              passage_separator="\n\n", max_length=64)
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    assert "offset_mapping" not in batch and batch["position_ids"].shape == batch["input_ids"].shape
    # independent reference: [CLS] question [SEP] counted 0.., each passage tokenised alone and counted from there
    for row, ids in zip(rows, batch["position_ids"].tolist()):
        first = len(tokenizer(row["text"])["input_ids"])
        expected = list(range(first))
        for part in row["pair"].split("\n\n"):
            expected += list(range(first, first + len(tokenizer(part, add_special_tokens=False)["input_ids"])))
        expected.append(expected[-1] + 1)  # the closing [SEP]
        assert ids[:len(expected)] == expected and set(ids[len(expected):]) <= {0}  # padding
    plain = make(tmp_path, tokenizer_path, train_file=path, validation_file=path, text_pair_column="pair",
                 max_length=64)
    plain.setup("fit")
    assert "position_ids" not in next(iter(plain.val_dataloader()))  # the cache keeps the two apart
    with pytest.raises(InputError, match="passage_separator='\\\\n\\\\n' needs text_pair_column"):
        make(tmp_path, tokenizer_path, train_file=path, passage_separator="\n\n")
