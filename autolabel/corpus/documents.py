"""Documents (plain text or chat transcripts) and how they are read from user files.

User files are untrusted: every problem is reported with the file, the row and the
field, before anything is written to the store.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from autolabel.errors import AutolabelError

MESSAGE_ROLES = ("system", "user", "assistant")


@dataclass
class Message:
    role: str
    content: str


@dataclass
class Document:
    doc_id: str
    kind: Literal["chat", "text"]
    source: str
    category: str
    text: str | None = None
    messages: list[Message] = field(default_factory=list)

    @property
    def needs_reply(self) -> bool:
        """A chat that ends on a user turn gets an assistant reply from the subject model."""
        return self.kind == "chat" and self.messages[-1].role == "user"


def chat(doc_id: str, source: str, category: str, *turns: tuple[str, str]) -> Document:
    return Document(doc_id, "chat", source, category, messages=[Message(r, c) for r, c in turns])


def document_from_row(row: dict[str, Any], where: str, source: str, default_category: str) -> Document:
    """Build a Document from one JSONL/Parquet row: {"text": ...} or {"messages": [...]}."""
    category = row.get("category") or default_category
    if not isinstance(category, str):
        raise AutolabelError(f"{where}: field 'category' must be a string, got {type(category).__name__}")
    doc_id = str(row.get("id") if row.get("id") is not None else where.rsplit(" ", 1)[-1])
    messages, text = row.get("messages"), row.get("text")
    if messages is not None:
        if not isinstance(messages, list) or not messages:
            raise AutolabelError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects")
        parsed = []
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise AutolabelError(f"{where}: message {i} must be an object with 'role' and 'content'")
            role, content = message["role"], message["content"]
            if role not in MESSAGE_ROLES:
                raise AutolabelError(
                    f"{where}: message {i} has role {role!r}; allowed roles are {', '.join(MESSAGE_ROLES)} "
                    f"(map other speakers to one of them)"
                )
            if not isinstance(content, str) or not content.strip():
                raise AutolabelError(f"{where}: message {i} ({role}) has empty or non-string content")
            parsed.append(Message(role, content))
        return Document(f"{source}:{doc_id}", "chat", source, category, messages=parsed)
    if isinstance(text, str):
        if not text.strip():
            raise AutolabelError(f"{where}: field 'text' is empty")
        return Document(f"{source}:{doc_id}", "text", source, category, text=text)
    raise AutolabelError(f"{where}: each row needs a 'text' string or a 'messages' list (found fields {sorted(row)})")


def _check_utf8(path: Path) -> None:
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise AutolabelError(
            f"{path}: byte {err.start} (line {line}) is not valid UTF-8; re-encode the file as UTF-8 "
            f"(for example `iconv -f latin1 -t utf-8`)"
        ) from err


def _file_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in {".jsonl", ".json"}:
        return "json"
    if suffix == ".parquet":
        return "parquet"
    if suffix in {".txt", ".md", ".text"}:
        return "text"
    raise AutolabelError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .parquet or .txt")


def load_file_documents(path_str: str, default_category: str) -> list[Document]:
    """Read documents from a file or a folder of files through `datasets`."""
    import datasets

    path = Path(path_str).expanduser()
    if not path.exists():
        raise AutolabelError(f"corpus file {path} does not exist; fix `path` in the corpus source or create the file")
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    documents: list[Document] = []
    datasets.disable_progress_bars()
    for file in files:
        fmt = _file_format(file)
        if fmt != "parquet":
            _check_utf8(file)
        source = file.stem
        if fmt != "parquet" and not file.read_bytes().strip():
            continue
        if fmt == "text":
            text = file.read_text(encoding="utf-8")
            if text.strip():
                documents.append(Document(f"{source}:0", "text", source, default_category, text=text))
            continue
        try:
            rows = datasets.load_dataset(fmt, data_files=str(file), split="train")
        except Exception as err:  # datasets wraps parser errors in several types
            raise AutolabelError(
                f"{file}: cannot parse as {fmt} ({type(err).__name__}: {err}); "
                f"a .jsonl file holds one JSON object per line"
            ) from err
        for i, row in enumerate(rows):
            documents.append(document_from_row(row, f"{file} row {i}", source, default_category))
    if not documents:
        raise AutolabelError(f"corpus source {path} holds no documents; add rows with 'text' or 'messages'")
    return documents
