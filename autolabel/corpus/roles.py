"""Token ids with a role and a turn index per token.

Chats are rendered with the tokenizer's own chat template, then each message's
content is located in the rendered string and tokens are tagged through the
tokenizer's character offsets. This works for templates without
`{% generation %}` tags (SmolLM2's has none). Everything the template writes
(markers such as `<|im_start|>assistant\\n`, `<|im_end|>`, BOS) is tagged
`template`, except a default system prompt that a template injects when the chat
has none (SmolLM2's does): that text is tagged `system` and counts as turn 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from autolabel.config import ROLES
from autolabel.corpus.documents import Document, Message
from autolabel.errors import AutolabelError

# A role's code is its place in config.ROLES, which is also the store's token_role enum order: the windows
# read the stored enum as these codes, so there is one order, owned there.
ROLE_NAMES = list(ROLES)
ROLE_CODES = {role: code for code, role in enumerate(ROLE_NAMES)}


@dataclass
class TokenizedDoc:
    doc_id: str
    token_ids: np.ndarray  # [n_tokens] int32
    roles: np.ndarray  # [n_tokens] uint8, codes of ROLE_CODES
    turns: np.ndarray  # [n_tokens] int16, turn index in the rendered chat (0 for plain text)

    def role_names(self) -> list[str]:
        return [ROLE_NAMES[r] for r in self.roles]


def render_chat(tokenizer, messages: list[Message], doc_id: str, add_generation_prompt: bool = False) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise AutolabelError(
            f"the tokenizer has no chat template, so chat document {doc_id} cannot be rendered; "
            f"use a chat model or give the corpus as plain text"
        )
    try:
        return tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages],
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )
    except Exception as err:  # jinja2 TemplateError, or raise_exception() inside the template
        raise AutolabelError(
            f"the chat template failed to render document {doc_id}: {err}. Check the message roles "
            f"and order this template accepts, or fix the template"
        ) from err


def _content_spans(tokenizer, rendered: str, document: Document) -> list[tuple[int, int]]:
    """Character span of each message's content in the rendered chat.

    The chat is rendered a second time with a unique placeholder per message, so
    content that repeats template text (a user who types "assistant") cannot be
    mistaken for a marker; the template pieces around the placeholders must then
    rebuild the real rendering with the contents put back (as given, or stripped
    for templates that trim).
    """
    placeholders = [f"\ue000{i}\ue001" for i in range(len(document.messages))]
    skeleton = render_chat(
        tokenizer, [Message(m.role, p) for m, p in zip(document.messages, placeholders, strict=False)], document.doc_id
    )
    pieces, rest = [], skeleton
    for placeholder in placeholders:
        before, found, rest = rest.partition(placeholder)
        if not found:
            break
        pieces.append(before)
    else:
        for clean in (lambda c: c, str.strip):
            contents = [clean(m.content) for m in document.messages]
            if "".join(p + c for p, c in zip(pieces, contents, strict=False)) + rest == rendered:
                spans, cursor = [], 0
                for piece, content in zip(pieces, contents, strict=False):
                    cursor += len(piece)
                    spans.append((cursor, cursor + len(content)))
                    cursor += len(content)
                return spans
    raise AutolabelError(
        f"the chat template rewrites the content of document {document.doc_id}, so its tokens "
        f"cannot be tagged by role; use a template that copies message content verbatim"
    )


def _injected_system_span(tokenizer, rendered: str, document: Document) -> tuple[int, int] | None:
    """The span of a system prompt the template adds on its own, if it adds one."""
    if document.messages[0].role == "system":
        return None
    placeholder = "\ue000system\ue001"
    try:
        with_system = render_chat(tokenizer, [Message("system", placeholder), *document.messages], document.doc_id)
    except AutolabelError:  # templates that refuse a system message inject none either
        return None
    head, found, tail = with_system.partition(placeholder)
    if found and len(rendered) > len(head) + len(tail) and rendered.startswith(head) and rendered.endswith(tail):
        return len(head), len(rendered) - len(tail)
    return None


def tokenize_chat(tokenizer, document: Document) -> TokenizedDoc:
    rendered = render_chat(tokenizer, document.messages, document.doc_id)
    spans = _content_spans(tokenizer, rendered, document)
    span_roles = [m.role for m in document.messages]
    injected = _injected_system_span(tokenizer, rendered, document)
    if injected is not None:
        spans, span_roles = [injected, *spans], ["system", *span_roles]
    encoded = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
    offsets = np.asarray(encoded["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    first, last = offsets[:, 0], offsets[:, 1]
    starts = np.asarray([s for s, _ in spans])
    # Template text before turn i's content (its opening markers) belongs to turn i.
    turns = np.minimum(np.searchsorted(starts, first, side="left"), len(spans) - 1).astype(np.int16)
    roles = np.full(len(offsets), ROLE_CODES["template"], dtype=np.uint8)
    for i, (span_start, span_end) in enumerate(spans):
        inside = (first < span_end) & (last > span_start)  # any character inside the content
        roles[inside] = ROLE_CODES[span_roles[i]]
        turns[inside] = i
    return TokenizedDoc(document.doc_id, np.asarray(encoded["input_ids"], dtype=np.int32), roles, turns)


def tokenize_text(tokenizer, document: Document) -> TokenizedDoc:
    encoded = tokenizer(document.text, add_special_tokens=True)
    ids = np.asarray(encoded["input_ids"], dtype=np.int32)
    special = np.isin(ids, np.asarray(tokenizer.all_special_ids, dtype=np.int32))
    roles = np.where(special, ROLE_CODES["template"], ROLE_CODES["text"]).astype(np.uint8)
    return TokenizedDoc(document.doc_id, ids, roles, np.zeros(len(ids), dtype=np.int16))


def tokenize_document(tokenizer, document: Document) -> TokenizedDoc:
    if document.kind == "chat":
        return tokenize_chat(tokenizer, document)
    return tokenize_text(tokenizer, document)
