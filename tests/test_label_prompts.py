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
    by_category,
    explain_messages,
    firing_tokens,
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


def test_firing_tokens_counts_each_token_once_per_example_whitespace_and_case_aside():
    windows = [
        ([" He", " said", " it", " said"], [0.0, 4.0, 0.0, 3.0]),  # ' said' twice in one example counts once
        (["She", " Said", " no", "."], [0.0, 2.0, 0.1, 0.0]),  # 0.1 is under a quarter of the peak
        (["they", " told", " us", " x"], [0.0, 1.0, 0.0, 0.0]),
    ]
    assert firing_tokens(windows, 0.25) == (
        "Firing tokens: 'said' in 2 of 3 examples, 'told' in 1 of 3; 33% of the tokens shown fire."
    )


def test_firing_tokens_calls_a_feature_of_most_tokens_or_of_long_runs_whole_stretches():
    windows = [(["a", "b", "c", "d"], [1.0, 2.0, 1.0, 0.0]), (["e", "f"], [3.0, 3.0])]
    assert firing_tokens(windows, 0.25) == (
        "Firing tokens: 83% of the tokens shown fire, in stretches of 2 tokens on average (whole stretches of text)."
    )
    # 40% of the tokens fire, but in runs of 4: a kind of text (a user's question), not a word
    long_runs = [(list("abcdefghij"), [0.0, 1, 1, 1, 1, 0, 0, 0, 0, 0]), (list("klmnopqrst"), [0.0] * 6 + [2.0] * 4)]
    assert firing_tokens(long_runs, 0.25) == (
        "Firing tokens: 40% of the tokens shown fire, in stretches of 4 tokens on average (whole stretches of text)."
    )
    # digits in runs of 3 are still a word feature: its tokens are named
    digits = [(["in", "2", "0", "0", "4", "x", "y", "z"], [0.0, 1, 1, 1, 0, 0, 0, 0])]
    assert firing_tokens(digits, 0.25) == (
        "Firing tokens: '0' in 1 of 1 examples, '2' in 1 of 1; 38% of the tokens shown fire."
    )
    assert firing_tokens([(["a"], [0.0])], 0.25) == ""
    assert firing_tokens([(["\n", "x", "y"], [2.0, 0.0, 0.0])], 0.25) == (
        "Firing tokens: a space or line break in 1 of 1 examples; 33% of the tokens shown fire."
    )


def test_messages_carry_the_firing_tokens_line_after_the_examples_as_the_worked_examples_do():
    evidence = Evidence("Where it fires: 90% of its firing tokens are plain text.", [], [])
    body = explain_messages(
        ["a<< b>>"], evidence, "Firing tokens: 'b' in 1 of 1 examples; 50% of the tokens shown fire."
    )
    assert body[-1]["content"] == (
        "Examples:\n1. a<< b>>\nFiring tokens: 'b' in 1 of 1 examples; 50% of the tokens shown fire.\n"
        "Where it fires: 90% of its firing tokens are plain text."
    )
    assert all("\nFiring tokens: " in shown for shown, _ in WORKED_EXAMPLES)
    assert "Firing tokens" not in explain_messages(["a<< b>>"], evidence)[-1]["content"]


def test_by_category_shows_a_category_that_stands_out_beside_its_share_of_all_tokens():
    text = by_category({"news": 970, "chitchat": 20, "recipe": 10}, {"news": 340, "chitchat": 390, "recipe": 270})
    assert text == "By category: 97% of its firing tokens are in news (34% of all tokens)."
    assert by_category({"news": 75, "chitchat": 25}, {"news": 20, "chitchat": 80}) == (
        "By category: 75% of its firing tokens are in news (20% of all tokens), 25% in chitchat (80%)."
    )
    # no category stands out: under half the firing tokens, or no more than the category's share of the corpus
    assert by_category({"news": 40, "chitchat": 30, "recipe": 30}, {"news": 10, "chitchat": 10, "recipe": 80}) == ""
    assert by_category({"news": 60, "chitchat": 40}, {"news": 50, "chitchat": 50}) == ""
    spread = {f"c{i}": 1 for i in range(25)}  # every category under 5% of the firing tokens
    assert by_category(spread, spread) == ""
    assert by_category({"news": 5}, {"news": 10}) == ""  # one category says nothing
    assert by_category({"news": 0, "chitchat": 0}, {"news": 5, "chitchat": 5}) == ""


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
    # turns it hardly fires in say nothing a small labeler should read as a turn feature
    assert where_it_fires({"text": 50, "user": 1}, {"user": (1, 100), "assistant": (0, 100)}) == (
        "Where it fires: 98% of its firing tokens are plain text, 2% user turn."
    )
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
