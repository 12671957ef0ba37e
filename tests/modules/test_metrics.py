"""SQuAD metrics against hand-computed cases (official evaluate-v2.0.py rules)."""

import pytest

from topk_lightning.modules.metrics import (
    exact_match_score,
    f1_score,
    normalize_answer,
    squad_v1_metrics,
    squad_v2_metrics,
)


def test_normalize_answer_lowercases_strips_punctuation_articles_and_spaces():
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert normalize_answer("an apple, a pear and THE fig.") == "apple pear and fig"
    assert normalize_answer("  theatre  ") == "theatre"  # "the" only as a whole word
    assert normalize_answer("") == ""


def test_exact_and_f1_single_pair():
    assert exact_match_score("the Cat", "cat.") == 1.0
    assert exact_match_score("cat sat", "cat") == 0.0
    # prediction "cat sat on mat" vs gold "cat on the mat": 3 common of 4 and 3 -> p=3/4, r=3/3
    assert f1_score("cat sat on mat", "cat on the mat") == pytest.approx(2 * 0.75 * 1.0 / 1.75)
    assert f1_score("dog", "cat") == 0.0
    # empty on either side: 1 only when both are empty
    assert f1_score("", "") == 1.0
    assert f1_score("a", "") == 1.0  # "a" normalises to nothing
    assert f1_score("cat", "") == 0.0
    assert f1_score("", "cat") == 0.0


def test_squad_v2_hand_computed():
    references = {
        "q1": ["Paris", "the city of Paris"],  # answerable, exact
        "q2": ["Denver Broncos"],  # answerable, partial: "Broncos" -> p=1, r=1/2, f1=2/3
        "q3": [],  # unanswerable, predicted empty -> 1
        "q4": [],  # unanswerable, predicted text -> 0
        "q5": ["1492"],  # answerable, predicted empty -> 0
    }
    predictions = {"q1": "paris", "q2": "Broncos", "q3": "", "q4": "Lyon", "q5": ""}
    m = squad_v2_metrics(predictions, references)
    assert m["total"] == 5 and m["has_ans_total"] == 3 and m["no_ans_total"] == 2
    assert m["exact"] == pytest.approx(100 * 2 / 5)
    assert m["f1"] == pytest.approx(100 * (1 + 2 / 3 + 1 + 0 + 0) / 5)
    assert m["has_ans_exact"] == pytest.approx(100 / 3)
    assert m["has_ans_f1"] == pytest.approx(100 * (1 + 2 / 3) / 3)
    assert m["no_ans_exact"] == pytest.approx(50.0)
    assert m["no_ans_f1"] == pytest.approx(50.0)


def test_squad_v2_missing_prediction_counts_as_empty_and_empty_gold_texts_mean_no_answer():
    m = squad_v2_metrics({}, {"q1": ["x"], "q2": [""]})
    assert m["exact"] == pytest.approx(50.0)
    assert m["has_ans_exact"] == 0.0 and m["no_ans_exact"] == 100.0


def test_squad_v2_empty_subsets_score_zero():
    m = squad_v2_metrics({"q": "x y"}, {"q": ["x y z"]})
    assert m["no_ans_total"] == 0 and m["no_ans_exact"] == 0.0
    assert m["f1"] == pytest.approx(100 * 0.8)  # p=1, r=2/3


def test_squad_v1_uses_torchmetrics_and_ignores_unanswerable():
    references = {"q1": ["Paris"], "q2": ["Denver Broncos"], "q3": []}
    m = squad_v1_metrics({"q1": "Paris", "q2": "Broncos", "q3": "whatever"}, references)
    assert m["total"] == 2
    assert m["exact"] == pytest.approx(50.0)
    assert m["f1"] == pytest.approx(100 * (1 + 2 / 3) / 2, abs=1e-4)
    assert squad_v1_metrics({}, {"q": []}) == {"exact": 0.0, "f1": 0.0, "total": 0.0}
