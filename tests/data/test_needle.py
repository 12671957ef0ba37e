"""The built-in needle set: deterministic, answers correct, distractors present, cached atomically."""

import json
import re

import pytest

from topk_lightning.data.needle import generate_needle_squad, needle_file
from topk_lightning.data.squad import flatten_squad, validate_examples


def qas(data):
    return [(p["context"], qa) for a in data["data"] for p in a["paragraphs"] for qa in p["qas"]]


def test_deterministic_per_seed_and_split():
    one = generate_needle_squad(num_examples=5, document_words=300, seed=3)
    assert one == generate_needle_squad(num_examples=5, document_words=300, seed=3)
    assert one != generate_needle_squad(num_examples=5, document_words=300, seed=4)
    assert one != generate_needle_squad(num_examples=5, document_words=300, seed=3, split="validation")


def test_answers_and_distractors():
    data = generate_needle_squad(num_examples=20, document_words=1200, num_distractors=6, seed=0)
    examples, skipped = validate_examples(flatten_squad(data, source="needle"), source="needle")
    assert skipped == 0 and len(examples) == 20  # every answer_start points at its text
    for context, qa in qas(data):
        (answer,) = qa["answers"]
        # the question's entity is the subject of the sentence holding the answer
        entity = re.search(r"the (\w+ \w+)(?: painted| built)?\?$", qa["question"]).group(1)
        sentence_start = context.rfind(".", 0, answer["answer_start"]) + 1
        sentence = context[sentence_start : answer["answer_start"] + len(answer["text"]) + 1].strip()
        assert entity in sentence and sentence.endswith(answer["text"] + "."), (qa["question"], sentence)
        assert context.count(answer["text"]) == 1
        # six distractor facts of the same form about other entities
        template = re.escape(sentence.replace(entity, "\0").replace(answer["text"], "\1"))
        template = template.replace("\0", r"(\w+ \w+)").replace("\1", r"([\w ]+?)")
        facts = re.findall(template, context)
        assert len(facts) == 7 and len({e for e, _ in facts}) == 7 and len({v for _, v in facts}) == 7
    words = [len(context.split()) for context, _ in qas(data)]
    assert all(1200 <= n < 1300 for n in words)


def test_unanswerable_fraction():
    data = generate_needle_squad(num_examples=60, document_words=200, unanswerable_fraction=0.5, seed=1)
    impossible = [qa for _, qa in qas(data) if qa["is_impossible"]]
    assert 15 <= len(impossible) <= 45
    for context, qa in qas(data):
        if qa["is_impossible"]:
            entity = re.search(r"the (\w+ \w+)(?: painted| built)?\?$", qa["question"]).group(1)
            assert qa["answers"] == []
            assert not re.search(rf"(of|for) the {entity} is|The {entity} was built", context)


def test_needle_file_written_once_atomically(tmp_path):
    path = needle_file(tmp_path, split="train", num_examples=3, document_words=100, seed=0)
    assert path.parent == tmp_path / "needle" and path.is_file()
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left behind
    data = json.loads(path.read_text())
    assert data["version"] == "v2.0" and len(data["data"]) == 3
    mtime = path.stat().st_mtime_ns
    assert needle_file(tmp_path, split="train", num_examples=3, document_words=100, seed=0) == path
    assert path.stat().st_mtime_ns == mtime
    other = needle_file(tmp_path, split="validation", num_examples=3, document_words=100, seed=0)
    assert other != path and json.loads(other.read_text()) != data


def test_bad_parameters():
    with pytest.raises(ValueError, match="unanswerable_fraction"):
        generate_needle_squad(num_examples=1, unanswerable_fraction=1.5)
