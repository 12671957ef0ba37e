"""Write a file or a directory so that its final path only ever holds a complete result.

One helper for every output the project writes (exported models, prediction files, the generated needle data)::

    with atomic_output("outputs/qa/predictions.json") as partial:
        partial.write_text(text)          # or: partial.mkdir(); model.save_pretrained(partial)

The block writes to a hidden sibling (same directory, so the final rename stays on one file system). When the block
succeeds the sibling replaces ``path``; when it raises (an exception, Ctrl-C) the sibling is deleted and ``path`` keeps
what it had. Concurrent writers each use their own sibling; the last rename wins.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_output"]


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a not-yet-existing sibling of ``path`` to write to; move it to ``path`` when the block succeeds.

    The caller creates the file or directory at the yielded path. Files and directories in the result get the
    permissions a plain ``open()`` / ``mkdir()`` would give under the current umask (some writers, such as
    safetensors, create files readable by their owner only). A previous file or directory at ``path`` is replaced.

    Raises:
        FileNotFoundError: the block succeeded but created nothing at the yielded path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.partial")
    try:
        yield partial
        if not partial.exists():
            raise FileNotFoundError(f"atomic_output: nothing was written for {path}")
        _apply_umask(partial)
        _replace(partial, path)
    except BaseException:
        _remove(partial)
        raise


def _replace(partial: Path, path: Path) -> None:
    if partial.is_dir() and path.exists():
        # A rename cannot replace a non-empty directory: move the old one aside first, then drop it.
        old = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.old")
        os.replace(path, old)
        os.replace(partial, path)
        _remove(old)
    else:
        os.replace(partial, path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _apply_umask(root: Path) -> None:
    mask = _current_umask()
    paths = [root, *root.rglob("*")] if root.is_dir() else [root]
    for item in paths:
        if item.is_symlink():
            continue
        os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~mask)
