"""The labeling prompt's pieces and the parsing of what a labeler answers."""

from __future__ import annotations

import pytest

from autolabel.label.prompts import LABEL_SCHEMA, around_peak, explain_messages, mark, parse_label
from autolabel.llm import InvalidOutput


def test_mark_wraps_runs_of_firing_tokens():
    pieces = ["I", " like", " red", " apples", ".", "\n"]
    assert mark(pieces, [0, 0, 2.0, 3.0, 0, 0.5], 0.1) == "I like<< red apples>>.<<\\n>>"
    assert mark(pieces, [0.0] * 6, 0.1) == "I like red apples.\\n"


def test_around_peak_keeps_the_peak_inside_the_window():
    tokens, acts = list(range(32)), [0.0] * 32
    acts[30] = 5.0
    window, window_acts = around_peak(tokens, acts, 20)
    assert len(window) == 20 and window[-1] == 31 and max(window_acts) == 5.0
    acts = [0.0] * 32
    acts[1] = 1.0
    assert around_peak(tokens, acts, 20)[0][0] == 0


def test_messages_hold_the_examples_and_outputs_after_the_worked_example():
    messages = explain_messages(["a<< b>>", "<<c>> d"], ["x", "y"], ["z"])
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert "1. a<< b>>\n2. <<c>> d" in messages[-1]["content"]
    assert "Promoted outputs: x, y" in messages[-1]["content"] and "Suppressed outputs: z" in messages[-1]["content"]
    assert LABEL_SCHEMA["json_schema"]["schema"]["required"] == ["label", "explanation"]


@pytest.mark.parametrize("text,label", [
    ('{"label": "refusals", "explanation": "Fires when declining."}', "refusals"),
    ('Sure! Here it is: {"label": "units of measure", "explanation": "x"} Hope it helps', "units of measure"),
    ("Label: chocolate in recipes\nExplanation: fires on chocolate.", "chocolate in recipes"),
    ('{"label": " \\"quoted\\" "}', "quoted"),
])
def test_parse_label_accepts_json_and_fallbacks(text, label):
    assert parse_label(text).label == label


@pytest.mark.parametrize("text", ["I cannot tell.", '{"label": ""}', '{"name": "x"}', '{"label": 3}',
                                  '{"label": "' + "word " * 40 + '"}', '{"label": "trunc', "[" * 100_000,
                                  '{"label": ' + "[" * 100_000 + "}"])
def test_parse_label_rejects_garbage(text):
    with pytest.raises(InvalidOutput):
        parse_label(text)
