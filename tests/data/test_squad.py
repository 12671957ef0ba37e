"""Reading QA files into flat examples: formats, join_paragraphs, and the bad-data errors."""

import json

import pytest

from topk_lightning.data.squad import InvalidExampleError, join_paragraphs, load_qa_examples

CONTEXT = "The Normans gave their name to Normandy, a region in France."


def nested(version="v1.1", **qa_overrides):
    qa = {"id": "q1", "question": "Where is Normandy?", "answers": [{"text": "France", "answer_start": 53}]}
    qa.update(qa_overrides)
    return {"version": version, "data": [{"title": "Normans", "paragraphs": [{"context": CONTEXT, "qas": [qa]}]}]}


def write(path, data):
    path.write_text(json.dumps(data))
    return path


def test_nested_v11(tmp_path):
    examples, skipped = load_qa_examples(write(tmp_path / "v11.json", nested()))
    assert skipped == 0
    assert examples == [{"id": "q1", "title": "Normans", "question": "Where is Normandy?", "context": CONTEXT,
                         "answers": {"text": ["France"], "answer_start": [53]}}]


def test_nested_v2_impossible_has_no_answers(tmp_path):
    data = nested("v2.0", id="q2", answers=[], is_impossible=True,
                  plausible_answers=[{"text": "Normandy", "answer_start": 31}])
    (example,), _ = load_qa_examples(write(tmp_path / "v2.json", data))
    assert example["answers"] == {"text": [], "answer_start": []}


def flat_records():
    return [
        {"id": "a", "question": "Where?", "context": CONTEXT, "answers": {"text": ["France"], "answer_start": [53]}},
        {"id": "b", "question": "Who?", "context": CONTEXT, "answers": {"text": [], "answer_start": []}},
    ]


def test_flat_jsonl_json_and_parquet_agree(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = flat_records()
    (tmp_path / "flat.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    write(tmp_path / "flat.json", records)
    write(tmp_path / "wrapped.json", {"data": records})
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "flat.parquet")
    loaded = [load_qa_examples(tmp_path / name)[0] for name in ("flat.jsonl", "flat.json", "wrapped.json",
                                                                 "flat.parquet")]
    assert all(examples == loaded[0] for examples in loaded)
    assert [e["id"] for e in loaded[0]] == ["a", "b"]
    assert loaded[0][0]["answers"] == {"text": ["France"], "answer_start": [53]}


def test_answers_as_list_of_objects(tmp_path):
    records = [{"id": "a", "question": "Where?", "context": CONTEXT,
                "answers": [{"text": "France", "answer_start": 53}]}]
    (example,), _ = load_qa_examples(write(tmp_path / "list.json", records))
    assert example["answers"] == {"text": ["France"], "answer_start": [53]}


def test_predict_file_without_answers(tmp_path):
    records = [{"id": "a", "question": "Where?", "context": CONTEXT}]
    path = write(tmp_path / "predict.json", records)
    (example,), _ = load_qa_examples(path, require_answers=False)
    assert example["answers"] is None
    with pytest.raises(ValueError, match=r"predict\.json.*'a'.*missing field 'answers'"):
        load_qa_examples(path)


# -- bad data -----------------------------------------------------------------------------------------------------
BAD = {
    "missing_context": ({"id": "bad1", "question": "Where?", "answers": {"text": [], "answer_start": []}},
                        r"missing field 'context'"),
    "missing_question": ({"id": "bad1", "context": CONTEXT, "answers": {"text": [], "answer_start": []}},
                         r"missing field 'question'"),
    "empty_context": ({"id": "bad1", "question": "Where?", "context": "  ",
                       "answers": {"text": [], "answer_start": []}}, r"empty context"),
    "answer_not_at_start": ({"id": "bad1", "question": "Where?", "context": CONTEXT,
                             "answers": {"text": ["France"], "answer_start": [50]}},
                            r"answer text 'France' not found at answer_start=50"),
    "answers_shape": ({"id": "bad1", "question": "Where?", "context": CONTEXT,
                       "answers": {"text": ["France"], "answer_start": []}}, r"lists of equal length"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_example_names_file_and_id(tmp_path, case):
    record, message = BAD[case]
    path = write(tmp_path / f"{case}.json", [flat_records()[0], record])
    with pytest.raises(ValueError, match=message) as error:
        load_qa_examples(path)
    assert str(path) in str(error.value) and "'bad1'" in str(error.value)
    assert isinstance(error.value, InvalidExampleError)


def test_missing_id_names_position(tmp_path):
    path = write(tmp_path / "noid.json", [{"question": "Where?", "context": CONTEXT}])
    with pytest.raises(ValueError, match=r"noid\.json: example #0 \(no id\): missing field 'id'"):
        load_qa_examples(path)


def test_duplicate_id(tmp_path):
    path = write(tmp_path / "dup.json", [flat_records()[0], flat_records()[0]])
    with pytest.raises(ValueError, match=r"dup\.json: example id 'a': duplicate id"):
        load_qa_examples(path)


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="no/such/file.json"):
        load_qa_examples("no/such/file.json")


def test_malformed_json(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"data": [ {"title": "x", ')
    with pytest.raises(ValueError, match=r"broken\.json: malformed JSON"):
        load_qa_examples(path)


def test_malformed_jsonl_names_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(flat_records()[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"broken\.jsonl: malformed JSON on line 2"):
        load_qa_examples(path)


def test_skip_invalid_counts_and_warns_once(tmp_path, caplog):
    records = flat_records() + [BAD[c][0] | {"id": f"bad-{c}"} for c in sorted(BAD)] + [flat_records()[0]]
    path = write(tmp_path / "mixed.json", records)
    with caplog.at_level("WARNING"):
        examples, skipped = load_qa_examples(path, skip_invalid=True)
    assert [e["id"] for e in examples] == ["a", "b"]
    assert skipped == len(BAD) + 1  # the bad ones and the repeated id
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and f"skipped {skipped} invalid" in warnings[0].getMessage()
    assert str(path) in warnings[0].getMessage()


# -- join_paragraphs ----------------------------------------------------------------------------------------------
def test_join_paragraphs_small():
    examples = [
        {"id": "1", "title": "A", "question": "q", "context": "abc def",
         "answers": {"text": ["def"], "answer_start": [4]}},
        {"id": "2", "title": "A", "question": "q", "context": "xyz", "answers": {"text": ["xyz"], "answer_start": [0]}},
        {"id": "3", "title": "B", "question": "q", "context": "solo", "answers": {"text": [], "answer_start": []}},
        {"id": "4", "title": "A", "question": "q", "context": "abc def",
         "answers": {"text": ["abc"], "answer_start": [0]}},
    ]
    joined = join_paragraphs(examples, separator=" || ")
    assert [e["context"] for e in joined] == ["abc def || xyz", "abc def || xyz", "solo", "abc def || xyz"]
    assert [e["answers"]["answer_start"] for e in joined] == [[4], [11], [], [0]]
    assert examples[1]["answers"]["answer_start"] == [0]  # inputs untouched


def test_join_paragraphs_on_squad_sample(squad_examples, tokenizer):
    joined = join_paragraphs(squad_examples)
    assert len(joined) == len(squad_examples) == 1407
    for example in joined:
        for text, start in zip(example["answers"]["text"], example["answers"]["answer_start"]):
            assert example["context"][start : start + len(text)] == text, example["id"]
    articles = {e["title"]: e["context"] for e in joined}
    assert len(articles) == 5
    lengths = [len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in articles.values()]
    assert all(3000 <= n <= 6000 for n in lengths), lengths
