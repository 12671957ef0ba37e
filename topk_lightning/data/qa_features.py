"""Sliding windows over long contexts and answer labels from character offsets (pure; needs a fast tokenizer).

A question over a context longer than one window becomes several *features*::

    [CLS] question [SEP] context tokens 0 .. n-1          [SEP]
    [CLS] question [SEP] context tokens n-s .. 2n-s-1     [SEP]     s = doc_stride (tokens shared by neighbours)
    ...

where ``n = max_length - len(question tokens) - 3`` for BERT-style pairs. The windows are exactly those of
``tokenizer(question, context, truncation="only_second", max_length=..., stride=doc_stride,
return_overflowing_tokens=True, return_offsets_mapping=True)``; ``QAFeaturizer`` computes them without
re-tokenising a context shared by many questions.

Labels: ``start_positions`` / ``end_positions`` are the token indices of the first gold answer inside the window;
when the answer is not wholly inside the window, or the question is unanswerable, both are 0 (the CLS token).
Questions longer than ``max_question_length`` tokens are cut (at a token boundary) so that every window keeps room
for context.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from topk_lightning.errors import InputError


def context_bounds(sequence_ids: Sequence[int | None]) -> tuple[int, int] | None:
    """First and last token index of the context (sequence id 1) in a window; ``None`` when it has none."""
    sequence_ids = list(sequence_ids)
    if 1 not in sequence_ids:
        return None
    return sequence_ids.index(1), len(sequence_ids) - 1 - sequence_ids[::-1].index(1)


def answer_token_span(
    offsets: Sequence[Sequence[int]],
    sequence_ids: Sequence[int | None],
    start_char: int,
    end_char: int,
    bounds: tuple[int, int] | None = None,
) -> tuple[int, int]:
    """Token indices (start, end) of the characters ``[start_char, end_char)`` of the context in one window.

    ``offsets`` are the window's character offsets, ``sequence_ids`` its sequence ids (1 = context; ``bounds``, the
    context's first and last token, is computed from them when not given). The start token is the last context
    token starting at or before ``start_char``, the end token the first one ending at or after ``end_char``.
    Returns ``(0, 0)`` (CLS) when the span is not wholly inside the window's context tokens.
    """
    bounds = bounds if bounds is not None else context_bounds(sequence_ids)
    if bounds is None:
        return 0, 0
    first, last = bounds
    if not (offsets[first][0] <= start_char and offsets[last][1] >= end_char):
        return 0, 0
    start = first
    while start <= last and offsets[start][0] <= start_char:
        start += 1
    end = last
    while end >= first and offsets[end][1] >= end_char:
        end -= 1
    return start - 1, end + 1


def _span(offsets: np.ndarray, start_char: int, end_char: int, first: int) -> tuple[int, int]:
    """``answer_token_span`` on the (n, 2) context offsets of a window whose context starts at token ``first``."""
    if not (len(offsets) and offsets[0, 0] <= start_char and offsets[-1, 1] >= end_char):
        return 0, 0
    start = int(np.searchsorted(offsets[:, 0], start_char, side="right")) - 1
    end = int(np.searchsorted(offsets[:, 1], end_char, side="left"))
    return first + start, first + end


class QAFeaturizer:
    """Tokenise batches of examples into windows; the function given to ``datasets.map(batched=True)``.

    Equivalent to ``tokenizer(questions, contexts, truncation="only_second", max_length=max_length,
    stride=doc_stride, return_overflowing_tokens=True, return_offsets_mapping=True)`` (tests check this), but each
    distinct context of a batch is tokenised once, not once per question: with ``join_paragraphs`` hundreds of
    questions share one article, which makes this tens of times faster. It works on the Rust tokenizer directly:
    encode question and context without special tokens, then ``post_process`` with only-second truncation adds
    the special tokens and cuts the windows.

    Args:
        tokenizer: a fast (Rust-backed) Hugging Face tokenizer; the question goes first.
        max_length: tokens per window, special tokens included.
        doc_stride: tokens shared by neighbouring windows; must be smaller than the room left for context.
        max_question_length: questions are cut to this many tokens.
        with_labels: add ``start_positions`` / ``end_positions``.
        with_eval_fields: add ``example_id``, ``example_index`` and ``offset_mapping`` (context tokens only,
            ``[-1, -1]`` elsewhere).
        contexts: the distinct contexts, when the example columns carry ``context_index`` instead of ``context``
            (see ``examples_to_indexed_columns``; keeps one copy of a long article shared by many questions).
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        max_length: int,
        doc_stride: int,
        max_question_length: int,
        with_labels: bool = True,
        with_eval_fields: bool = False,
        contexts: Sequence[str] | None = None,
    ) -> None:
        from tokenizers import Tokenizer

        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("QA windows need a fast (Rust) tokenizer")
        state = tokenizer.backend_tokenizer.to_str()
        self.plain = Tokenizer.from_str(state)
        self.plain.no_padding()
        self.plain.no_truncation()
        self.windowing = Tokenizer.from_str(state)
        self.windowing.no_padding()
        self.windowing.enable_truncation(max_length, stride=doc_stride, strategy="only_second")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.doc_stride = doc_stride
        self.max_question_length = max_question_length
        self.with_labels = with_labels
        self.with_eval_fields = with_eval_fields
        self.with_token_type_ids = "token_type_ids" in tokenizer.model_input_names
        self.contexts = contexts

    def _questions(self, questions: Sequence[str]) -> list:
        questions = [q.lstrip() for q in questions]
        encodings = self.plain.encode_batch(questions, add_special_tokens=False)
        for i, encoding in enumerate(encodings):
            if len(encoding) > self.max_question_length:  # cut the text, re-encode (as the tokenizer would)
                cut = questions[i][: encoding.offsets[self.max_question_length - 1][1]]
                encodings[i] = self.plain.encode(cut, add_special_tokens=False)
        return encodings

    def _windows(self, question: Any, context: Any, example_id: str) -> list:
        try:
            first = self.windowing.post_process(question, context, add_special_tokens=True)
        except Exception as error:  # the Rust tokenizer raises a bare Exception for truncation errors
            raise InputError(
                f"example id {example_id!r}: cannot cut windows of {self.max_length} tokens with doc_stride "
                f"{self.doc_stride} ({error})"
            ) from None
        windows = [(first, first.type_ids), *((w, w.type_ids) for w in first.overflowing)]
        if self.with_token_type_ids and len(windows) > 1:
            # post_process gives overflowing pieces type id 0 everywhere; copy the first window's pattern:
            # one type id per sequence, and the k-th special token keeps the k-th special token's type id
            per_sequence, specials = {}, []
            for sequence, type_id in zip(first.sequence_ids, first.type_ids):
                if sequence is None:
                    specials.append(type_id)
                else:
                    per_sequence[sequence] = type_id
            for i, (window, _) in enumerate(windows[1:], start=1):
                special = iter(specials)
                windows[i] = (window, [next(special) if s is None else per_sequence[s] for s in window.sequence_ids])
        return windows

    @staticmethod
    def _context_offsets(window: Any, input_ids: np.ndarray, bounds: tuple[int, int] | None,
                         context_ids: np.ndarray, context_offsets: np.ndarray) -> np.ndarray:
        """(n, 2) character offsets of the window's n context tokens, sliced from the whole context's offsets."""
        if bounds is None:
            return np.zeros((0, 2), dtype=np.int32)
        first, last = bounds
        n = last - first + 1
        begin = int(np.searchsorted(context_offsets[:, 0], window.token_to_chars(first)[0], side="left"))
        window_ids = input_ids[first : last + 1]
        if begin + n <= len(context_ids) and np.array_equal(context_ids[begin : begin + n], window_ids):
            return context_offsets[begin : begin + n]
        return np.asarray(window.offsets[first : last + 1], dtype=np.int32).reshape(-1, 2)  # not a plain slice

    def __call__(self, examples: dict[str, list]) -> dict[str, list]:
        """Windows of one batch of example columns.

        Columns in: ``question``, ``context`` (or ``context_index``), ``answer_text`` / ``answer_start`` when
        labelled, ``id``, ``example_index``. Columns out: ``input_ids``, ``attention_mask``, (``token_type_ids``),
        ``length`` and the optional label / eval columns.
        """
        questions = self._questions(examples["question"])
        contexts: dict[str, Any] = {}
        if "context_index" in examples:
            if self.contexts is None:
                raise ValueError("columns with 'context_index' need the QAFeaturizer's contexts")
            context_texts = [self.contexts[i] for i in examples["context_index"]]
        else:
            context_texts = examples["context"]
        ids = examples.get("id") or [str(i) for i in range(len(questions))]
        features: dict[str, list] = {"input_ids": [], "attention_mask": [], "length": []}
        if self.with_token_type_ids:
            features["token_type_ids"] = []
        if self.with_labels:
            features["start_positions"], features["end_positions"] = [], []
        if self.with_eval_fields:
            features["offset_mapping"], features["example_id"], features["example_index"] = [], [], []
        for sample, (question, context_text) in enumerate(zip(questions, context_texts)):
            if context_text not in contexts:
                encoding = self.plain.encode(context_text, add_special_tokens=False)
                contexts[context_text] = (encoding, np.asarray(encoding.ids, dtype=np.int32),
                                          np.asarray(encoding.offsets, dtype=np.int32).reshape(-1, 2))
            context, context_ids, context_offsets = contexts[context_text]
            for window, type_ids in self._windows(question, context, ids[sample]):
                input_ids = np.asarray(window.ids, dtype=np.int32)
                features["input_ids"].append(input_ids)
                features["attention_mask"].append(np.ones_like(input_ids))
                features["length"].append(len(input_ids))
                if self.with_token_type_ids:
                    features["token_type_ids"].append(np.asarray(type_ids, dtype=np.int32))
                bounds = context_bounds(window.sequence_ids)
                offsets = self._context_offsets(window, input_ids, bounds, context_ids, context_offsets)
                if self.with_labels:
                    texts, answer_starts = examples["answer_text"][sample], examples["answer_start"][sample]
                    span = (0, 0)
                    if texts and bounds is not None:
                        span = _span(offsets, answer_starts[0], answer_starts[0] + len(texts[0]), bounds[0])
                    features["start_positions"].append(span[0])
                    features["end_positions"].append(span[1])
                if self.with_eval_fields:
                    offset_mapping = np.full((len(input_ids), 2), -1, dtype=np.int32)
                    if bounds is not None:
                        offset_mapping[bounds[0] : bounds[1] + 1] = offsets
                    features["offset_mapping"].append(offset_mapping)
                    features["example_id"].append(ids[sample])
                    features["example_index"].append(examples["example_index"][sample])
        return features


