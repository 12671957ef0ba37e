"""Sliding windows and answer labels: hand-computed spans, CLS labels, parity with the tokenizer, real data."""

import pytest

from topk_lightning.data.qa_features import QAFeaturizer, answer_token_span, examples_to_columns, prepare_qa_features
from topk_lightning.data.squad import join_paragraphs

# Every word is one MiniLM word-piece, so context token i is word i.
CONTEXT = "one two three four five six seven eight nine ten eleven twelve"


def example(example_id, answer):
    start = CONTEXT.index(answer)
    return {"id": example_id, "question": "who?", "context": CONTEXT,
            "answers": {"text": [answer], "answer_start": [start]}}


def test_windows_and_labels_by_hand(tokenizer):
    # max_length 12 = [CLS] who ? [SEP] + 7 context tokens + [SEP]; doc_stride 3 -> windows start at context token
    # 0, 4 (= 7 - 3) and 8: "one..seven", "five..eleven", "nine..twelve".
    examples = [example("a", "six seven"), example("b", "eight nine"), example("c", "one")]
    features = prepare_qa_features(examples_to_columns(examples, with_labels=True), tokenizer, max_length=12,
                                   doc_stride=3, max_question_length=8, with_eval_fields=True)
    words = [tokenizer.convert_ids_to_tokens(ids.tolist())[4:-1] for ids in features["input_ids"]]
    assert words == [CONTEXT.split()[0:7], CONTEXT.split()[4:11], CONTEXT.split()[8:12]] * 3
    assert features["example_id"] == ["a"] * 3 + ["b"] * 3 + ["c"] * 3
    # "six seven" = context tokens 5-6: window 0 at 4+5, 4+6; window 1 (starts at token 4) at 4+1, 4+2; window 2 CLS
    # "eight nine" = tokens 7-8: not whole in window 0 -> CLS; window 1 at 4+3, 4+4; window 2 starts at 8 -> CLS
    # "one" = token 0: window 0 at position 4 (the first context token); elsewhere CLS
    assert list(zip(features["start_positions"], features["end_positions"])) == [
        (9, 10), (5, 6), (0, 0),
        (0, 0), (7, 8), (0, 0),
        (4, 4), (0, 0), (0, 0),
    ]
    # offsets: (-1, -1) for [CLS] who ? [SEP] and the final [SEP]; context tokens point into CONTEXT
    offsets = features["offset_mapping"][1].tolist()
    assert offsets[:4] == [[-1, -1]] * 4 and offsets[-1] == [-1, -1]
    assert [CONTEXT[s:e] for s, e in offsets[4:-1]] == CONTEXT.split()[4:11]
    assert features["token_type_ids"][1].tolist() == [0] * 4 + [1] * 8


def test_unanswerable_and_predict_features(tokenizer):
    unanswerable = {"id": "u", "question": "who?", "context": CONTEXT, "answers": {"text": [], "answer_start": []}}
    features = prepare_qa_features(examples_to_columns([unanswerable], with_labels=True), tokenizer, max_length=12,
                                   doc_stride=3, max_question_length=8)
    assert features["start_positions"] == [0, 0, 0] and features["end_positions"] == [0, 0, 0]
    assert "offset_mapping" not in features and "example_id" not in features
    predict = prepare_qa_features(examples_to_columns([unanswerable], with_labels=False), tokenizer, max_length=12,
                                  doc_stride=3, max_question_length=8, with_labels=False, with_eval_fields=True)
    assert "start_positions" not in predict and predict["example_id"] == ["u"] * 3


def test_long_question_is_cut(tokenizer):
    long_question = "who " * 40 + "?"
    columns = examples_to_columns([{"id": "q", "question": long_question, "context": CONTEXT,
                                    "answers": {"text": [], "answer_start": []}}], with_labels=True)
    features = prepare_qa_features(columns, tokenizer, max_length=16, doc_stride=2, max_question_length=5)
    assert all(ids[: 7].tolist() == tokenizer("who " * 5, add_special_tokens=True)["input_ids"][:6] + [102]
               for ids in features["input_ids"])


