"""SQuAD answer metrics as pure functions.

SQuAD v1.1 scores come from ``torchmetrics.functional.text.squad``. SQuAD v2.0 (questions without an answer) is
computed here, following the official ``evaluate-v2.0.py``:

- both texts are normalised: lower case, punctuation removed, the articles "a", "an", "the" removed, whitespace
  collapsed;
- exact match (EM) is 1 when the normalised prediction equals any normalised gold answer;
- F1 is the best token-overlap F1 against the gold answers;
- an unanswerable question has the single gold answer ``""``: an empty prediction scores EM = F1 = 1, anything else 0
  (the same rule applies to F1 whenever either side normalises to no tokens);
- scores are percentages (0-100), as in the official script and torchmetrics.
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Mapping, Sequence

__all__ = [
    "normalize_answer",
    "exact_match_score",
    "f1_score",
    "squad_v1_metrics",
    "squad_v2_metrics",
]

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and the articles a/an/the, and collapse whitespace (official SQuAD order)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _tokens(text: str) -> list[str]:
    return normalize_answer(text).split() if text else []


def exact_match_score(prediction: str, gold: str) -> float:
    """1.0 when the normalised texts are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str) -> float:
    """Token-overlap F1 of the normalised texts; when either is empty, 1.0 only if both are."""
    pred_tokens, gold_tokens = _tokens(prediction), _tokens(gold)
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(pred_tokens)
    recall = same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def _gold_answers(answers: Sequence[str]) -> list[str]:
    # As the official script: answers that normalise to nothing are dropped, and no answer at all means "".
    gold = [a for a in answers if normalize_answer(a)]
    return gold or [""]


def squad_v2_metrics(
    predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]
) -> dict[str, float]:
    """Score SQuAD v2 predictions.

    Args:
        predictions: ``{question id: predicted text}``; ``""`` means "no answer". A question missing here is scored as
            if ``""`` had been predicted.
        references: ``{question id: gold answer texts}``; an empty list marks an unanswerable question.

    Returns:
        ``exact``, ``f1`` and ``total`` over all questions, and ``has_ans_exact``/``has_ans_f1``/``has_ans_total``,
        ``no_ans_exact``/``no_ans_f1``/``no_ans_total`` over the answerable and unanswerable subsets. Scores are
        percentages; a subset with no questions scores 0.0 (and its total is 0).
    """
    exact: dict[str, float] = {}
    f1: dict[str, float] = {}
    has_answer: dict[str, bool] = {}
    for qid, answers in references.items():
        gold = _gold_answers(answers)
        prediction = predictions.get(qid, "")
        exact[qid] = max(exact_match_score(prediction, a) for a in gold)
        f1[qid] = max(f1_score(prediction, a) for a in gold)
        has_answer[qid] = gold != [""]

    def mean(scores: dict[str, float], ids: list[str]) -> float:
        return 100.0 * sum(scores[i] for i in ids) / len(ids) if ids else 0.0

    all_ids = list(references)
    has_ids = [i for i in all_ids if has_answer[i]]
    no_ids = [i for i in all_ids if not has_answer[i]]
    return {
        "exact": mean(exact, all_ids),
        "f1": mean(f1, all_ids),
        "total": float(len(all_ids)),
        "has_ans_exact": mean(exact, has_ids),
        "has_ans_f1": mean(f1, has_ids),
        "has_ans_total": float(len(has_ids)),
        "no_ans_exact": mean(exact, no_ids),
        "no_ans_f1": mean(f1, no_ids),
        "no_ans_total": float(len(no_ids)),
    }


def squad_v1_metrics(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """Score SQuAD v1.1 predictions with ``torchmetrics.functional.text.squad``.

    Only questions with at least one gold answer are scored (SQuAD v1.1 has no unanswerable questions); a question
    missing from ``predictions`` counts as the prediction ``""``. Returns ``exact`` and ``f1`` (percentages) and
    ``total``; with no answerable question both scores are 0.0.
    """
    from torchmetrics.functional.text import squad

    ids = [qid for qid, answers in references.items() if len(answers) > 0]
    if not ids:
        return {"exact": 0.0, "f1": 0.0, "total": 0.0}
    preds = [{"prediction_text": predictions.get(qid, ""), "id": qid} for qid in ids]
    target = [
        {"answers": {"answer_start": [0] * len(references[qid]), "text": list(references[qid])}, "id": qid}
        for qid in ids
    ]
    scores = squad(preds, target)
    return {"exact": float(scores["exact_match"]), "f1": float(scores["f1"]), "total": float(len(ids))}
