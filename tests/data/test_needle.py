"""The built-in needle set: deterministic, answers correct, distractors present, controls valid, cached atomically."""

import json
import re

import pytest

from topk_lightning.data.needle import MAX_FACTS, generate_needle_squad, needle_file, swap_questions
from topk_lightning.data.squad import flatten_squad, validate_examples


def qas(data):
    return [(p["context"], qa) for a in data["data"] for p in a["paragraphs"] for qa in p["qas"]]


def test_deterministic_per_seed_and_split():
    one = generate_needle_squad(num_examples=5, document_words=300, seed=3)
    assert one == generate_needle_squad(num_examples=5, document_words=300, seed=3)
    assert one != generate_needle_squad(num_examples=5, document_words=300, seed=4)
    assert one != generate_needle_squad(num_examples=5, document_words=300, seed=3, split="validation")


def _entity(question):
    return re.search(r"the (\w+ \w+)(?: painted| built)?\?$", question).group(1)


def _fact_sentences(context, qa):
    """(entity, value) of every sentence in ``context`` of the same form as the answer's fact, read with a regex
    built from the answer sentence itself (independent of the generator's templates)."""
    (answer,) = qa["answers"]
    entity = _entity(qa["question"])
    sentence_start = context.rfind(".", 0, answer["answer_start"]) + 1
    sentence = context[sentence_start : answer["answer_start"] + len(answer["text"]) + 1].strip()
    assert entity in sentence and sentence.endswith(answer["text"] + "."), (qa["question"], sentence)
    template = re.escape(sentence.replace(entity, "\0").replace(answer["text"], "\1"))
    template = template.replace("\0", r"(\w+ \w+)").replace("\1", r"([\w ]+?)")
    return re.findall(template, context)


def test_answers_and_distractors():
    data = generate_needle_squad(num_examples=20, document_words=1200, num_distractors=6, seed=0)
    examples, skipped = validate_examples(flatten_squad(data, source="needle"), source="needle")
    assert skipped == 0 and len(examples) == 20  # every answer_start points at its text
    for context, qa in qas(data):
        (answer,) = qa["answers"]
        assert context[answer["answer_start"]:].startswith(answer["text"])
        assert context.count(answer["text"]) == 1
        facts = _fact_sentences(context, qa)
        # six distractor facts of the same form about other entities, and the answer's own
        assert len(facts) == 7 and (_entity(qa["question"]), answer["text"]) in facts
        # no word shared between two entities, nor between two values: one question word picks one fact
        entity_words = [w for e, _ in facts for w in e.split()]
        value_words = [w for _, v in facts for w in v.split()]
        assert len(set(entity_words)) == len(entity_words) == 14
        assert len(set(value_words)) == len(value_words)
        # every entity (the asked one too) is named in one filler sentence besides its fact and the question
        for entity, _ in facts:
            assert context.count(f" {entity} ") + context.count(f" {entity}.") == 2, entity
        # the record that benchmarks read agrees with the text
        assert qa["needle"]["entity"] == _entity(qa["question"])
        assert sorted(qa["needle"]["facts"].items()) == sorted(facts)
    words = [len(context.split()) for context, _ in qas(data)]
    assert all(1200 + 7 * 6 + 7 * 7 <= n < 1300 + 7 * 10 + 7 * 11 for n in words)  # filler, mentions and facts


def test_hand_checked_span():
    """One short document, read by eye (seed 11, 2 distractors, one mention per entity)::

        The coastal granary was built in 1936. A painting of the northern greenhouse hangs in the town hall. The
        main stable was built in 1467. Two carpenters discussed the iron railings while the bells rang. A
        travelling painter moved the iron railings by lamplight. The northern greenhouse was built in 1963. ...
    """
    data = generate_needle_squad(num_examples=1, document_words=20, num_distractors=2, seed=11)
    ((context, qa),) = qas(data)
    assert qa["question"] == "In what year was the northern greenhouse built?"
    fact = "The northern greenhouse was built in 1963."
    assert context.index(fact) + len("The northern greenhouse was built in ") == 297
    assert qa["answers"] == [{"text": "1963", "answer_start": 297}]
    # the entity's mention states no fact; the two distractor facts have the same form
    assert "A painting of the northern greenhouse hangs in the town hall." in context
    assert "The coastal granary was built in 1936." in context and "The main stable was built in 1467." in context
    assert qa["needle"] == {"kind": "year", "entity": "northern greenhouse",
                            "facts": {"coastal granary": "1936", "main stable": "1467", "northern greenhouse": "1963"}}


def test_swap_questions_control():
    data = generate_needle_squad(num_examples=24, document_words=100, num_distractors=6, seed=2)
    control = swap_questions(data)
    assert control != data and data == generate_needle_squad(num_examples=24, document_words=100,
                                                             num_distractors=6, seed=2)  # input untouched
    for (context, qa), (swapped_context, swapped) in zip(qas(data), qas(control)):
        assert swapped_context == context and swapped["answers"] == qa["answers"] and swapped["id"] == qa["id"]
        asked = _entity(swapped["question"])
        assert asked == swapped["needle"]["asked"] != qa["needle"]["entity"]
        # same question form, about an entity with no fact in this document
        assert swapped["question"].replace(asked, "X") == qa["question"].replace(qa["needle"]["entity"], "X")
        assert asked not in qa["needle"]["facts"]
        assert swapped["question"] in {q["question"] for _, q in qas(data)}  # another document's question
    with pytest.raises(ValueError, match="needle"):
        swap_questions({"data": [{"paragraphs": [{"context": "x", "qas": [{"id": "a", "question": "q"}]}]}]})


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
    with pytest.raises(ValueError, match="num_distractors"):
        generate_needle_squad(num_examples=1, num_distractors=MAX_FACTS)
    with pytest.raises(ValueError, match="mentions"):
        generate_needle_squad(num_examples=1, mentions=-1)
    generate_needle_squad(num_examples=2, document_words=10, num_distractors=MAX_FACTS - 1)
