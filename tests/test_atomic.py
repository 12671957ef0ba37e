"""atomic_output: the final path holds a complete result or what it held before, never a partial one."""

import os

import pytest

from topk_lightning.atomic import atomic_output


def test_file_is_written_and_replaces_the_old_one(tmp_path):
    target = tmp_path / "sub" / "out.json"
    with atomic_output(target) as partial:
        assert partial.parent == target.parent and not partial.exists()
        partial.write_text("one")
    with atomic_output(target) as partial:
        partial.write_text("two")
    assert target.read_text() == "two"
    assert os.listdir(target.parent) == ["out.json"]


@pytest.mark.parametrize("interruption", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_a_failed_write_leaves_the_old_file_and_no_partial_one(tmp_path, interruption):
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(type(interruption)):
        with atomic_output(target) as partial:
            partial.write_text("half")
            raise interruption
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["out.json"]


def test_directory_replaces_a_non_empty_directory(tmp_path):
    target = tmp_path / "export"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    with atomic_output(target) as partial:
        partial.mkdir()
        (partial / "config.json").write_text("{}")
    assert sorted(os.listdir(target)) == ["config.json"] and os.listdir(tmp_path) == ["export"]
    with pytest.raises(RuntimeError):
        with atomic_output(target) as partial:
            partial.mkdir()
            (partial / "half").write_text("x")
            raise RuntimeError("interrupted")
    assert sorted(os.listdir(target)) == ["config.json"] and os.listdir(tmp_path) == ["export"]


def test_permissions_follow_the_umask_whatever_the_writer_used(tmp_path):
    mask = os.umask(0o022)
    try:
        with atomic_output(tmp_path / "export") as partial:
            os.mkdir(partial, 0o700)
            weights = partial / "model.safetensors"
            weights.write_bytes(b"x")
            os.chmod(weights, 0o600)  # what safetensors does
    finally:
        os.umask(mask)
    assert (tmp_path / "export").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "export" / "model.safetensors").stat().st_mode & 0o777 == 0o644


def test_nothing_written_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing was written"):
        with atomic_output(tmp_path / "out.json"):
            pass
    assert os.listdir(tmp_path) == []
