"""Answers from a question-answering model in plain Python: questions over contexts of any length.

transformers v5 has no question-answering pipeline. :func:`answer_questions` does for a model in memory what
``lightning predict`` does for a checkpoint: it cuts each context into overlapping windows (the data module's
`~topk_lightning.data.qa_features.QAFeaturizer`), runs the model on them, and decodes the best span over all windows
(`~topk_lightning.modules.qa_decoding`), so a 10,000-token context needs no more than the model's window length::

    from transformers import AutoModelForQuestionAnswering, AutoTokenizer
    import topk_lightning
    from topk_lightning.inference import answer_questions

    model = AutoModelForQuestionAnswering.from_pretrained("outputs/qa/export", attn_implementation="topk")
    tokenizer = AutoTokenizer.from_pretrained("outputs/qa/export")
    answer_questions(model, tokenizer, ["Who is the keeper of the north vault?"], [long_text])   # -> ["..."]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from topk_lightning.data.base import PaddingCollator
from topk_lightning.data.qa_features import QAFeaturizer, examples_to_columns
from topk_lightning.errors import InputError
from topk_lightning.modules.qa_decoding import aggregate_predictions, batch_feature_results

__all__ = ["answer_questions"]

_NO_LIMIT = 1_000_000  # tokenizers without a known length say int(1e30)


@torch.inference_mode()
def answer_questions(
    model: Any,
    tokenizer: Any,
    questions: Sequence[str],
    contexts: Sequence[str],
    *,
    max_length: int | None = None,
    doc_stride: int = 128,
    max_question_length: int = 64,
    n_best_size: int = 20,
    max_answer_length: int = 30,
    version_2_with_negative: bool = False,
    null_score_threshold: float = 0.0,
    batch_size: int = 4,
) -> list[str]:
    """The answer text to each question over its context (``""`` for no answer, SQuAD v2 style).

    Args:
        model: a question-answering model whose output has ``start_logits`` and ``end_logits`` (B, T), e.g.
            ``AutoModelForQuestionAnswering`` loaded from an ``--export_dir``; it runs in eval mode, on its device.
        tokenizer: the model's fast tokenizer (saved beside the export).
        questions, contexts: one context per question, of any length.
        max_length: tokens per window; ``None`` = ``tokenizer.model_max_length`` (an export sets it to the model's
            positions). Use the value the model was trained with (the recipe's ``data.max_length``).
        doc_stride, max_question_length: as the data module's options of the same names.
        n_best_size, max_answer_length, version_2_with_negative, null_score_threshold: as `ExtractiveQAModule`'s.
        batch_size: windows per forward pass.

    Raises:
        InputError: questions and contexts differ in number, or no window length is known.
    """
    if len(questions) != len(contexts):
        raise InputError(f"answer_questions: {len(questions)} questions but {len(contexts)} contexts")
    if max_length is None:
        max_length = tokenizer.model_max_length
        if max_length is None or max_length >= _NO_LIMIT:
            raise InputError("answer_questions: the tokenizer has no model_max_length; pass max_length")
    examples = [{"id": str(i), "question": q, "context": c} for i, (q, c) in enumerate(zip(questions, contexts))]
    featurize = QAFeaturizer(tokenizer, max_length=max_length, doc_stride=doc_stride,
                             max_question_length=max_question_length, with_labels=False, with_eval_fields=True)
    features = featurize(examples_to_columns(examples, with_labels=False))
    windows = [{key: values[i] for key, values in features.items()} for i in range(len(features["input_ids"]))]
    for window in windows:
        window["context"] = contexts[window["example_index"]]
    collate = PaddingCollator(tokenizer.pad_token_id or 0)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    results = []
    try:
        for begin in range(0, len(windows), batch_size):
            batch = collate(windows[begin : begin + batch_size])
            inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
            output = model(**inputs)
            results += batch_feature_results(output.start_logits, output.end_logits, batch, n_best_size=n_best_size,
                                             max_answer_length=max_answer_length)
    finally:
        model.train(was_training)
    predictions = aggregate_predictions(results, version_2_with_negative=version_2_with_negative,
                                        null_score_threshold=null_score_threshold)
    return [predictions[example["id"]] for example in examples]
