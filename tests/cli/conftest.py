"""Fixtures for CLI tests: tiny QA / classification files (the tiny BERT comes from tests/conftest.py)."""

import csv
import json
import os
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def qa_files(tmp_path_factory):
    """Tiny SQuAD v2 train/validation files (needle documents of ~150 tokens, a quarter unanswerable)."""
    from topk_lightning.data.needle import generate_needle_squad

    path = tmp_path_factory.mktemp("qa-data")
    files = {}
    for split, count in (("train", 8), ("validation", 6)):
        data = generate_needle_squad(num_examples=count, document_words=110, num_distractors=2,
                                     unanswerable_fraction=0.25, split=split)
        files[split] = path / f"{split}.json"
        files[split].write_text(json.dumps(data))
    return {k: str(v) for k, v in files.items()}


@pytest.fixture(scope="session")
def classification_files(tmp_path_factory):
    path = tmp_path_factory.mktemp("cls-data")
    rows = [("the cat sat on the mat", "animal"), ("stocks fell sharply today", "finance"),
            ("a dog barked at the moon", "animal"), ("the bank raised its rates", "finance"),
            ("rain is expected tomorrow", "weather"), ("sunny skies all week", "weather")]
    files = {}
    for split in ("train", "validation"):
        files[split] = path / f"{split}.csv"
        with open(files[split], "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["text", "label"])
            writer.writerows(rows)
    return {k: str(v) for k, v in files.items()}


@pytest.fixture
def restore_sys_path():
    saved = list(sys.path)
    yield
    sys.path[:] = saved
