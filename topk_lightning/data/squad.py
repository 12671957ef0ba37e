"""Reading extractive-QA files into flat examples (pure functions; no Lightning, no tokenizer).

A *flat example* is one question over one context, in the Hugging Face ``squad`` / ``squad_v2`` layout::

    {"id": str, "title": str, "question": str, "context": str,
     "answers": {"text": [str, ...], "answer_start": [int, ...]}}   # empty lists = unanswerable

``answers`` is ``None`` only for predict files that carry no answers at all.

Accepted inputs (``load_qa_examples``):

- nested SQuAD JSON, v1.1 or v2.0: ``{"data": [{"title", "paragraphs": [{"context", "qas": [...]}]}]}``;
  ``is_impossible: true`` questions become unanswerable (``plausible_answers`` are ignored);
- flat JSON: a list of records, or ``{"data": [records]}``;
- JSON lines (``.jsonl``, or a ``.json`` file that holds one record per line);
- parquet (read with pyarrow, the engine under ``datasets``).

Files are read by `topk_lightning.data.files`; this module turns their records into checked examples.

Flat records have ``id``, ``question``, ``context`` and ``answers``, where ``answers`` is either
``{"text": [...], "answer_start": [...]}`` or a list of ``{"text", "answer_start"}`` objects.

Every example is checked (``validate_example``); the error names the file, the example id and what was expected.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from topk_lightning.data.files import read_file, records_of
from topk_lightning.errors import InputError

log = logging.getLogger(__name__)

Example = dict[str, Any]


class InvalidExampleError(InputError):
    """An example that breaks the format; the message names the file and the example id."""


def _describe(source: str, example_id: object, position: int) -> str:
    if isinstance(example_id, str) and example_id:
        return f"{source}: example id {example_id!r}"
    return f"{source}: example #{position} (no id)"


def normalize_answers(answers: Any, *, where: str) -> dict[str, list] | None:
    """Return ``{"text": [...], "answer_start": [...]}`` from either accepted answers layout.

    ``None`` stays ``None`` (no labels). Raises ``InvalidExampleError`` (mentioning ``where``) on any other shape.
    """
    if answers is None:
        return None
    if isinstance(answers, dict):
        texts, starts = answers.get("text"), answers.get("answer_start")
        if not isinstance(texts, list) or not isinstance(starts, list) or len(texts) != len(starts):
            raise InvalidExampleError(
                f"{where}: 'answers' must be {{'text': [...], 'answer_start': [...]}} with lists of equal length, "
                f"got {answers!r}"
            )
    elif isinstance(answers, list):
        texts, starts = [], []
        for answer in answers:
            if not isinstance(answer, dict) or "text" not in answer or "answer_start" not in answer:
                raise InvalidExampleError(
                    f"{where}: each answer must be an object with 'text' and 'answer_start', got {answer!r}"
                )
            texts.append(answer["text"])
            starts.append(answer["answer_start"])
    else:
        raise InvalidExampleError(f"{where}: 'answers' must be a dict or a list, got {type(answers).__name__}")
    for text, start in zip(texts, starts):
        if not isinstance(text, str) or isinstance(start, bool) or not isinstance(start, int):
            raise InvalidExampleError(
                f"{where}: answer text must be a string and answer_start an integer, got {text!r} / {start!r}"
            )
    return {"text": list(texts), "answer_start": list(starts)}


def validate_example(example: Example, *, source: str, position: int, require_answers: bool = True) -> Example:
    """Check one flat record and return it normalised; raise ``InvalidExampleError`` naming file and id.

    Checks: ``id`` is a non-empty string, ``question`` and ``context`` are non-empty strings, ``answers`` is present
    (unless ``require_answers`` is False) and every answer text is found at its ``answer_start`` in ``context``.
    """
    if not isinstance(example, dict):
        raise InvalidExampleError(f"{source}: example #{position} must be a JSON object, got {type(example).__name__}")
    example_id = example.get("id")
    where = _describe(source, example_id, position)
    if not isinstance(example_id, str) or not example_id:
        if isinstance(example_id, int) and not isinstance(example_id, bool):
            example_id = str(example_id)
        else:
            raise InvalidExampleError(f"{where}: missing field 'id' (expected a non-empty string)")
    for field in ("question", "context"):
        if field not in example:
            raise InvalidExampleError(f"{where}: missing field {field!r} (expected a non-empty string)")
        if not isinstance(example[field], str):
            raise InvalidExampleError(f"{where}: field {field!r} must be a string, got {type(example[field]).__name__}")
    if not example["context"].strip():
        raise InvalidExampleError(f"{where}: empty context")
    if not example["question"].strip():
        raise InvalidExampleError(f"{where}: empty question")
    if "answers" not in example or example["answers"] is None:
        if require_answers:
            raise InvalidExampleError(
                f"{where}: missing field 'answers' (expected {{'text': [...], 'answer_start': [...]}}; "
                "empty lists for an unanswerable question)"
            )
        answers = None
    else:
        answers = normalize_answers(example["answers"], where=where)
    context = example["context"]
    if answers is not None:
        for text, start in zip(answers["text"], answers["answer_start"]):
            found = context[start : start + len(text)] if 0 <= start <= len(context) else ""
            if not text or found != text:
                raise InvalidExampleError(
                    f"{where}: answer text {text!r} not found at answer_start={start} "
                    f"(the context there reads {found!r})"
                )
    return {
        "id": example_id,
        "title": str(example.get("title") or ""),
        "question": example["question"],
        "context": context,
        "answers": answers,
    }


def flatten_squad(data: dict, *, source: str) -> list[dict]:
    """Turn nested SQuAD (v1.1 or v2.0) into flat records (not yet validated).

    ``is_impossible: true`` gives empty answers. ``title`` is the article title (``article-<i>`` when missing).
    """
    records = []
    articles = data.get("data")
    if not isinstance(articles, list):
        raise InvalidExampleError(f"{source}: expected SQuAD JSON with a top-level 'data' list of articles")
    for a, article in enumerate(articles):
        if not isinstance(article, dict) or not isinstance(article.get("paragraphs"), list):
            raise InvalidExampleError(f"{source}: article #{a} has no 'paragraphs' list")
        title = article.get("title") or f"article-{a}"
        for p, paragraph in enumerate(article["paragraphs"]):
            if not isinstance(paragraph, dict) or not isinstance(paragraph.get("qas"), list):
                raise InvalidExampleError(f"{source}: article {title!r} paragraph #{p} has no 'qas' list")
            for qa in paragraph["qas"]:
                if not isinstance(qa, dict):
                    raise InvalidExampleError(
                        f"{source}: article {title!r} paragraph #{p}: a question is not an object"
                    )
                record = {"title": title, **{k: v for k, v in qa.items() if k in ("id", "question", "answers")}}
                if "context" in paragraph:
                    record["context"] = paragraph["context"]
                if qa.get("is_impossible"):
                    record["answers"] = {"text": [], "answer_start": []}
                records.append(record)
    return records


def _is_nested_squad(data: Any) -> bool:
    return (
        isinstance(data, dict)
        and isinstance(data.get("data"), list)
        and any(isinstance(a, dict) and "paragraphs" in a for a in data["data"])
    )


def read_qa_records(path: str | Path) -> list:
    """The raw records of a QA file (see the module docstring), nested SQuAD flattened; not yet validated."""
    if Path(path).suffix.lower() == ".csv":
        raise InputError(f"{path}: QA data must be JSON, JSONL or parquet, not CSV")
    data = read_file(path)
    if _is_nested_squad(data):
        return flatten_squad(data, source=str(path))
    return records_of(data, source=path)


def validate_examples(
    records: Iterable[dict], *, source: str, require_answers: bool = True, skip_invalid: bool = False
) -> tuple[list[Example], int]:
    """Validate records; return ``(examples, number_skipped)``.

    With ``skip_invalid`` bad records (and repeated ids) are dropped and counted, with one warning per file;
    otherwise the first one raises ``InvalidExampleError``.
    """
    examples, seen, skipped, first_error = [], set(), 0, None
    for position, record in enumerate(records):
        try:
            example = validate_example(record, source=source, position=position, require_answers=require_answers)
            if example["id"] in seen:
                raise InvalidExampleError(f"{source}: example id {example['id']!r}: duplicate id (ids must be unique)")
        except InvalidExampleError as error:
            if not skip_invalid:
                raise
            skipped += 1
            first_error = first_error or str(error)
            continue
        seen.add(example["id"])
        examples.append(example)
    if skipped:
        log.warning("skipped %d invalid example(s) of %d in %s; first: %s", skipped, position + 1, source, first_error)
    return examples, skipped


def load_qa_examples(
    path: str | Path, *, require_answers: bool = True, skip_invalid: bool = False
) -> tuple[list[Example], int]:
    """Read and validate one QA file; return ``(examples, number_skipped)``. See the module docstring for formats."""
    records = read_qa_records(path)
    return validate_examples(records, source=str(path), require_answers=require_answers, skip_invalid=skip_invalid)


def join_paragraphs(examples: Sequence[Example], *, separator: str = "\n\n") -> list[Example]:
    """One example per (article, question) whose context is the whole article.

    Examples are grouped by ``title``; an article's distinct contexts are concatenated in order of first appearance
    with ``separator`` between them, and every ``answer_start`` is shifted by its paragraph's offset in the joined
    text. Examples without a title each form their own article. Order of questions is kept.
    """
    paragraphs: dict[str, dict[str, int]] = {}  # title -> context -> offset
    lengths: dict[str, int] = {}
    for index, example in enumerate(examples):
        title = example.get("title") or f"__untitled_{index}"
        offsets = paragraphs.setdefault(title, {})
        if example["context"] not in offsets:
            position = lengths.get(title, -len(separator)) + len(separator)
            offsets[example["context"]] = position
            lengths[title] = position + len(example["context"])
    joined_contexts = {title: separator.join(offsets) for title, offsets in paragraphs.items()}
    joined = []
    for index, example in enumerate(examples):
        title = example.get("title") or f"__untitled_{index}"
        shift = paragraphs[title][example["context"]]
        answers = example["answers"]
        if answers is not None:
            answers = {"text": list(answers["text"]), "answer_start": [s + shift for s in answers["answer_start"]]}
        joined.append({**example, "title": example.get("title") or "", "context": joined_contexts[title],
                       "answers": answers})
    return joined
