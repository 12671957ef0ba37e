"""``ClassificationDataModule``: sequence (or sequence-pair) classification from local CSV/JSON/JSONL/parquet files.

Batches: ``input_ids``, ``attention_mask``, ``token_type_ids`` (when the tokenizer makes them) LongTensor (B, T),
``position_ids`` (B, T) with ``passage_separator``, and ``labels`` LongTensor (B,) (absent in predict batches when
the predict file has no label column).
"""

from __future__ import annotations

import logging
from functools import cached_property
from pathlib import Path
from typing import Any

from topk_lightning.data.base import BaseDataModule, FeatureDataset, feature_cache_key, map_with_cache, \
    tokenizer_fingerprint
from topk_lightning.data.files import read_records
from topk_lightning.data.passages import passage_position_ids
from topk_lightning.errors import InputError

log = logging.getLogger(__name__)

_FEATURE_VERSION = 1


def _int_like(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, str) and value.strip().lstrip("-").isdigit()


def infer_label_names(values: list[Any]) -> list[str]:
    """Label names from the raw labels of a file: ``"0".."max"`` when all are integers, else the sorted strings."""
    if not values:
        raise InputError("cannot infer label names: the file has no labels")
    if all(_int_like(v) for v in values):
        top = max(int(v) for v in values)
        return [str(i) for i in range(top + 1)]
    return sorted({str(v).strip() for v in values})


