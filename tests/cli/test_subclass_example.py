"""The subclassing example of README.md, run as written: top-k and dense attention through the CLI."""

import re
import shlex
import sys

import pytest
import yaml

from cli_helpers import REPO, tiny_qa_args
from topk_lightning.cli import build_cli, main


def example_source() -> str:
    text = (REPO / "README.md").read_text()
    match = re.search(r"<!-- example: answer_presence\.py.*?-->\s*```python\n(.*?)```", text, re.S)
    assert match, "the example block is missing from README.md"
    return match.group(1)


@pytest.fixture
def example_module(tmp_path, restore_sys_path):
    (tmp_path / "answer_presence.py").write_text(example_source())
    sys.path.insert(0, str(tmp_path))
    sys.modules.pop("answer_presence", None)
    yield "answer_presence.AnswerPresenceModule"
    sys.modules.pop("answer_presence", None)


def test_example_is_short():
    lines = [l for l in example_source().splitlines() if l.strip() and not l.lstrip().startswith(("import", "from"))]
    assert len(lines) <= 25


def example_command() -> list[str]:
    """The README's command for the example, as arguments after ``lightning`` (comments and ``PYTHONPATH=.`` dropped)."""
    text = (REPO / "README.md").read_text()
    match = re.search(r"<!-- command: answer_presence.*?-->\s*```bash\n(.*?)```", text, re.S)
    assert match, "the example's command is missing from README.md"
    lines = [line.split("#")[0].rstrip().rstrip("\\") for line in match.group(1).splitlines()]
    words = shlex.split(" ".join(lines))
    assert words[:2] == ["PYTHONPATH=.", "lightning"]
    return [str(REPO / w) if w.startswith("recipes/") else w for w in words[2:]]


def test_the_readme_command_keeps_shared_arguments_and_gives_windows_without_the_answer(example_module, capsys):
    args = example_command()
    assert f"--model={example_module}" in args
    with pytest.raises(SystemExit):
        main([*args, "--model.attention=sdpa", "--print_config"])
    printed_text = capsys.readouterr().out
    printed = yaml.safe_load(printed_text)
    init = printed["model"]["init_args"]
    assert printed["model"]["class_path"] == example_module
    assert init["attention"] == "sdpa" and init["query_chunk_size"] == 64 and init["pos_weight"] == 3.0
    assert "version_2_with_negative" not in init  # the recipe's QA-only arguments are dropped with the class
    data = printed["data"]["init_args"]
    assert data["max_length"] == 512 and data["needle_document_words"] == 1700  # ~2,000 tokens: several windows
    assert "#   model.max_positions: 512  (= data.max_length)" in printed_text
    callbacks = printed["trainer"]["callbacks"]  # replaced: no ModelCheckpoint watching val/f1 any more
    callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
    assert [c["class_path"] for c in callbacks] == ["lightning.pytorch.callbacks.TQDMProgressBar"]


@pytest.mark.parametrize("attention", ["topk", "sdpa"])
def test_example_trains_with_topk_and_vanilla(tmp_path, tiny_bert, qa_files, example_module, attention):
    args = [a for a in tiny_qa_args(tiny_bert, qa_files, tmp_path, attention=attention)
            if not a.startswith(("--model=", "--model.version_2"))]
    cli = build_cli(["fit", f"--model={example_module}", "--model.pos_weight=2.0", *args])
    assert type(cli.model).__name__ == "AnswerPresenceModule"
    assert cli.model.hparams.pos_weight == 2.0 and cli.model.hparams.topk == 8
    assert cli.model.backbone.config._attn_implementation == attention
    assert "val/acc" in cli.trainer.callback_metrics and "train/loss" in cli.trainer.callback_metrics
