"""Role tagging on the real SmolLM2 tokenizer, against hand-checked positions."""

from __future__ import annotations

import copy

import pytest

from autolabel.corpus.documents import Document, chat
from autolabel.corpus.roles import tokenize_document
from autolabel.corpus.windows import windows
from autolabel.errors import AutolabelError


def tagged(tokenizer, document):
    tokens = tokenize_document(tokenizer, document)
    return [
        (tokenizer.decode([t]), r, int(u))
        for t, r, u in zip(tokens.token_ids, tokens.role_names(), tokens.turns, strict=True)
    ]


def test_chat_roles_with_injected_system_prompt(tokenizer):
    rows = tagged(tokenizer, chat("d", "s", "c", ("user", "Hello there"), ("assistant", "Hi! How can I help?")))
    assert len(rows) == 41
    # <|im_start|>system\n  then SmolLM2's default system prompt, which the template injects
    assert [r[1] for r in rows[0:3]] == ["template"] * 3
    assert "".join(r[0] for r in rows[3:19]) == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert {r[1] for r in rows[3:19]} == {"system"} and {r[2] for r in rows[0:19]} == {0}
    # <|im_end|>\n<|im_start|>user\n opens turn 1
    assert rows[19:24] == [
        ("<|im_end|>", "template", 1),
        ("\n", "template", 1),
        ("<|im_start|>", "template", 1),
        ("user", "template", 1),
        ("\n", "template", 1),
    ]
    assert rows[24:26] == [("Hello", "user", 1), (" there", "user", 1)]
    assert [(r[1], r[2]) for r in rows[26:32]] == [("template", 2)] * 6  # ...<|im_start|>assistant\n
    assert "".join(r[0] for r in rows[32:39]) == "Hi! How can I help?"
    assert {(r[1], r[2]) for r in rows[32:39]} == {("assistant", 2)}
    assert rows[39:] == [("<|im_end|>", "template", 2), ("\n", "template", 2)]


def test_explicit_system_message_and_marker_lookalike_content(tokenizer):
    rows = tagged(tokenizer, chat("d", "s", "c", ("system", "Be brief."), ("user", "user"), ("assistant", "assistant")))
    assert "".join(r[0] for r in rows if r[1] == "system") == "Be brief."
    # the words "user" and "assistant" in the markers stay template; the messages are tagged
    assert [(r[0], r[2]) for r in rows if r[1] == "user"] == [("user", 1)]
    assert "".join(r[0] for r in rows if r[1] == "assistant") == "assistant"
    assert {r[2] for r in rows if r[1] == "assistant"} == {2}
    assert "You are a helpful" not in "".join(r[0] for r in rows)


def test_plain_text_is_all_text(tokenizer):
    rows = tagged(tokenizer, Document("t", "text", "s", "news", text="Markets rose on Monday."))
    assert "".join(r[0] for r in rows) == "Markets rose on Monday."
    assert {(r[1], r[2]) for r in rows} == {("text", 0)}


def test_template_that_fails_or_is_missing(tokenizer):
    document = chat("doc-7", "s", "c", ("user", "hi"), ("user", "again"))
    strict = copy.deepcopy(tokenizer)
    strict.chat_template = "{{ raise_exception('Conversation roles must alternate user/assistant') }}"
    with pytest.raises(AutolabelError, match="chat template failed to render document doc-7.*alternate"):
        tokenize_document(strict, document)
    strict.chat_template = None
    with pytest.raises(AutolabelError, match="no chat template"):
        tokenize_document(strict, document)
    strict.chat_template = "{% for m in messages %}{{ m['content'] | upper }}{% endfor %}"
    with pytest.raises(AutolabelError, match="rewrites the content of document doc-7"):
        tokenize_document(strict, document)


def test_windows_cover_document_without_overlap():
    assert windows(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert windows(8, 4) == [(0, 4), (4, 8)]
    assert windows(0, 4) == []
