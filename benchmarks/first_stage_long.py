"""Score a first-stage BoolQ model (exported by ``benchmarks/accuracy.py`` to its ``--models-dir``) on long-input
BoolQ before any long-input training, with SDPA and with top-k swapped in: does it bring anything to the second stage?

    python benchmarks/first_stage_long.py                                   # seed 0's model, first 400 long dev
    python benchmarks/first_stage_long.py --model outputs/boolq/sdpa-first_segment-export --n-eval 3270 --topk 16 64
    python benchmarks/first_stage_long.py --n-eval 1000 --topk 64 256 --out benchmarks/results/long_transfer.json
    python benchmarks/first_stage_long.py --max-length 1152 ...              # fewer distractors: 1,104-1,152 tokens
    python benchmarks/first_stage_long.py --max-length 320 --min-tokens 0 ... # no distractors (stage 1's inputs)
    python benchmarks/first_stage_long.py --position first ...               # own passage first: same distractors
    python benchmarks/first_stage_long.py --position-ids restart ...         # passages' positions restart

Uses accuracy.py's own loading, batching, pooling and scoring (``boolq_long_warm`` settings); prints one line per
attention (SDPA first, then top-k at each k). With ``--out``, each score is also added to a JSON list (records
``{model, attention, topk, metric, value, n_eval, majority, ...}``, written atomically); scores already there for the
same model, attention, k, n_eval, max_length, min_tokens, position and position ids are not run again.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accuracy  # noqa: E402  (benchmarks/accuracy.py; it puts the repository on sys.path)
from topk_lightning.data.long_boolq import POSITIONS  # noqa: E402

# A score is the same run as a recorded one when these fields agree (--out resumes on them).
SAME_RUN = ("model", "attention", "topk", "n_eval", "max_length", "min_tokens", "position", "position_ids")


def recorded(record: dict, field: str):
    """``record[field]``; for records written before ``position`` / ``position_ids`` existed, what they ran with."""
    if field == "position" and field not in record:
        return None if record.get("min_tokens") is None else "random"
    if field == "position_ids" and field not in record:
        return "count"
    return record.get(field)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    task = accuracy.TASKS["boolq_long_warm"]
    margin = task.max_length - task.min_tokens  # 2,048 - 2,000: the default gap between --min-tokens and --max-length
    parser.add_argument("--model", type=Path, default=accuracy.first_stage_dir(accuracy.DEFAULT_MODELS, task.start_from,
                                                                               task.pooling, 0))
    parser.add_argument("--data-dir", type=Path, default=accuracy.DEFAULT_DATA)
    parser.add_argument("--n-eval", type=int, default=400)
    parser.add_argument("--topk", type=int, nargs="*", default=[64])
    parser.add_argument("--max-length", type=int, default=task.max_length, help="tokens per input (default "
                        f"{task.max_length}; positions beyond the model's 512 are extended by copying)")
    parser.add_argument("--min-tokens", type=int, default=None, help="distractor passages are added until the "
                        f"input has this many tokens (default: --max-length - {margin}; 0: none, the question's "
                        "own passage alone, cut at --max-length as in the first stage)")
    parser.add_argument("--position", choices=POSITIONS, default="random",
                        help="where the question's own passage goes among the distractors (default: random, the "
                        "task; first / last keep the same distractors and measure what the position costs)")
    parser.add_argument("--position-ids", choices=accuracy.POSITION_IDS, default="count",
                        help="count (default: 0, 1, 2, ... through the table extended by copying, as the recipes "
                        f"do); clamp (tokens past {accuracy.PRETRAINED_POSITIONS} all at the table's last learned "
                        "row: no copied rows); restart (each passage's positions start again after the question, "
                        "as if it were the only passage)")
    parser.add_argument("--out", type=Path, default=None, help="add the scores to this JSON list (resumable)")
    args = parser.parse_args(argv)
    min_tokens = args.max_length - margin if args.min_tokens is None else args.min_tokens
    if args.max_length < 1 or not 0 <= min_tokens <= args.max_length:
        parser.error(f"need 0 <= --min-tokens <= --max-length, got {min_tokens} and {args.max_length}")
    task = dataclasses.replace(task, max_length=args.max_length, min_tokens=min_tokens or None)
    if args.position_ids != "count" and task.min_tokens is None:
        parser.error("--position-ids clamp / restart need distractors (--min-tokens > 0)")
    if not (args.model / "config.json").is_file():
        print(f"first_stage_long: no model at {args.model} (run benchmarks/accuracy.py --tasks boolq_long_warm "
              "first, or give --model)", file=sys.stderr)
        return 2
    from transformers import AutoTokenizer

    records = accuracy.load_records(args.out) if args.out else []
    tokenizer = AutoTokenizer.from_pretrained(str(args.model))
    try:
        dev = accuracy.load_split(task, args.data_dir, "dev", args.n_eval, tokenizer, position=args.position,
                                  position_ids=args.position_ids)
    except ValueError as error:  # a question whose own passage does not fit --max-length
        print(f"first_stage_long: {error} (raise --max-length)", file=sys.stderr)
        return 2
    batches = accuracy.loader(dev, batch_size=task.eval_batch_size, pad_id=tokenizer.pad_token_id or 0, task=task,
                              shuffle_seed=None)
    majority = accuracy.majority_percent(dev)
    where = "own passage only" if task.min_tokens is None else f"with distractors, own passage {args.position}" + (
        "" if args.position_ids == "count" else f", position ids {args.position_ids}")
    print(f"{len(dev)} dev questions ({where}, "
          f"{task.min_tokens or 0}-{task.max_length} tokens), majority {majority:.1f}%")
    accuracy.ENVIRONMENT.update(accuracy.describe_environment("cpu"))
    for attention, k in [("sdpa", None)] + [("topk", k) for k in args.topk]:
        name = "sdpa" if k is None else f"top-k k={k}"
        run = {"model": args.model.name, "attention": attention, "topk": k, "n_eval": len(dev),
               "max_length": task.max_length, "min_tokens": task.min_tokens,
               "position": args.position if task.min_tokens is not None else None,
               "position_ids": args.position_ids}
        what = f"{args.model.name} at {task.max_length} tokens" + (
            "" if run["position"] in (None, "random") else f", own passage {run['position']}") + (
            "" if args.position_ids == "count" else f", position ids {args.position_ids}")
        if any(all(recorded(r, field) == run[field] for field in SAME_RUN) for r in records):
            print(f"{what}, {name}: already in {args.out}", flush=True)
            continue
        module = accuracy.build_module(task, accuracy.Run(task, attention, k, 0), args.model)
        acc, f1, seconds = accuracy.evaluate(module, batches, device="cpu", deadline=float("inf"))
        print(f"{what}, {name}: accuracy {acc:.2f}  macro-F1 {f1:.2f}  "
              f"({seconds:.0f} s)", flush=True)
        if args.out:
            common = {**run, "task": task.name, "pooling": task.pooling, "majority": round(majority, 2),
                      "eval_seconds": round(seconds, 1),
                      "device": "cpu", "date": accuracy.datetime.date.today().isoformat(), **accuracy.ENVIRONMENT}
            records += [{**common, "metric": "accuracy", "value": round(acc, 3)},
                        {**common, "metric": "macro_f1", "value": round(f1, 3)}]
            accuracy.write_json_atomic(args.out, records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