def test_answer_token_span_outside_window():
    offsets = [(0, 0), (0, 3), (4, 7), (0, 0)]
    sequence_ids = [None, 1, 1, None]
    assert answer_token_span(offsets, sequence_ids, 4, 7) == (2, 2)
    assert answer_token_span(offsets, sequence_ids, 0, 7) == (1, 2)
    assert answer_token_span(offsets, sequence_ids, 5, 9) == (0, 0)
    assert answer_token_span(offsets, [None, 0, 0, None], 0, 3) == (0, 0)


def reference_features(tokenizer, examples, max_length, doc_stride, max_question_length):
    """What the plain tokenizer call gives (questions cut the same way), with answer_token_span labels."""
    questions = []
    for question in (e["question"].lstrip() for e in examples):
        encoded = tokenizer(question, add_special_tokens=False, return_offsets_mapping=True)
        if len(encoded["input_ids"]) > max_question_length:
            question = question[: encoded["offset_mapping"][max_question_length - 1][1]]
        questions.append(question)
    encoded = tokenizer(questions, [e["context"] for e in examples], truncation="only_second",
                        max_length=max_length, stride=doc_stride, return_overflowing_tokens=True,
                        return_offsets_mapping=True)
    labels = []
    for i, sample in enumerate(encoded["overflow_to_sample_mapping"]):
        answers = examples[sample]["answers"]
        if answers["text"]:
            start = answers["answer_start"][0]
            labels.append(answer_token_span(encoded["offset_mapping"][i], encoded.sequence_ids(i), start,
                                            start + len(answers["text"][0])))
        else:
            labels.append((0, 0))
    return encoded, labels


@pytest.mark.parametrize("joined", [False, True], ids=["paragraphs", "joined"])
def test_same_windows_as_the_tokenizer(tokenizer, squad_examples, joined):
    examples = join_paragraphs(squad_examples)[:40] if joined else squad_examples[:300]
    max_length, doc_stride = (512, 64) if joined else (96, 32)
    reference, labels = reference_features(tokenizer, examples, max_length, doc_stride, 16)
    features = QAFeaturizer(tokenizer, max_length=max_length, doc_stride=doc_stride, max_question_length=16,
                            with_eval_fields=True)(examples_to_columns(examples, with_labels=True))
    assert [x.tolist() for x in features["input_ids"]] == reference["input_ids"]
    assert [x.tolist() for x in features["token_type_ids"]] == reference["token_type_ids"]
    assert [x.tolist() for x in features["attention_mask"]] == reference["attention_mask"]
    assert list(zip(features["start_positions"], features["end_positions"])) == labels
    assert sum(start > 0 for start, _ in labels) > 10


def test_offsets_map_back_to_answers_on_squad(tokenizer, squad_examples):
    features = QAFeaturizer(tokenizer, max_length=256, doc_stride=64, max_question_length=64,
                            with_eval_fields=True)(examples_to_columns(squad_examples, with_labels=True))
    by_id = {e["id"]: e for e in squad_examples}
    answerable_windows = exact = 0
    seen_answerable = set()
    for i, (start, end) in enumerate(zip(features["start_positions"], features["end_positions"])):
        example = by_id[features["example_id"][i]]
        offsets = features["offset_mapping"][i]
        if start == 0:
            assert end == 0
            continue
        answerable_windows += 1
        seen_answerable.add(example["id"])
        text, char_start = example["answers"]["text"][0], example["answers"]["answer_start"][0]
        span = example["context"][offsets[start][0] : offsets[end][1]]
        # the labelled tokens cover the answer and start/end inside its first/last character's token
        assert text.strip() in span, (example["id"], text, span)
        assert offsets[start][0] <= char_start + (len(text) - len(text.lstrip())) < offsets[start][1] or \
            offsets[start][0] <= char_start < offsets[start + 1][0]
        assert offsets[end][0] < char_start + len(text.rstrip()) <= offsets[end][1]
        exact += span == text
    assert answerable_windows >= 705 and exact / answerable_windows > 0.95
    # every answerable question got a labelled window (answers are short, windows overlap by 64 tokens)
    assert seen_answerable == {e["id"] for e in squad_examples if e["answers"]["text"]}
