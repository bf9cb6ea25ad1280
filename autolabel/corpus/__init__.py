"""Documents and chat transcripts -> token ids with a role and a category per token."""

from autolabel.corpus.build import CorpusSummary, build_corpus, corpus_id_for
from autolabel.corpus.documents import Document, Message
from autolabel.corpus.roles import ROLE_CODES, ROLE_NAMES, TokenizedDoc, tokenize_document
from autolabel.corpus.windows import Window, iter_windows, windows

__all__ = [
    "CorpusSummary",
    "Document",
    "Message",
    "ROLE_CODES",
    "ROLE_NAMES",
    "TokenizedDoc",
    "Window",
    "build_corpus",
    "corpus_id_for",
    "iter_windows",
    "tokenize_document",
    "windows",
]
