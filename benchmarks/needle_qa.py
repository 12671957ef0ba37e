"""The main job's figures: val F1 of ``recipes/qa.yaml`` with top-k and dense attention, the guessing level and the
question-swap control.

For each attention (``topk`` as shipped, ``sdpa`` with ``--model.attention=sdpa``) it runs
``lightning fit --config recipes/qa.yaml`` in its own process (wall time and peak memory measured), then scores the
kept checkpoint on:

- ``eval``: the validation documents of the recipe (long ones; its first ``needle_eval_examples`` are the ones
  ``lightning fit`` validated on), and more of them (``--eval-examples``);
- ``control``: the same documents, each asked another document's question (``needle.swap_questions``: same form,
  an entity with no fact in this document), scored against the document's own answer. A model that reads the
  question falls to the guessing level here; one that found a shortcut in the document alone would not;
- ``guess``: the expected F1 of picking one of the document's same-form facts at random (computed from the
  generator's records with the SQuAD F1; ``100 / facts`` since values share no word). The control runs for
  ``--control`` attentions (default: top-k, the shipped one).

    python benchmarks/needle_qa.py                                   # both attentions, ~20 min on 2 CPU cores
    python benchmarks/needle_qa.py --attention topk --ckpt BEST.ckpt # score an existing checkpoint only
    python benchmarks/needle_qa.py --attention sdpa --ckpt DENSE.ckpt --control --eval-topk 16 64  # zero-shot swap
    python benchmarks/needle_qa.py --json benchmarks/results/needle_qa.json

Extra recipe flags go after ``--``: ``python benchmarks/needle_qa.py -- --trainer.max_steps=200``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "qa.yaml"


def train(attention: str, workdir: Path, extra: list[str]) -> tuple[Path, float, float]:
    """``lightning fit --config recipes/qa.yaml`` in ``workdir``; returns (best checkpoint, wall s, peak RSS GiB)."""
    command = [sys.executable, "-m", "topk_lightning.cli", "fit", "--config", str(RECIPE),
               f"--model.attention={attention}", *extra]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    start = time.monotonic()
    process = subprocess.Popen(command, cwd=workdir, env=env)
    _, status, usage = os.wait4(process.pid, 0)  # this child's own peak (RUSAGE_CHILDREN would mix the runs)
    wall = time.monotonic() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise subprocess.CalledProcessError(process.returncode, command)
    peak = usage.ru_maxrss / 2**20  # KiB -> GiB
    # the recipe's best-F1 checkpoint (last.ckpt beside it holds the state after the last step)
    checkpoints = sorted(workdir.glob("outputs/qa/csv/version_*/checkpoints/best-*.ckpt"),
                         key=lambda p: p.stat().st_mtime)
    if not checkpoints:
        raise RuntimeError(f"no checkpoint under {workdir}/outputs/qa after training with {attention}")
    return checkpoints[-1], wall, peak


def guess_f1(data: dict) -> float:
    """Expected SQuAD F1 (%) of answering with one of the document's same-form facts chosen uniformly."""
    from topk_lightning.modules.metrics import f1_score

    scores = []
    for article in data["data"]:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                gold = qa["answers"][0]["text"]
                values = list(qa["needle"]["facts"].values())
                scores.append(sum(f1_score(v, gold) for v in values) / len(values))
    return 100 * sum(scores) / len(scores)