class ClassificationDataModule(BaseDataModule):
    """Text (or text-pair) classification from local files.

    Labels: with ``label_names`` a label is matched against those names (or taken as an index when it is an
    integer in range); without them names are inferred from the training file (``"0".."N-1"`` when every label is
    an integer, else the sorted distinct strings). ``num_labels`` and ``label_names`` are available right after
    construction (they read only the label column), so a CLI can link them to the model.

    Args:
        text_column: column with the text.
        text_pair_column: optional second text column (sentence pairs); ``None`` = single texts.
        label_column: column with the label (string or integer).
        label_names: the label vocabulary, index = class id; ``None`` = inferred from the training file.
        max_length: texts are truncated to this many tokens (special tokens included; pairs longest-first).
        batch_size: training batch size.
        passage_separator: read the second text as passages joined by this string (e.g. a blank line,
            ``"\\n\\n"``) and give every passage position ids that start again after the first text, as if it
            were the only passage (``topk_lightning.data.passages``): for a question over many passages with a
            model trained on one. Needs ``text_pair_column`` and a fast tokenizer with ``token_type_ids`` (BERT,
            MiniLM, ELECTRA; not RoBERTa). ``None`` (default): the model numbers tokens 0, 1, 2, ...
        **kwargs: the options shared with the other data modules (``tokenizer``, ``train_file``,
            ``validation_file``, ``test_file``, ``predict_file``, ``eval_batch_size``, ``skip_invalid``,
            ``limit_train_examples``, ``limit_eval_examples``, ...): see `BaseDataModule`. Files are ``.csv``,
            ``.json`` (list of records or ``{"data": [...]}``), ``.jsonl`` or ``.parquet``; invalid rows are those
            with a missing/empty text or an unknown label; a limit counts rows.
    """

    def __init__(
        self,
        *,
        text_column: str = "text",
        text_pair_column: str | None = None,
        label_column: str = "label",
        label_names: list[str] | None = None,
        max_length: int = 512,
        batch_size: int = 16,
        passage_separator: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__(batch_size=batch_size, **kwargs)
        if max_length < 2:
            raise InputError(f"max_length must be >= 2, got {max_length}")
        if label_names is not None and len(set(label_names)) != len(label_names):
            raise InputError(f"label_names must be distinct, got {label_names}")
        self.text_column = text_column
        self.text_pair_column = text_pair_column
        self.label_column = label_column
        self._label_names = list(label_names) if label_names is not None else None
        self.max_length = max_length
        if passage_separator is not None and (not text_pair_column or not isinstance(passage_separator, str)
                                              or not passage_separator):
            raise InputError(f"passage_separator={passage_separator!r} needs text_pair_column (the passages are the "
                             "second text) and a non-empty string")
        self.passage_separator = passage_separator

    @cached_property
    def label_names(self) -> list[str]:
        """Class names, index = class id."""
        if self._label_names is not None:
            return self._label_names
        path = self.file("train") or self.file("validation")
        if path is None:
            raise InputError("label_names must be given when there is no train_file or validation_file to infer them")
        values = [r.get(self.label_column) for r in read_records(path) if isinstance(r, dict)]
        return infer_label_names([v for v in values if v is not None and str(v).strip() != ""])

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def label_id(self, value: Any) -> int:
        """Class id of a raw label; raises ``KeyError`` for an unknown one."""
        names = self.label_names
        text = str(value).strip()
        if text in self._name_to_id:
            return self._name_to_id[text]
        if _int_like(value) and 0 <= int(value) < len(names):
            return int(value)
        raise KeyError(text)

    @cached_property
    def _name_to_id(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.label_names)}

    def load_rows(self, split: str) -> tuple[dict[str, list], bool] | None:
        """Validated columns ``text`` (, ``text_pair``), (``labels``) of ``split`` and whether it has labels."""
        path = self.file(split)
        if path is None:
            return None
        records = read_records(path)
        with_labels = split != "predict" or all(
            isinstance(r, dict) and r.get(self.label_column) not in (None, "") for r in records
        )
        columns: dict[str, list] = {"text": [], "text_pair": [], "labels": []}
        skipped, first_error = 0, None
        for position, record in enumerate(records):
            try:
                row = self._validate_row(record, position, path, with_labels)
            except InputError as error:
                if not self.skip_invalid:
                    raise
                skipped, first_error = skipped + 1, first_error or str(error)
                continue
            for key, value in row.items():
                columns[key].append(value)
        self.skipped[split] = skipped
        if skipped:
            log.warning("skipped %d invalid row(s) of %d in %s; first: %s", skipped, len(records), path, first_error)
        if not self.text_pair_column:
            del columns["text_pair"]
        if not with_labels:
            del columns["labels"]
        columns = {key: self.limit(values, split) for key, values in columns.items()}
        if not columns["text"]:
            raise InputError(f"{path}: no usable rows for the {split} split")
        return columns, with_labels

    def _validate_row(self, record: Any, position: int, path: Path, with_labels: bool) -> dict[str, Any]:
        where = f"{path}: row {position}"
        if isinstance(record, dict) and record.get("id") not in (None, ""):
            where += f" (id {record['id']!r})"
        if not isinstance(record, dict):
            raise InputError(f"{where}: expected an object with column {self.text_column!r}")
        row: dict[str, Any] = {}
        columns = [("text", self.text_column)]
        if self.text_pair_column:
            columns.append(("text_pair", self.text_pair_column))
        for key, column in columns:
            value = record.get(column)
            if not isinstance(value, str) or not value.strip():
                problem = "missing" if value is None else f"empty or not a string ({value!r})"
                raise InputError(f"{where}: column {column!r} is {problem}; expected a non-empty string")
            row[key] = value
        if with_labels:
            value = record.get(self.label_column)
            if value is None or str(value).strip() == "":
                raise InputError(f"{where}: missing label column {self.label_column!r}")
            try:
                row["labels"] = self.label_id(value)
            except KeyError:
                raise InputError(
                    f"{where}: unknown label {value!r}; expected one of {self.label_names} or an index below "
                    f"{self.num_labels}"
                ) from None
        return row

    def build_split(self, split: str) -> FeatureDataset | None:
        loaded = self.load_rows(split)
        if loaded is None:
            return None
        columns, with_labels = loaded
        tokenizer, max_length, separator = self.tokenizer, self.max_length, self.passage_separator
        if separator is not None and not (getattr(tokenizer, "is_fast", False)
                                          and "token_type_ids" in tokenizer.model_input_names):
            raise InputError(f"passage_separator needs a fast tokenizer that makes token_type_ids (character offsets, "
                             f"and where the second text starts); {type(tokenizer).__name__} is not one")

        def tokenize(batch: dict) -> dict:
            args = (batch["text"], batch["text_pair"]) if "text_pair" in batch else (batch["text"],)
            encoded = tokenizer(*args, truncation=True, max_length=max_length, padding=False,
                                return_offsets_mapping=separator is not None)
            features = {key: list(value) for key, value in encoded.items() if key != "offset_mapping"}
            if separator is not None:
                features["position_ids"] = [
                    passage_position_ids(passages, types, offsets, separator=separator)
                    for passages, types, offsets in zip(batch["text_pair"], encoded["token_type_ids"],
                                                        encoded["offset_mapping"])]
            features["length"] = [len(ids) for ids in encoded["input_ids"]]
            if "labels" in batch:
                features["labels"] = list(batch["labels"])
            return features

        passages = {} if separator is None else {"passage_separator": separator}  # older caches stay valid
        key = feature_cache_key(columns=columns, tokenizer=tokenizer_fingerprint(tokenizer), max_length=max_length,
                                version=_FEATURE_VERSION, **passages)
        features = map_with_cache(columns, tokenize, desc=f"tokenizing {split}",
                                  cache_file=self.cache_dir / "features" / f"cls-{split}-{key}.arrow")
        log.info("%s: %d rows (labels: %s)", split, len(features), with_labels)
        return FeatureDataset(features)
