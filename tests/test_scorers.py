"""Graded scores: AUROC of per-text answers, their interval, the held-out threshold, degenerate answers."""

from __future__ import annotations

import math

import pytest

from autolabel.label.scorers import MIN_PER_CLASS, graded_score, held_out_accuracy, p_yes


def test_separated_answers_score_one_and_inverted_ones_zero_in_auroc():
    truth = [True] * 8 + [False] * 8
    graded = [0.9 - 0.01 * i for i in range(8)] + [0.2 + 0.01 * i for i in range(8)]
    right = graded_score("detection", truth, graded, "s")
    wrong = graded_score("detection", truth, [1 - g for g in graded], "s")
    assert (right.status, right.value, right.accuracy) == ("ok", 1.0, 1.0) and right.ci_high == 1.0
    assert (wrong.value, wrong.accuracy) == (0.0, 0.5)  # "yes" above a threshold: at best all one answer


def test_the_interval_holds_the_value_and_narrows_with_more_texts():
    def score(n: int):
        truth = [i % 2 == 0 for i in range(n)]
        graded = [((i * 37) % 101) / 101 + (0.25 if t else 0) for i, t in enumerate(truth)]  # overlapping
        return graded_score("fuzzing", truth, graded, "s")

    few, many = score(12), score(120)
    for s in (few, many):
        assert s.ci_low < s.value < s.ci_high
    assert many.ci_high - many.ci_low < few.ci_high - few.ci_low


def test_the_threshold_is_fitted_on_one_half_and_measured_on_the_other():
    """Even-indexed texts of each kind separate at 0.5; the odd ones are the other way round. A threshold
    fitted where it is measured would report 1.0 for either half; held out, it is 0."""
    truth = [True, True, False, False] * 4
    graded = [0.9, 0.1, 0.1, 0.9] * 4
    import numpy as np

    assert held_out_accuracy(np.array(truth), np.array(graded)) == 0.0


def test_the_same_answer_for_every_text_is_degenerate_and_too_few_answers_fail():
    truth = [True] * 5 + [False] * 5
    same = graded_score("detection", truth, [1.0] * 10, "s")
    assert (same.status, same.value) == ("degenerate", None) and "did not tell them apart" in same.details["reason"]
    unanswered = [None] * 3 + [0.9, 0.8] + [0.1] * 5  # only two activating texts answered
    few = graded_score("detection", truth, unanswered, "s")
    assert (few.status, few.value, few.n) == ("failed", None, 7) and f"each needs {MIN_PER_CLASS}" in few.details[
        "reason"
    ]


@pytest.mark.parametrize(
    "text, top, expected",
    [
        ("Yes", {"Yes": math.log(0.6), " yes": math.log(0.1), "No": math.log(0.2), "The": math.log(0.1)}, 0.7 / 0.9),
        ("The", {"The": math.log(0.9), "no": math.log(0.05)}, 0.0),  # only "no" among the alternatives
        ("yes.", None, 1.0),  # a server that sends no log-probabilities: the text, hard
        ("No", {"The": math.log(0.9)}, 0.0),  # alternatives without yes or no: the text
        ("Maybe", {"The": math.log(0.9)}, None),
    ],
)
def test_p_yes_reads_the_alternatives_then_the_text(text, top, expected):
    value = p_yes(text, top)
    assert value == expected if expected is None else value == pytest.approx(expected)
