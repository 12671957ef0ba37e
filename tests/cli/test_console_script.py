"""The `lightning` console script as a user meets it: a user's mistake ends with one line on stderr and exit status 2,
no traceback (unless TOPK_LIGHTNING_DEBUG=1); a bug keeps its traceback; a short fit prints its final validation
and the checkpoint to resume from.

Each case is its own process (that is the point); they run two at a time to keep the file fast.
"""

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cli_helpers import tiny_qa_args

BUGGY_MODULE = '''
from topk_lightning.modules import ExtractiveQAModule


class BuggyQAModule(ExtractiveQAModule):
    def build_head(self, hidden_size):
        return self.no_such_attribute  # a programming error, not the user's
'''


def _console_script() -> str:
    script = shutil.which("lightning", path=str(Path(sys.executable).parent)) or shutil.which("lightning")
    assert script, "the lightning console script is not installed"
    return script


def _without(args, *prefixes):
    return [a for a in args if not a.startswith(prefixes)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_bert, qa_files):
    """name -> CompletedProcess, for every case below, run two at a time."""
    tmp = tmp_path_factory.mktemp("console")
    base = ["fit", *tiny_qa_args(tiny_bert, qa_files, tmp)]
    (tmp / "broken.json").write_text('{"data": [{"title": "x", ')
    (tmp / "bad-offset.json").write_text(json.dumps([{"id": "x1", "question": "q?", "context": "abc def",
                                                      "answers": {"text": ["zzz"], "answer_start": [0]}}]))
    (tmp / "buggy.py").write_text(BUGGY_MODULE)
    import transformers

    deberta = transformers.DebertaV2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                           intermediate_size=64, vocab_size=30522)
    transformers.DebertaV2Model(deberta).save_pretrained(tmp / "tiny-deberta")

    cases = {
        "missing_file": _without(base, "--data.train_file") + [f"--data.train_file={tmp / 'missing.json'}"],
        "malformed_file": _without(base, "--data.train_file") + [f"--data.train_file={tmp / 'broken.json'}"],
        "wrong_answer_offset": _without(base, "--data.train_file") + [f"--data.train_file={tmp / 'bad-offset.json'}"],
        "bad_option_value": base + ["--model.topk=0"],
        "unsupported_backbone": _without(base, "--model.backbone") + [f"--model.backbone={tmp / 'tiny-deberta'}"],
        "missing_ckpt_path": base + [f"--ckpt_path={tmp / 'nowhere' / 'last.ckpt'}"],
        "debug_traceback": base + ["--model.topk=0"],
        "programming_error": ["fit", "--model=buggy.BuggyQAModule", *_without(base, "fit", "--model=")],
        "short_fit": base + ["--trainer.limit_train_batches=3", "--trainer.max_steps=2",
                             "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
                             f"--trainer.logger.save_dir={tmp / 'logs'}"],
    }
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(tmp), os.environ.get("PYTHONPATH", "")]))
    env.pop("TOPK_LIGHTNING_DEBUG", None)

    def run(name):
        case_env = dict(env, TOPK_LIGHTNING_DEBUG="1") if name == "debug_traceback" else env
        return name, subprocess.run([_console_script(), *cases[name]], env=case_env, capture_output=True, text=True,
                                    timeout=300, cwd=tmp)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(run, cases))


USER_ERRORS = {
    "missing_file": r"^error: data file not found: .*missing\.json$",
    "malformed_file": r"^error: .*broken\.json: malformed JSON: .* line 1 column \d+$",
    "wrong_answer_offset": r"^error: .*bad-offset\.json: example id 'x1': answer text 'zzz' not found at "
                           r"answer_start=0 \(the context there reads 'abc'\)$",
    "bad_option_value": r"^error: ExtractiveQAModule: topk must be None or an int >= 1, got 0$",
    "unsupported_backbone": r"^error: DebertaV2Model \(model_type='deberta-v2'\) is not supported by top-k patching",
    "missing_ckpt_path": r"^error: --ckpt_path: no checkpoint file at .*nowhere/last\.ckpt$",
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(USER_ERRORS))
def test_a_users_mistake_ends_with_one_line_and_no_traceback(runs, case):
    import re

    proc = runs[case]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    last_line = proc.stderr.strip().splitlines()[-1]
    assert re.search(USER_ERRORS[case], last_line), last_line
    assert sum(line.startswith("error: ") for line in proc.stderr.splitlines()) == 1


@pytest.mark.slow
def test_the_traceback_is_shown_on_request(runs):
    proc = runs["debug_traceback"]
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "InputError: ExtractiveQAModule: topk must be" in proc.stderr


@pytest.mark.slow
def test_a_programming_error_keeps_its_traceback(runs):
    proc = runs["programming_error"]
    assert proc.returncode == 1 and "Traceback" in proc.stderr
    assert "AttributeError" in proc.stderr and "no_such_attribute" in proc.stderr


@pytest.mark.slow
def test_a_short_fit_prints_its_final_validation_and_the_checkpoint_to_resume_from(runs):
    proc = runs["short_fit"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert "Final validation: val/em=" in output and "val/f1=" in output
    (line,) = [line for line in output.splitlines() if line.startswith("Last checkpoint: ")]
    path = line.split()[2]
    assert path.endswith("checkpoints/last.ckpt") and Path(path).is_file()
    assert f"--ckpt_path={path}" in line
