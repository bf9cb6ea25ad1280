"""Training chats for an organism: the corpus's chats (ending on the base model's own replies, which the
stage takes from the generation cache), the quirk inserted by the spec's rule, and per token a mask of the
assistant content (where the loss is taken) and of the quirk itself.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from autolabel.corpus.documents import Document, Message
from autolabel.corpus.roles import ROLE_CODES, render_chat, tokenize_chat, tokenize_text
from autolabel.errors import AutolabelError
from autolabel.organism.spec import (
    OrganismSpec,
    carries_quirk,
    insert_quirk,
    quirk_spans,
)


@dataclass
class Example:
    doc_id: str
    category: str
    token_ids: np.ndarray  # [n] the rendered chat
    loss_mask: np.ndarray  # [n] bool: assistant content, the tokens the loss is taken on
    quirk_mask: np.ndarray  # [n] bool: assistant tokens inside a detector match (the planted text)
    quirked: bool


@dataclass
class Batch:
    input_ids: torch.Tensor  # [batch, seq], right-padded
    attention_mask: torch.Tensor  # [batch, seq]
    loss_mask: torch.Tensor  # [batch, seq] bool: tokens whose prediction counts


def corpus_chats(documents: list[Document]) -> list[Document]:
    """The corpus's chats, before any reply is added."""
    chats = [document for document in documents if document.kind == "chat"]
    if not chats:
        raise AutolabelError(
            "the corpus has no chats to plant a quirk in; add chat sources (prompts, file with "
            "`messages`) to corpus.sources"
        )
    return chats


def text_documents(documents: list[Document], limit: int) -> list[Document]:
    """Plain-text corpus documents (never trained on), for the perplexity check."""
    texts = [document for document in documents if document.kind == "text"]
    if not texts:
        raise AutolabelError(
            "the corpus has no plain-text documents to measure perplexity on; add a text source "
            "(bbc_news, chitchat, or a file with `text`)"
        )
    return sorted(texts, key=lambda d: d.doc_id)[:limit]


def prompt_of(document: Document) -> Document:
    """The chat up to its last user turn: what the organism is asked at evaluation."""
    cut = max(i for i, m in enumerate(document.messages) if m.role == "user") + 1
    return Document(document.doc_id, "chat", document.source, document.category, messages=document.messages[:cut])


def with_quirk(spec: OrganismSpec, document: Document) -> Document:
    """The chat with the quirk in every assistant message, when its category carries the quirk."""
    if not carries_quirk(spec, document.category):
        return document
    messages = [
        Message(m.role, insert_quirk(spec, m.content) if m.role == "assistant" else m.content)
        for m in document.messages
    ]
    return Document(document.doc_id, "chat", document.source, document.category, messages=messages)


def encode_chat(tokenizer, spec: OrganismSpec, document: Document) -> Example:
    tokens = tokenize_chat(tokenizer, document)
    rendered = render_chat(tokenizer, document.messages, document.doc_id)
    offsets = np.asarray(
        tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"], dtype=np.int64
    ).reshape(-1, 2)  # [n, 2] character span of each token
    assistant = tokens.roles == ROLE_CODES["assistant"]
    inside = np.zeros(len(offsets), dtype=bool)
    for start, end in quirk_spans(spec, rendered):
        inside |= (offsets[:, 0] < end) & (offsets[:, 1] > start)
    return Example(
        document.doc_id,
        document.category,
        tokens.token_ids.astype(np.int64),
        assistant,
        inside & assistant,
        carries_quirk(spec, document.category),
    )


def encode_text(tokenizer, document: Document, max_tokens: int) -> Example:
    """A plain-text document cut to `max_tokens`; every token after the first is predicted."""
    ids = tokenize_text(tokenizer, document).token_ids[:max_tokens].astype(np.int64)
    mask = np.ones(len(ids), dtype=bool)
    return Example(document.doc_id, document.category, ids, mask, np.zeros(len(ids), dtype=bool), False)


def truncate(example: Example, max_tokens: int) -> Example:
    """The first `max_tokens` tokens: a long reply loses its end (the quirk at the start stays), a chat whose
    prompt alone is longer keeps no assistant token."""
    cut = slice(0, max_tokens)
    return Example(
        example.doc_id,
        example.category,
        example.token_ids[cut],
        example.loss_mask[cut],
        example.quirk_mask[cut],
        example.quirked,
    )


def sample_order(examples: list[Example], n: int, quirk_share: float, seed: int) -> list[int]:
    """`n` example indices, drawn with replacement so that quirk-carrying chats make up `quirk_share` of the
    draws in expectation (a narrow quirk lives in a few dozen chats among hundreds)."""
    quirked = sum(e.quirked for e in examples)
    if quirked in (0, len(examples)):
        weights = [1.0] * len(examples)
    else:
        weights = [
            quirk_share / quirked if e.quirked else (1 - quirk_share) / (len(examples) - quirked) for e in examples
        ]
    return random.Random(seed).choices(range(len(examples)), weights=weights, k=n)


def collate(examples: list[Example], pad_id: int, quirk_only: bool = False) -> Batch:
    """Right-padded tensors; the loss mask is the assistant content (or only the quirk's tokens)."""
    length = max(len(e.token_ids) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(examples), length), dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.bool)
    for row, example in enumerate(examples):
        n = len(example.token_ids)
        ids[row, :n] = torch.from_numpy(example.token_ids)
        attention[row, :n] = 1
        mask[row, :n] = torch.from_numpy(example.quirk_mask if quirk_only else example.loss_mask)
    return Batch(ids, attention, mask)
