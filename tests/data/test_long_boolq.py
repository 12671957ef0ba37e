"""Long-input BoolQ: the own passage whole at the recorded position, distractors from other articles, lengths in
range, labels unchanged, deterministic; bad files rejected by name; the CLI writes atomically; position ids that
restart per passage."""

import json

import pytest

from topk_lightning.data.long_boolq import SEPARATOR, build_long_boolq, main, read_boolq, title_of
from topk_lightning.data.passages import passage_position_ids


def words(text):  # an independent token count: whitespace words
    return len(text.split())


def make_records(n=40):
    records = []
    for i in range(n):
        article = f"Article{i // 2}"  # two questions per article: the other one must never be a distractor
        body = " ".join(f"w{i}x{j}" for j in range(20 + 7 * (i % 5)))
        records.append({"id": f"q{i}", "question": f"is question {i} true", "passage": f"{article} -- {body}",
                        "label": "true" if i % 3 else "false"})
    return records


def test_own_passage_whole_among_other_articles():
    records = make_records()
    long = build_long_boolq(records, count_tokens=words, min_tokens=150, max_length=170, special_tokens=3, seed=1)
    assert len(long) == len(records)
    by_passage = {r["passage"]: r for r in records}
    positions = set()
    for source, example in zip(records, long):
        assert (example["id"], example["question"], example["label"]) == (source["id"], source["question"],
                                                                           source["label"])
        parts = example["passage"].split(SEPARATOR)
        assert parts[example["position"]] == source["passage"] and example["passages"] == len(parts)
        assert example["passage"].count(source["passage"]) == 1
        for i, part in enumerate(parts):
            if i == example["position"]:
                continue
            assert title_of(part) != title_of(source["passage"])  # other articles only
            # a whole passage of another record, or (the last one added) a word-prefix of one
            assert part in by_passage or any(p.startswith(part) for p in by_passage)
        total = 3 + words(source["question"]) + words(example["passage"])
        assert 150 <= total <= 170 and example["tokens"] == total
        positions.add(example["position"])
    assert len(positions) > 3  # the own passage moves around


def test_deterministic_and_limit_is_a_prefix():
    records = make_records()
    kwargs = dict(count_tokens=words, min_tokens=120, max_length=140, seed=0, split="dev")
    full = build_long_boolq(records, **kwargs)
    assert full == build_long_boolq(records, **kwargs)
    assert build_long_boolq(records, **kwargs, limit=5) == full[:5]
    assert full != build_long_boolq(records, **{**kwargs, "seed": 1})
    assert full != build_long_boolq(records, **{**kwargs, "split": "train"})


def test_position_first_or_last_moves_only_the_own_passage():
    records = make_records()
    kwargs = dict(count_tokens=words, min_tokens=150, max_length=170, seed=2)
    placed = {where: build_long_boolq(records, **kwargs, position=where) for where in ("random", "first", "last")}
    for source, shuffled, first, last in zip(records, placed["random"], placed["first"], placed["last"]):
        own = source["passage"]
        parts = {name: example["passage"].split(SEPARATOR)
                 for name, example in (("random", shuffled), ("first", first), ("last", last))}
        assert parts["first"][0] == own and first["position"] == 0
        assert parts["last"][-1] == own and last["position"] == last["passages"] - 1
        # the same distractors in the same order: only the own passage moved
        distractors = [p for i, p in enumerate(parts["random"]) if i != shuffled["position"]]
        assert parts["first"][1:] == distractors and parts["last"][:-1] == distractors
        assert first["tokens"] == last["tokens"] == shuffled["tokens"]
    assert {e["position"] for e in placed["random"]} != {0}  # the task itself still moves it
    with pytest.raises(ValueError, match="position must be one of \\['random', 'first', 'last'\\], got 'middle'"):
        build_long_boolq(records, **kwargs, position="middle")


def test_too_long_own_passage_and_bad_range():
    records = make_records()
    with pytest.raises(ValueError, match="q2.*take 43 tokens, more than max_length=40"):
        build_long_boolq(records, count_tokens=words, min_tokens=30, max_length=40)
    with pytest.raises(ValueError, match="min_tokens"):
        build_long_boolq(records, count_tokens=words, min_tokens=300, max_length=200)
    with pytest.raises(ValueError, match="do not reach min_tokens"):
        build_long_boolq(records[:4], count_tokens=words, min_tokens=1000, max_length=2000)


def test_read_boolq_names_file_line_and_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = {"id": "a", "question": "q", "passage": "T -- p", "label": "true"}
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "label": "yes"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl: line 2: field 'label' must be"):
        read_boolq(path)
    path.write_text(json.dumps({**good, "passage": ""}) + "\n")
    with pytest.raises(ValueError, match=r"line 1: field 'passage' is missing"):
        read_boolq(path)
    path.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"line 1: not JSON"):
        read_boolq(path)


def test_cli_writes_jsonl_atomically(tmp_path, tokenizer_path):
    source = tmp_path / "dev.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in make_records()))
    out = tmp_path / "out" / "dev.jsonl"
    assert main([str(source), str(out), "--tokenizer", tokenizer_path, "--min-tokens", "300", "--max-length", "320",
                 "--limit", "3"]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in lines] == ["q0", "q1", "q2"] and all(300 <= r["tokens"] <= 320 for r in lines)
    assert [p.name for p in out.parent.iterdir()] == ["dev.jsonl"]  # no temporary left
    assert main([str(tmp_path / "missing.jsonl"), str(out)]) == 2


def test_passage_position_ids_restart_at_every_passage(tokenizer):
    records = make_records()
    count = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    for position in ("first", "last"):
        example = build_long_boolq(records, count_tokens=count, min_tokens=600, max_length=640, limit=2,
                                   position=position)[1]
        encoded = tokenizer(example["question"], example["passage"], return_offsets_mapping=True)
        ids = passage_position_ids(example["passage"], encoded["token_type_ids"], encoded["offset_mapping"])
        # independent reference: each passage tokenised on its own, counted from the end of [CLS] question [SEP]
        first = len(tokenizer(example["question"])["input_ids"])
        expected = list(range(first))
        for part in example["passage"].split(SEPARATOR):
            expected += list(range(first, first + count(part)))
        expected.append(expected[-1] + 1)  # the closing [SEP] follows the last passage
        assert example["passages"] >= 3 and ids == expected


def test_passage_position_ids_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="differ in length"):
        passage_position_ids("a", [0, 1], [(0, 0)])
