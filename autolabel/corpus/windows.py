"""Stored documents -> fixed-length windows, the unit that collection and training run on.

Documents are stored whole; a long one is cut into consecutive, non-overlapping
windows of at most `ctx_len` tokens, each keeping its roles, turns and offset so
an example can always be traced back to its place in the document.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from autolabel.store import Store


@dataclass
class Window:
    doc_id: str
    category: str
    start: int  # offset of the first token in the document
    token_ids: np.ndarray  # [n] int32
    roles: np.ndarray  # [n] uint8, codes of autolabel.corpus.roles.ROLE_CODES
    turns: np.ndarray  # [n] int16


def windows(n_tokens: int, ctx_len: int) -> list[tuple[int, int]]:
    """Consecutive, non-overlapping [start, end) windows that cover a document."""
    return [(start, min(start + ctx_len, n_tokens)) for start in range(0, n_tokens, ctx_len)]


def iter_windows(
    store: Store,
    corpus_id: str,
    ctx_len: int | None = None,
    docs_per_read: int = 256,
    first_doc: str = "",
    last_doc: str | None = None,
) -> Iterator[Window]:
    """Every window of a corpus (or of its documents first_doc..last_doc) in doc_id order,
    reading a bounded number of documents at a time."""
    if ctx_len is None:
        ctx_len = store.one("SELECT ctx_len FROM corpora WHERE corpus_id = ?", [corpus_id])[0]
    upper = "" if last_doc is None else "AND t.doc_id <= ? "
    bounds = [] if last_doc is None else [last_doc]
    previous, comparison = first_doc, ">="
    while True:
        rows = store.rows(
            "SELECT t.doc_id, d.category, t.token_ids, list_transform(t.roles, lambda r: enum_code(r)), t.turns "
            "FROM doc_tokens t "
            f"JOIN documents d USING (corpus_id, doc_id) WHERE t.corpus_id = ? AND t.doc_id {comparison} ? {upper}"
            "ORDER BY t.doc_id LIMIT ?",
            [corpus_id, previous, *bounds, docs_per_read],
        )
        if not rows:
            return
        for doc_id, category, token_ids, roles, turns in rows:
            ids = np.asarray(token_ids, dtype=np.int32)
            codes = np.asarray(roles, dtype=np.uint8)  # the enum and ROLE_CODES both follow config.ROLES
            turn_ids = np.asarray(turns, dtype=np.int16)
            for start, end in windows(len(ids), ctx_len):
                yield Window(doc_id, category, start, ids[start:end], codes[start:end], turn_ids[start:end])
        previous, comparison = rows[-1][0], ">"


def split_heldout(windows: list[Window], every: int) -> tuple[list[Window], list[Window]]:
    """(train, held-out): every `every`-th document by a stable hash of its id is held out whole."""
    held = [w for w in windows if zlib.crc32(w.doc_id.encode()) % every == 0]
    return [w for w in windows if zlib.crc32(w.doc_id.encode()) % every != 0], held
