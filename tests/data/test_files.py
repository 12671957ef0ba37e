"""Generic data-file readers: every format, and errors that name the file (and line) and are InputErrors."""

import json

import pytest

from topk_lightning.data.files import read_file, read_records, records_of
from topk_lightning.errors import InputError, MissingFileError

ROWS = [{"text": "a cat", "label": "animal"}, {"text": "rates, up", "label": "finance"}]


def test_every_format_gives_the_same_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "rows.csv").write_text('text,label\na cat,animal\n"rates, up",finance\n')
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS) + "\n")
    (tmp_path / "lines.json").write_text("".join(json.dumps(r) + "\n" for r in ROWS))  # JSON lines named .json
    (tmp_path / "list.json").write_text(json.dumps(ROWS))
    (tmp_path / "wrapped.json").write_text(json.dumps({"version": 1, "data": ROWS}))
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "rows.parquet")
    for name in ("rows.csv", "rows.jsonl", "lines.json", "list.json", "wrapped.json", "rows.parquet"):
        assert read_records(tmp_path / name) == ROWS, name
    assert read_file(tmp_path / "wrapped.json") == {"version": 1, "data": ROWS}


def test_missing_file_is_a_file_not_found_input_error(tmp_path):
    with pytest.raises(MissingFileError, match="data file not found: .*nope.json") as error:
        read_file(tmp_path / "nope.json")
    assert isinstance(error.value, FileNotFoundError) and isinstance(error.value, InputError)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("data.txt", "x", r"data\.txt: unsupported file type '\.txt' \(expected one of \.json, \.jsonl, \.csv, \.parquet\)"),
        ("broken.json", '{"data": [1, ', r"broken\.json: malformed JSON: .* line 1 column"),
        ("broken.jsonl", '{"a": 1}\n{"a": \n', r"broken\.jsonl: malformed JSON on line 2"),
        ("latin.csv", b"text,label\ncaf\xe9,x\n", r"latin\.csv: not UTF-8 text"),
        ("broken.parquet", b"not parquet", r"broken\.parquet: cannot read parquet"),
    ],
)
def test_malformed_files_name_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(InputError, match=message):
        read_file(path)


def test_records_of_rejects_other_json_values(tmp_path):
    with pytest.raises(InputError, match=r"x\.json: expected a list of records or \{'data': \[\.\.\.\]\}, got a dict"):
        records_of({"rows": []}, source=tmp_path / "x.json")
