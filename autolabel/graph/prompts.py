"""The prompt a graph explains: plain text, or a chat file rendered with the model's chat template.

Tokens keep their roles (system / user / assistant / template / text) through the corpus tokenizers in
corpus/roles.py, so a graph of a chat shows which turn every position belongs to. A chat that ends on a user
turn gets the template's assistant header appended (tagged `template`), so the targets are the assistant's
first token, which is what a reader of a chat graph asks about.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from autolabel.corpus.documents import Document, document_from_row
from autolabel.corpus.roles import ROLE_CODES, ROLE_NAMES, render_chat, tokenize_chat, tokenize_text
from autolabel.errors import AutolabelError


@dataclass
class GraphPrompt:
    text: str  # what the model reads: the prompt, or the rendered chat
    token_ids: list[int]
    roles: list[str]  # one per token
    messages: list[dict] | None = None  # the chat as given, when it is one


def require_text(text: str) -> None:
    if not text.strip():
        raise AutolabelError(
            'the prompt is empty; pass the text to explain, e.g. autolabel graph "The capital of '
            'France is", or a chat with --chat FILE'
        )


def text_prompt(tokenizer, text: str) -> GraphPrompt:
    require_text(text)
    tokens = tokenize_text(tokenizer, Document("graph", "text", "graph", "graph", text=text))
    return GraphPrompt(text, tokens.token_ids.tolist(), tokens.role_names())


def read_chat(path: Path) -> Document:
    """A chat file: a JSON list of {role, content} messages, or an object with such a `messages` list."""
    if not path.is_file():
        raise AutolabelError(
            f"chat file {path} does not exist; pass a JSON file holding a list of "
            f'{{"role": ..., "content": ...}} messages'
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AutolabelError(
            f"chat file {path} is not valid UTF-8 JSON ({err}); it must hold a list of "
            f'{{"role": ..., "content": ...}} messages'
        ) from err
    messages = raw.get("messages") if isinstance(raw, dict) else raw
    if not isinstance(messages, list):
        raise AutolabelError(
            f'chat file {path} is not a chat: it must hold a list of {{"role": ..., "content": '
            f"...}} messages, or an object with a `messages` list (found {type(raw).__name__})"
        )
    return document_from_row({"messages": messages}, f"chat file {path}", "graph", "graph")


def chat_prompt(tokenizer, chat: Document) -> GraphPrompt:
    tokens = tokenize_chat(tokenizer, chat)
    ids, roles = tokens.token_ids.tolist(), tokens.role_names()
    text = render_chat(tokenizer, chat.messages, chat.doc_id)
    if chat.messages[-1].role == "user":
        opened = render_chat(tokenizer, chat.messages, chat.doc_id, add_generation_prompt=True)
        if opened.startswith(text) and len(opened) > len(text):
            header = tokenizer(opened[len(text) :], add_special_tokens=False)["input_ids"]
            ids, roles, text = ids + list(header), roles + [ROLE_NAMES[ROLE_CODES["template"]]] * len(header), opened
    return GraphPrompt(text, ids, roles, [{"role": m.role, "content": m.content} for m in chat.messages])


def check_length(prompt: GraphPrompt, context: int) -> None:
    if len(prompt.token_ids) > context:
        raise AutolabelError(
            f"the prompt is {len(prompt.token_ids)} tokens, over the model's context of {context}; shorten it"
        )


def first_is_special(tokenizer, prompt: GraphPrompt) -> bool:
    return bool(np.isin(prompt.token_ids[:1], tokenizer.all_special_ids).any())
