"""Dynamic padding and the feature cache."""

from topk_lightning.data.base import PaddingCollator, round_up


def test_round_up():
    assert [round_up(n, 64) for n in (1, 64, 65, 128)] == [64, 64, 128, 128]
    assert round_up(37, None) == 37 and round_up(37, 1) == 37


def test_collator_pads_to_multiple():
    features = [
        {"input_ids": [101, 5, 102], "attention_mask": [1, 1, 1], "offset_mapping": [[-1, -1], [0, 3], [-1, -1]],
         "start_positions": 1, "example_id": "a", "length": 3},
        {"input_ids": [101] * 70, "attention_mask": [1] * 70, "offset_mapping": [[0, 1]] * 70,
         "start_positions": 0, "example_id": "b", "length": 70},
    ]
    batch = PaddingCollator(pad_token_id=7, pad_to_multiple_of=64)(features)
    assert batch["input_ids"].shape == (2, 128) and batch["offset_mapping"].shape == (2, 128, 2)
    assert batch["input_ids"][0, 3:].eq(7).all() and batch["attention_mask"][0, 3:].eq(0).all()
    assert batch["offset_mapping"][0, 1].tolist() == [0, 3] and batch["offset_mapping"][1, 70:].eq(-1).all()
    assert batch["start_positions"].tolist() == [1, 0] and batch["example_id"] == ["a", "b"]
    assert "length" not in batch
    assert PaddingCollator(0, None)(features)["input_ids"].shape == (2, 70)


def test_collator_pads_position_ids_with_zeros():
    features = [{"input_ids": [101, 5, 102], "position_ids": [0, 7, 8]},
                {"input_ids": [101, 102], "position_ids": [0, 1]}]
    batch = PaddingCollator(pad_token_id=0, pad_to_multiple_of=4)(features)
    assert batch["position_ids"].tolist() == [[0, 7, 8, 0], [0, 1, 0, 0]]


def test_collator_rounds_to_the_query_chunk_but_never_past_max_length():
    collate = PaddingCollator(pad_token_id=0, pad_to_multiple_of=512, max_length=2000)
    assert [collate.padded_length(n) for n in (1, 512, 513, 1300, 1537, 2000)] == [512, 512, 1024, 1536, 2000, 2000]
    batch = collate([{"input_ids": [1] * 1300, "attention_mask": [1] * 1300}])
    assert batch["input_ids"].shape == (1, 1536) and batch["attention_mask"][0, 1300:].eq(0).all()
    # a feature longer than max_length (not made by this project's featurizers) is never cut
    assert collate.padded_length(2100) == 2100


def test_interrupted_tokenisation_leaves_no_cache_file(tmp_path):
    import pytest

    from topk_lightning.data.base import map_with_cache

    calls = []

    def tokenize(batch):
        calls.append(len(batch["text"]))
        if len(calls) == 2:
            raise RuntimeError("interrupted")
        return {"input_ids": [[1, 2]] * len(batch["text"]), "length": [2] * len(batch["text"])}

    cache_file = tmp_path / "features" / "cls-train-abc.arrow"
    with pytest.raises(RuntimeError, match="interrupted"):
        map_with_cache({"text": ["a"] * 10}, tokenize, cache_file=cache_file, desc="test", batch_size=4)
    assert list(cache_file.parent.iterdir()) == []
    features = map_with_cache({"text": ["a"] * 10}, lambda b: {"length": [1] * len(b["text"])},
                              cache_file=cache_file, desc="test", batch_size=4)
    assert len(features) == 10 and [p.name for p in cache_file.parent.iterdir()] == [cache_file.name]
