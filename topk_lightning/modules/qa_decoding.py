"""Extractive-QA post-processing: from start/end logits of windows back to answer texts. Pure functions.

A long example is split into overlapping windows ("features") by the data module. Decoding runs in two stages so that
windows of one example may be scored on different processes (DDP) and merged afterwards:

1. :func:`feature_candidates` reduces one window to a small, picklable :class:`FeatureResult`: its ``n_best_size``
   best spans (text and score ``start_logit + end_logit``) and its null score (``start_logit[0] + end_logit[0]``, the
   CLS token). A span must start and end on context tokens (offset ``>= 0``), end at or after its start, and be at most
   ``max_answer_length`` tokens long.
2. :func:`aggregate_predictions` groups results by example id and picks the best span over all windows. With SQuAD v2
   (``version_2_with_negative=True``) it answers ``""`` when ``min null score - best span score > null_score_threshold``
   (the null score of the window that is most sure there is an answer, as in Hugging Face's ``run_qa``). Repeated
   results for the same window (DDP samplers pad with repeats) do not change a max or a min, so no de-duplication of
   windows is needed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch

__all__ = ["FeatureResult", "feature_candidates", "aggregate_predictions", "batch_feature_results"]


class FeatureResult(NamedTuple):
    """The decodable summary of one window (a NamedTuple: picklable, and Lightning can walk it).

    Attributes:
        example_id: id of the example the window belongs to.
        null_score: ``start_logits[0] + end_logits[0]``.
        spans: up to ``n_best_size`` ``(score, text)`` pairs, best first.
        answers: gold answer texts of the example (empty = unanswerable), carried along for scoring.
    """

    example_id: str
    null_score: float
    spans: tuple[tuple[float, str], ...]
    answers: tuple[str, ...] = ()


def feature_candidates(
    start_logits: torch.Tensor,
    end_logits: torch.Tensor,
    offsets: torch.Tensor,
    context: str,
    *,
    example_id: str,
    answers: Sequence[str] = (),
    n_best_size: int = 20,
    max_answer_length: int = 30,
) -> FeatureResult:
    """Best spans of one window.

    Args:
        start_logits, end_logits: (T,) logits of one window.
        offsets: (T, 2) character offsets into ``context``; ``(-1, -1)`` for tokens outside the context.
        context: the example's context text.
        example_id: id of the example.
        answers: gold texts, passed through to the result.
        n_best_size: how many spans to keep (>= 1).
        max_answer_length: the longest span in tokens (>= 1).
    """
    if n_best_size < 1 or max_answer_length < 1:
        raise ValueError(
            f"n_best_size and max_answer_length must be >= 1, got {n_best_size} and {max_answer_length}"
        )
    start = start_logits.detach().float().cpu()
    end = end_logits.detach().float().cpu()
    offsets = offsets.detach().cpu()
    length = start.shape[0]
    valid = offsets[:, 0] >= 0
    null_score = float(start[0] + end[0])

    # scores[d, s] = start[s] + end[s + d] for span lengths d + 1 = 1..max_answer_length: O(T x max_len), never T x T.
    max_len = min(max_answer_length, length)
    neg_inf = torch.tensor(float("-inf"))
    rows = []
    for d in range(max_len):
        row = torch.full((length,), float("-inf"))
        ok = valid[: length - d] & valid[d:]
        row[: length - d] = torch.where(ok, start[: length - d] + end[d:], neg_inf)
        rows.append(row)
    scores = torch.stack(rows)  # (max_len, T)
    flat = scores.flatten()
    k = min(n_best_size, int(torch.isfinite(flat).sum()))
    spans: list[tuple[float, str]] = []
    if k > 0:
        top_scores, top_index = torch.topk(flat, k)
        for score, index in zip(top_scores.tolist(), top_index.tolist()):
            d, s = divmod(index, length)
            e = s + d
            text = context[int(offsets[s, 0]) : int(offsets[e, 1])]
            spans.append((float(score), text))
    return FeatureResult(example_id=example_id, null_score=null_score, spans=tuple(spans), answers=tuple(answers))


def batch_feature_results(
    start_logits: torch.Tensor,
    end_logits: torch.Tensor,
    batch: dict,
    *,
    n_best_size: int = 20,
    max_answer_length: int = 30,
) -> list[FeatureResult]:
    """:func:`feature_candidates` for every window of a collated QA eval batch (see docs/CONTRACTS.md)."""
    results = []
    answers = batch.get("answers")
    for i, example_id in enumerate(batch["example_id"]):
        results.append(
            feature_candidates(
                start_logits[i],
                end_logits[i],
                batch["offset_mapping"][i],
                batch["context"][i],
                example_id=str(example_id),
                answers=tuple(answers[i]) if answers is not None else (),
                n_best_size=n_best_size,
                max_answer_length=max_answer_length,
            )
        )
    return results


def aggregate_predictions(
    results: Iterable[FeatureResult],
    *,
    version_2_with_negative: bool = False,
    null_score_threshold: float = 0.0,
) -> dict[str, str]:
    """Merge window results into ``{example id: answer text}``.

    Without ``version_2_with_negative`` the best span always wins (``""`` only when no window has a valid span).
    With it, the answer is ``""`` when ``min null score - best span score > null_score_threshold``.
    Examples keep the order in which they first appear.
    """
    best: dict[str, tuple[float, str] | None] = {}
    null: dict[str, float] = {}
    for result in results:
        eid = result.example_id
        top = result.spans[0] if result.spans else None
        current = best.get(eid)
        if eid not in best or (top is not None and (current is None or top[0] > current[0])):
            best[eid] = top if top is not None else current
        null[eid] = min(null.get(eid, float("inf")), result.null_score)

    predictions: dict[str, str] = {}
    for eid, span in best.items():
        if span is None:
            predictions[eid] = ""
        elif version_2_with_negative and null[eid] - span[0] > null_score_threshold:
            predictions[eid] = ""
        else:
            predictions[eid] = span[1]
    return predictions


def gold_answers(results: Iterable[FeatureResult]) -> dict[str, tuple[str, ...]]:
    """``{example id: gold texts}`` from window results (first occurrence wins; windows of one example agree)."""
    references: dict[str, tuple[str, ...]] = {}
    for result in results:
        references.setdefault(result.example_id, result.answers)
    return references
