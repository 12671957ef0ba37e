"""Span decoding against hand-computed answers: n-best across windows, max_answer_length, null answers."""

import torch

from topk_lightning.modules.qa_decoding import FeatureResult, aggregate_predictions, feature_candidates, gold_answers

CONTEXT = "alpha beta gamma delta epsilon"
#          0     6    11    17    23


def window(token_offsets):
    """Offsets tensor for [CLS] q [SEP] <context tokens> [SEP]: non-context tokens are (-1, -1)."""
    rows = [(-1, -1), (-1, -1), (-1, -1)] + list(token_offsets) + [(-1, -1)]
    return torch.tensor(rows)


WORDS = [(0, 5), (6, 10), (11, 16), (17, 22), (23, 30)]


def logits(length, values, fill=-10.0):
    out = torch.full((length,), fill)
    for index, value in values.items():
        out[index] = value
    return out


def test_best_span_and_nbest_in_one_window():
    offsets = window(WORDS)  # context tokens at positions 3..7
    start = logits(9, {0: 1.0, 4: 5.0, 5: 3.0})
    end = logits(9, {0: 1.0, 5: 4.0, 6: 2.0})
    result = feature_candidates(start, end, offsets, CONTEXT, example_id="e", n_best_size=3, max_answer_length=5)
    assert result.null_score == 2.0
    # candidates: (4,5)=9 "beta gamma", (4,6)=7 "beta gamma delta", (5,5)=7 "gamma"
    assert result.spans[0] == (9.0, "beta gamma")
    assert sorted(result.spans[1:]) == [(7.0, "beta gamma delta"), (7.0, "gamma")]


def test_span_never_uses_non_context_tokens_or_ends_before_start():
    offsets = window(WORDS)
    start = logits(9, {1: 50.0, 6: 5.0}, fill=-100.0)  # 1 is a question token
    end = logits(9, {8: 50.0, 4: 40.0, 6: 1.0}, fill=-100.0)  # 8 is [SEP]; 4 would end before start 6
    result = feature_candidates(start, end, offsets, CONTEXT, example_id="e", n_best_size=1, max_answer_length=5)
    assert result.spans[0] == (6.0, "delta")


def test_max_answer_length_limits_span_tokens():
    offsets = window(WORDS)
    start = logits(9, {3: 5.0})
    end = logits(9, {7: 5.0, 4: 1.0})
    long = feature_candidates(start, end, offsets, CONTEXT, example_id="e", n_best_size=1, max_answer_length=5)
    assert long.spans[0][1] == "alpha beta gamma delta epsilon"
    short = feature_candidates(start, end, offsets, CONTEXT, example_id="e", n_best_size=1, max_answer_length=2)
    assert short.spans[0] == (6.0, "alpha beta")


def test_best_span_across_two_windows_of_one_example():
    # window 1 holds words 0-2, window 2 words 2-4 (stride overlap on "gamma")
    w1 = window(WORDS[:3])
    w2 = window(WORDS[2:])
    r1 = feature_candidates(logits(7, {0: 0.0, 3: 2.0}), logits(7, {0: 0.0, 4: 2.0}), w1, CONTEXT, example_id="x")
    r2 = feature_candidates(logits(7, {0: 0.0, 4: 3.0}), logits(7, {0: 0.0, 5: 3.0}), w2, CONTEXT, example_id="x")
    assert r1.spans[0] == (4.0, "alpha beta") and r2.spans[0] == (6.0, "delta epsilon")
    other = FeatureResult("y", null_score=0.0, spans=((1.0, "zeta"),))
    assert aggregate_predictions([r1, other, r2]) == {"x": "delta epsilon", "y": "zeta"}
    # repeated windows (DDP sampler padding) change nothing
    assert aggregate_predictions([r2, r1, r1, other, r2]) == {"x": "delta epsilon", "y": "zeta"}


def test_null_answer_threshold_squad_v2():
    a = FeatureResult("q", null_score=5.0, spans=((4.0, "maybe"),))
    b = FeatureResult("q", null_score=7.0, spans=((3.0, "less"),))
    # min null 5.0 - best span 4.0 = 1.0
    assert aggregate_predictions([a, b]) == {"q": "maybe"}  # v1 never answers empty
    assert aggregate_predictions([a, b], version_2_with_negative=True) == {"q": ""}
    assert aggregate_predictions([a, b], version_2_with_negative=True, null_score_threshold=0.99) == {"q": ""}
    assert aggregate_predictions([a, b], version_2_with_negative=True, null_score_threshold=1.0) == {"q": "maybe"}


def test_window_without_valid_span_and_gold_answers():
    offsets = window([])  # no context tokens at all
    r = feature_candidates(torch.zeros(4), torch.zeros(4), offsets, "", example_id="z", answers=["a", "b"])
    assert r.spans == ()
    assert aggregate_predictions([r], version_2_with_negative=True) == {"z": ""}
    assert gold_answers([r]) == {"z": ("a", "b")}
