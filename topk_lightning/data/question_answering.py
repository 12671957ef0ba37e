"""``QADataModule``: extractive question answering over long documents (SQuAD files or the built-in ``needle``).

Batches follow docs/CONTRACTS.md ("QA batches"): ``input_ids``, ``attention_mask``, ``token_type_ids`` (when the
tokenizer makes them), ``start_positions`` / ``end_positions``; validation, test and predict batches add
``example_id``, ``offset_mapping`` (context tokens only, ``(-1, -1)`` elsewhere), ``context`` and ``answers``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from topk_lightning.data.base import BaseDataModule, FeatureDataset, feature_cache_key, map_with_cache, \
    tokenizer_fingerprint
from topk_lightning.data.needle import needle_file
from topk_lightning.data.qa_features import QAFeaturizer, examples_to_indexed_columns
from topk_lightning.data.squad import join_paragraphs as join_article_paragraphs
from topk_lightning.data.squad import load_qa_examples
from topk_lightning.errors import InputError

log = logging.getLogger(__name__)

_FEATURE_VERSION = 1  # bump when prepare_qa_features changes what it writes
_NEEDLE_SPLITS = {"train": "train", "validation": "validation", "test": "test", "predict": "test"}


class QADataModule(BaseDataModule):
    """Sliding-window extractive QA features from local SQuAD-style files or a built-in dataset.

    Files (``train_file`` etc.) take precedence over ``dataset``: when any file is given the built-in dataset is
    ignored (logged), so a recipe that names ``dataset: needle`` runs unchanged on a user's files. A split without
    data gets no dataloader (Lightning skips validation when ``validation_file`` is missing).

    File formats: nested SQuAD v1.1/v2.0 JSON, flat JSON/JSONL records (``id``, ``question``, ``context``,
    ``answers: {text: [...], answer_start: [...]}``) or parquet with those columns (see ``topk_lightning.data.squad``).
    Predict files may omit ``answers``; their batches then have no ``start_positions`` / ``end_positions`` and
    ``answers`` is ``[]`` for every example.

    Args:
        dataset: built-in dataset used when no file is given: ``"needle"`` (see ``topk_lightning.data.needle``).
        max_length: tokens per window including special tokens (tens of thousands are fine).
        doc_stride: tokens shared by neighbouring windows of one context; must be smaller than
            ``max_length - max_question_length - 4``.
        max_question_length: questions are cut to this many tokens.
        batch_size: training batch size (windows per step).
        join_paragraphs: one example per (article, question) whose context is the article's paragraphs joined by
            ``paragraph_separator`` (turns SQuAD into a long-document task; answer offsets are shifted).
        paragraph_separator: text between joined paragraphs.
        needle_train_examples / needle_eval_examples: documents in the needle train / validation and test splits.
        needle_document_words: approximate filler words per needle training document (about 1.2 word-pieces per
            word; the facts come on top).
        needle_eval_document_words: the same for the validation and test documents; ``None`` = as training. Short
            training documents teach the task in fewer CPU seconds; long evaluation documents test it at length.
        needle_distractors: facts of the same form as the answer about other entities, per document.
        needle_mentions: filler sentences naming each entity without stating its fact, per entity and document.
        needle_unanswerable_fraction: share of needle questions with no answer in the document (0 = none).
        needle_seed: seed of the needle generator (train, validation and test use different streams of it).
        **kwargs: the options shared with the other data modules (``tokenizer``, ``train_file``,
            ``validation_file``, ``test_file``, ``predict_file``, ``eval_batch_size``, ``skip_invalid``,
            ``limit_train_examples``, ``limit_eval_examples``, ...): see `BaseDataModule`. A limit counts questions.
    """

    def __init__(
        self,
        *,
        dataset: Literal["needle"] | None = None,
        max_length: int = 4096,
        doc_stride: int = 128,
        max_question_length: int = 64,
        batch_size: int = 4,
        join_paragraphs: bool = False,
        paragraph_separator: str = "\n\n",
        needle_train_examples: int = 2000,
        needle_eval_examples: int = 200,
        needle_document_words: int = 2000,
        needle_eval_document_words: int | None = None,
        needle_distractors: int = 8,
        needle_mentions: int = 1,
        needle_unanswerable_fraction: float = 0.0,
        needle_seed: int = 0,
        **kwargs,
    ) -> None:
        super().__init__(batch_size=batch_size, **kwargs)
        if dataset is not None and dataset not in _BUILTIN:
            raise InputError(f"unknown built-in dataset {dataset!r}; available: {sorted(_BUILTIN)}")
        if max_question_length < 1 or doc_stride < 0:
            raise InputError("max_question_length must be >= 1 and doc_stride >= 0")
        if doc_stride >= max_length - max_question_length - 4:
            raise InputError(
                f"doc_stride ({doc_stride}) must be smaller than max_length - max_question_length - 4 "
                f"({max_length} - {max_question_length} - 4), the context room of the smallest window"
            )
        self.dataset = dataset
        if dataset is not None and any(self.files.values()):
            log.info("data files were given, so the built-in dataset %r is ignored", dataset)
            self.dataset = None
        self.max_length = max_length
        self.doc_stride = doc_stride
        self.max_question_length = max_question_length
        self.join_paragraphs = join_paragraphs
        self.paragraph_separator = paragraph_separator
        self.needle = dict(num_distractors=needle_distractors, mentions=needle_mentions,
                           unanswerable_fraction=needle_unanswerable_fraction, seed=needle_seed)
        eval_words = needle_document_words if needle_eval_document_words is None else needle_eval_document_words
        self.needle_words = {"train": needle_document_words, "validation": eval_words, "test": eval_words}
        self.needle_counts = {"train": needle_train_examples, "validation": needle_eval_examples,
                              "test": needle_eval_examples}

    def source_file(self, split: str) -> Path | None:
        """The file that feeds ``split`` (generating the built-in dataset's file on first use), or ``None``."""
        if any(self.files.values()):
            return self.file(split)
        if self.dataset == "needle":
            needle_split = _NEEDLE_SPLITS[split]
            return needle_file(self.cache_dir, split=needle_split, num_examples=self.needle_counts[needle_split],
                               document_words=self.needle_words[needle_split], **self.needle)
        return None

    def prepare_data(self) -> None:
        if self.dataset == "needle":
            for split in ("train", "validation", "test"):
                self.source_file(split)

    def load_examples(self, split: str) -> list[dict] | None:
        """Validated flat examples of ``split`` after ``join_paragraphs`` and the example limit; ``None`` if none."""
        path = self.source_file(split)
        if path is None:
            return None
        examples, self.skipped[split] = load_qa_examples(path, require_answers=split != "predict",
                                                         skip_invalid=self.skip_invalid)
        if self.join_paragraphs:
            examples = join_article_paragraphs(examples, separator=self.paragraph_separator)
        examples = self.limit(examples, split)
        if not examples:
            raise InputError(f"{path}: no usable examples for the {split} split")
        return examples

    def build_split(self, split: str) -> FeatureDataset | None:
        examples = self.load_examples(split)
        if examples is None:
            return None
        with_labels = all(e["answers"] is not None for e in examples)
        with_eval_fields = split != "train"
        params = dict(max_length=self.max_length, doc_stride=self.doc_stride,
                      max_question_length=self.max_question_length, with_labels=with_labels,
                      with_eval_fields=with_eval_fields)
        columns, contexts = examples_to_indexed_columns(examples, with_labels=with_labels)
        key = feature_cache_key(columns=columns, contexts=contexts, tokenizer=tokenizer_fingerprint(self.tokenizer),
                                params=params, version=_FEATURE_VERSION)
        features = map_with_cache(columns, QAFeaturizer(self.tokenizer, contexts=contexts, **params),
                                  cache_file=self.cache_dir / "features" / f"qa-{split}-{key}.arrow",
                                  desc=f"tokenizing {split}")
        log.info("%s: %d examples -> %d windows of <= %d tokens", split, len(examples), len(features),
                 self.max_length)
        if not with_eval_fields:
            return FeatureDataset(features)
        answers = [list(e["answers"]["text"]) if e["answers"] is not None else [] for e in examples]
        return FeatureDataset(features, {"context": [e["context"] for e in examples], "answers": answers})


_BUILTIN = {"needle"}
