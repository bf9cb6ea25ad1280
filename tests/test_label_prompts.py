"""The labeling prompt's pieces and the parsing of what a labeler answers."""

from __future__ import annotations

import pytest

from autolabel.label.prompts import (
    LABEL_SCHEMA,
    MAX_LABEL_CHARS,
    MAX_LABEL_WORDS,
    WORKED_EXAMPLES,
    Evidence,
    around_peak,
    explain_messages,
    mark,
    parse_label,
    tagged,
    where_it_fires,
)
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


def test_messages_hold_the_examples_and_evidence_after_varied_worked_examples():
    evidence = Evidence("Where it fires: 90% of its firing tokens are assistant turn.", ["x", "y"], ["z"])
    messages = explain_messages([tagged("assistant", "recipes", "a<< b>>"), tagged(None, None, "<<c>> d")], evidence)
    assert [m["role"] for m in messages] == ["system"] + ["user", "assistant"] * len(WORKED_EXAMPLES) + ["user"]
    body = messages[-1]["content"]
    assert "1. [assistant turn, recipes] a<< b>>\n2. <<c>> d\nWhere it fires: 90%" in body
    assert "Promoted outputs: x, y" in body and "Suppressed outputs: z" in body
    worked_labels = [parse_label(answer).label for _, answer in WORKED_EXAMPLES]
    assert len(set(worked_labels)) == len(worked_labels) and not any("(" in label for label in worked_labels)
    assert LABEL_SCHEMA["json_schema"]["schema"]["required"] == ["label", "explanation"]


def test_where_it_fires_gives_role_shares_and_turn_coverage():
    text = where_it_fires(
        {"assistant": 970, "user": 20, "text": 12, "system": 0, "template": 1},
        {"assistant": (96, 100), "user": (1, 100), "text": (0, 0)},
    )
    assert text == (
        "Where it fires: 97% of its firing tokens are assistant turn, 2% user turn, 1% plain text; "
        "it fires in 96% of assistant turns and 1% of user turns."
    )
    assert where_it_fires({"assistant": 0}, {}) == ""
    assert where_it_fires({"text": 5}, {}) == "Where it fires: 100% of its firing tokens are plain text."


@pytest.mark.parametrize(
    "text,label",
    [
        ('{"label": "refusals", "explanation": "Fires when declining."}', "refusals"),
        ('Sure! Here it is: {"label": "units of measure", "explanation": "x"} Hope it helps', "units of measure"),
        ("Label: chocolate in recipes\nExplanation: fires on chocolate.", "chocolate in recipes"),
        ('{"label": " \\"quoted\\" "}', "quoted"),
    ],
)
def test_parse_label_accepts_json_and_fallbacks(text, label):
    assert parse_label(text).label == label


@pytest.mark.parametrize(
    "text",
    [
        "I cannot tell.",
        '{"label": ""}',
        '{"name": "x"}',
        '{"label": 3}',
        '{"label": "' + "word " * 40 + '"}',
        '{"label": "trunc',
        "[" * 100_000,
        '{"label": ' + "[" * 100_000 + "}",
    ],
)
def test_parse_label_rejects_garbage(text):
    with pytest.raises(InvalidOutput):
        parse_label(text)


@pytest.mark.parametrize(
    "text, label",
    [
        ('{"label": "<<us>>"}', "us"),
        ('{"label": "the pronoun <<us>> in replies"}', "the pronoun us in replies"),
        ('{"label": "one two three four five six seven eight nine ten"}', "one two three four five six seven eight"),
        ('{"label": "' + "abcdefghij " * 7 + '"}', " ".join(["abcdefghij"] * 5)),  # 60 characters at a word
    ],
)
def test_labels_keep_the_asked_length_at_a_word_and_never_the_markers(text, label):
    parsed = parse_label(text)
    assert parsed.label == label
    assert len(parsed.label) <= MAX_LABEL_CHARS and len(parsed.label.split()) <= MAX_LABEL_WORDS


def test_a_label_of_only_markers_or_one_endless_word_is_invalid():
    for text in ('{"label": "<<>>"}', '{"label": "' + "x" * 100 + '"}'):
        with pytest.raises(InvalidOutput):
            parse_label(text)
