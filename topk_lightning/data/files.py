"""Reading local data files: CSV, JSON, JSON lines and parquet, into plain Python values (no validation).

Task data modules turn what these return into examples: ``QADataModule`` through `topk_lightning.data.squad`,
``ClassificationDataModule`` row by row. Every error names the file (and the line, for JSON) and is an
`~topk_lightning.errors.InputError`, so the command line reports it in one line.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from topk_lightning.errors import InputError, MissingFileError

__all__ = ["SUFFIXES", "read_file", "records_of", "read_records"]

SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")


def read_file(path: str | Path) -> Any:
    """The content of a data file: a list of row dicts for CSV, JSON lines and parquet, the parsed value for JSON.

    A ``.json`` file that holds one JSON object per line is read as JSON lines.

    Raises:
        MissingFileError: no file at ``path``.
        InputError: an unknown extension or malformed content (the message names the file, and the line for JSON).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingFileError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise InputError(f"{path}: unsupported file type {suffix!r} (expected one of {', '.join(SUFFIXES)})")
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except Exception as error:  # pyarrow raises several types for a broken file
            raise InputError(f"{path}: cannot read parquet: {error}") from None
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise InputError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    if suffix == ".csv":
        try:
            return list(csv.DictReader(text.splitlines()))
        except csv.Error as error:
            raise InputError(f"{path}: malformed CSV: {error}") from None
    if suffix == ".jsonl":
        return _json_lines(path, text)
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        lines = [line for line in text.splitlines() if line.strip()]
        if len(lines) > 1 and lines[0].lstrip().startswith("{") and lines[0].rstrip().endswith("}"):
            return _json_lines(path, text)  # JSON lines saved as .json
        raise InputError(f"{path}: malformed JSON: {error.msg} at line {error.lineno} column {error.colno}") from None


def records_of(data: Any, *, source: str | Path) -> list:
    """The records of what `read_file` returned: a list as it is, or the list under ``{"data": [...]}``."""
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        return data["data"]
    if isinstance(data, list):
        return data
    raise InputError(f"{source}: expected a list of records or {{'data': [...]}}, got a {type(data).__name__}")


def read_records(path: str | Path) -> list:
    """``records_of(read_file(path))``: the rows of a CSV, JSON lines or parquet file, or of a JSON list."""
    return records_of(read_file(path), source=Path(path).expanduser())


def _json_lines(path: Path, text: str) -> list:
    records = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise InputError(f"{path}: malformed JSON on line {line_number}: {error.msg} (column {error.colno})") from None
    return records