def score(checkpoint: Path, files: dict[str, Path], datamodule_args: dict,
          eval_topk: tuple[int, ...] = ()) -> dict[str, float]:
    """val F1 / EM of the checkpoint on each file (the recipe's windows and decoding), then on the ``eval`` file with
    top-k attention at each of ``eval_topk`` in place of the checkpoint's attention (no retraining)."""
    import dataclasses

    import lightning.pytorch as pl

    from topk_lightning import TopKConfig, apply_topk, remove_topk
    from topk_lightning.data import QADataModule
    from topk_lightning.modules import ExtractiveQAModule

    model = ExtractiveQAModule.load_from_checkpoint(checkpoint, map_location="cpu")

    def validate(path: Path) -> dict[str, float]:
        data = QADataModule(validation_file=str(path), **datamodule_args)
        trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
        (metrics,) = trainer.validate(model, datamodule=data, verbose=False)
        return metrics

    out = {}
    for name, path in files.items():
        metrics = validate(path)
        out[f"{name}_f1"], out[f"{name}_em"] = metrics["val/f1"], metrics["val/em"]
    base = dataclasses.replace(model.topk_config, topk=64) if model.topk_config.topk is None else model.topk_config
    for k in eval_topk:
        remove_topk(model.backbone)
        apply_topk(model.backbone, dataclasses.replace(base, topk=k))
        metrics = validate(files["eval"])
        out[f"eval_topk{k}_f1"], out[f"eval_topk{k}_em"] = metrics["val/f1"], metrics["val/em"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attention", nargs="+", default=["topk", "sdpa"], choices=["topk", "sdpa", "eager"])
    parser.add_argument("--ckpt", type=Path, default=None, help="score this checkpoint instead of training")
    parser.add_argument("--eval-examples", type=int, default=128,
                        help="validation documents for eval and control (the binomial spread of a 1-in-7 guess on "
                             "128 questions is 3.1 points)")
    parser.add_argument("--control", nargs="*", default=["topk"], help="attentions whose checkpoint also gets the "
                        "question-swap control (each costs another pass over the documents)")
    parser.add_argument("--eval-topk", type=int, nargs="*", default=[], metavar="K",
                        help="also score each checkpoint on the eval documents with top-k attention at these k, "
                        "without retraining (for the dense model: the zero-shot swap)")
    parser.add_argument("--workdir", type=Path, default=None, help="where the runs write outputs/qa (default: temp)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("recipe_flags", nargs="*", help="after --: extra flags for lightning fit")
    args = parser.parse_args(argv)
    if args.ckpt is not None and len(args.attention) != 1:
        parser.error("--ckpt scores one checkpoint: give one --attention")

    import torch

    from topk_lightning.data.needle import generate_needle_squad, swap_questions

    rows = []
    for attention in args.attention:
        workdir = args.workdir or Path(tempfile.mkdtemp(prefix=f"needle-qa-{attention}-"))
        workdir.mkdir(parents=True, exist_ok=True)
        row = {"attention": attention}
        if args.ckpt is None:
            (workdir / attention).mkdir(parents=True, exist_ok=True)
            checkpoint, row["fit_wall_s"], row["fit_peak_rss_gib"] = train(attention, workdir / attention,
                                                                          args.recipe_flags)
        else:
            checkpoint = args.ckpt
        hparams = torch.load(checkpoint, map_location="cpu", weights_only=False)["datamodule_hyper_parameters"]
        # the same documents the recipe validates on (its first needle_eval_examples), and more of them
        data = generate_needle_squad(num_examples=args.eval_examples, split="validation",
                                     document_words=hparams["needle_eval_document_words"] or
                                     hparams["needle_document_words"],
                                     num_distractors=hparams["needle_distractors"],
                                     mentions=hparams.get("needle_mentions", 1), seed=hparams["needle_seed"])
        files = {"eval": workdir / "needle-eval.json"}
        files["eval"].write_text(json.dumps(data))
        if attention in args.control:
            files["control"] = workdir / "needle-control.json"
            files["control"].write_text(json.dumps(swap_questions(data)))
        datamodule_args = {k: hparams[k] for k in ("max_length", "doc_stride", "max_question_length",
                                                   "pad_to_multiple_of", "tokenizer")}
        datamodule_args.update(eval_batch_size=hparams["eval_batch_size"], batch_size=1,
                               cache_dir=str(workdir / "cache"))
        row.update(score(checkpoint, files, datamodule_args, tuple(args.eval_topk)))
        row.update(guess_f1=guess_f1(data), questions=args.eval_examples, facts=hparams["needle_distractors"] + 1,
                   checkpoint=str(checkpoint))
        rows.append(row)
        print(json.dumps(row), flush=True)

    print(f"\nrecipes/qa.yaml, {args.eval_examples} validation documents; machine {platform.machine()} "
          f"{os.cpu_count()} cpus, torch {torch.__version__}\n")
    print("| attention | fit wall | peak RSS | eval EM / F1 | control F1 (question swapped) | guessing F1 |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        wall = f"{row['fit_wall_s'] / 60:.1f} min" if "fit_wall_s" in row else "-"
        rss = f"{row['fit_peak_rss_gib']:.2f} GiB" if "fit_peak_rss_gib" in row else "-"
        control = f"{row['control_f1']:.1f}" if "control_f1" in row else "-"
        print(f"| {row['attention']} | {wall} | {rss} | {row['eval_em']:.1f} / {row['eval_f1']:.1f} | {control} | "
              f"{row['guess_f1']:.1f} |")
    if args.json is not None:
        from topk_lightning.atomic import atomic_output

        with atomic_output(args.json) as partial:
            record = {"date": datetime.date.today().isoformat(), "recipe": "recipes/qa.yaml",
                      "extra_flags": args.recipe_flags, "torch": torch.__version__,
                      "machine": f"{platform.machine()} {os.cpu_count()} cpus", "rows": rows}
            partial.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
