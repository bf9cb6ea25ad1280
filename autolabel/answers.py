"""The shape of an LLM's JSON answer: the response_format that asks for it and the parser that finds it.

Labels, cluster names and steering judgements all ask for one flat JSON object with a schema, and all
read it the same forgiving way: the answer as JSON, else a flat {...} in prose around it (a small local
model often explains first), else `key:` lines. One owner, so a fix to the parsing reaches every caller.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator


def json_schema(name: str, properties: dict[str, dict]) -> dict:
    """An OpenAI response_format for one object holding exactly `properties`, all required."""
    return {
        "type": "json_schema",
        "json_schema": {
            "name": name,
            "strict": True,
            "schema": {
                "type": "object",
                "additionalProperties": False,
                "required": list(properties),
                "properties": properties,
            },
        },
    }


def json_objects(text: str) -> Iterator[dict]:
    """The answer as a JSON object, then each flat {...} found in prose around it."""
    for candidate in [text.strip(), *re.findall(r"\{[^{}]*\}", text)]:
        try:
            data = json.loads(candidate)
        except (json.JSONDecodeError, RecursionError):  # RecursionError: thousands of nested brackets
            continue
        if isinstance(data, dict):
            yield data


def answer_fields(text: str, key: str, detail: str) -> tuple[str, object] | None:
    """(`key`, `detail`) from the first JSON object with a string `key`, or from `key:` / `detail:` lines
    (detail "" when its line is missing); None when there is neither."""
    for data in json_objects(text):
        if isinstance(data.get(key), str):
            return data[key], data.get(detail)
    found = _line(text, key)
    return None if found is None else (found, _line(text, detail) or "")


def _line(text: str, key: str) -> str | None:
    match = re.search(rf"(?im)^[\s*#>-]*{re.escape(key)}[\s*]*:\s*(.+)$", text)
    return match.group(1) if match else None