def prepare_qa_features(
    examples: dict[str, list],
    tokenizer: Any,
    *,
    max_length: int,
    doc_stride: int,
    max_question_length: int,
    with_labels: bool = True,
    with_eval_fields: bool = False,
) -> dict[str, list]:
    """Windows and labels for one batch of example columns (see ``QAFeaturizer``; this builds one per call)."""
    return QAFeaturizer(tokenizer, max_length=max_length, doc_stride=doc_stride,
                        max_question_length=max_question_length, with_labels=with_labels,
                        with_eval_fields=with_eval_fields)(examples)


def examples_to_columns(examples: Sequence[dict], *, with_labels: bool) -> dict[str, list]:
    """Flat examples -> the columns ``prepare_qa_features`` reads (``example_index`` = position in ``examples``)."""
    columns: dict[str, list] = {
        "id": [e["id"] for e in examples],
        "example_index": list(range(len(examples))),
        "question": [e["question"] for e in examples],
        "context": [e["context"] for e in examples],
    }
    if with_labels:
        columns["answer_text"] = [list(e["answers"]["text"]) for e in examples]
        columns["answer_start"] = [list(e["answers"]["answer_start"]) for e in examples]
    return columns


def examples_to_indexed_columns(examples: Sequence[dict], *, with_labels: bool) -> tuple[dict[str, list], list[str]]:
    """Like ``examples_to_columns`` but with ``context_index`` into the returned list of distinct contexts."""
    index: dict[str, int] = {}
    for example in examples:
        index.setdefault(example["context"], len(index))
    columns = examples_to_columns(examples, with_labels=with_labels)
    columns["context_index"] = [index[c] for c in columns.pop("context")]
    return columns, list(index)
