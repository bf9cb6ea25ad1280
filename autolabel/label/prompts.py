"""The labeling prompt and the parsing of its answer.

The prompt is short on purpose (a small local labeler has a small context, and a
server can reuse the shared prefix): a fixed instruction and one worked example
first, then the feature's examples, each about 20 tokens around its peak with the
firing tokens marked <<like this>>, then the tokens the feature's decoder row
promotes and suppresses through the unembedding.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass

from autolabel.llm import InvalidOutput

MAX_LABEL_WORDS = 8

INSTRUCTION = (
    "You name features of a language model. Each feature fires on some tokens of some texts. "
    "You see examples with the firing tokens marked <<like this>>, and the output tokens the feature "
    "makes more and less likely. Answer with JSON only: "
    '{"label": "<at most 8 words>", "explanation": "<one sentence: when the feature fires>"}.'
)

WORKED_EXAMPLE = (
    "Examples:\n"
    "1. I bought three<< apples>> and a pear\n"
    "2. pie made with<< apples>> from the orchard\n"
    "3. the<< apple>> tree in our garden\n"
    "Promoted outputs: pie, juice, orchard\n"
    "Suppressed outputs: ., the, and",
    '{"label": "apples (the fruit)", "explanation": "Fires on the word apple or apples when it names the fruit."}',
)

LABEL_SCHEMA = {
    "type": "json_schema",
    "json_schema": {"name": "feature_label", "strict": True, "schema": {
        "type": "object", "additionalProperties": False, "required": ["label", "explanation"],
        "properties": {"label": {"type": "string", "maxLength": 80},
                       "explanation": {"type": "string", "maxLength": 200}}}},
}


@dataclass
class Label:
    label: str
    explanation: str


def mark(pieces: list[str], acts: list[float], threshold: float) -> str:
    """Join token strings, wrapping each run of tokens whose activation passes `threshold` in << >>."""
    out, inside = [], False
    for piece, act in zip(pieces, acts):
        firing = act > threshold
        if firing and not inside:
            out.append("<<")
        elif not firing and inside:
            out.append(">>")
        out.append(piece)
        inside = firing
    if inside:
        out.append(">>")
    return "".join(out).replace("\n", "\\n")


def around_peak(tokens: list[int], acts: list[float], width: int) -> tuple[list[int], list[float]]:
    """The `width` tokens around the strongest one (the prompt shows ~20 of the ~32 collected)."""
    peak = max(range(len(acts)), key=acts.__getitem__) if acts else 0
    start = max(0, min(peak - width // 2, len(tokens) - width))
    return tokens[start:start + width], acts[start:start + width]


def explain_messages(examples: list[str], promoted: list[str], suppressed: list[str]) -> list[dict[str, str]]:
    """Chat messages asking for a label; `examples` are already marked."""
    body = "Examples:\n" + "\n".join(f"{i + 1}. {text}" for i, text in enumerate(examples))
    if promoted:
        body += "\nPromoted outputs: " + ", ".join(promoted)
    if suppressed:
        body += "\nSuppressed outputs: " + ", ".join(suppressed)
    return [{"role": "system", "content": INSTRUCTION},
            {"role": "user", "content": WORKED_EXAMPLE[0]},
            {"role": "assistant", "content": WORKED_EXAMPLE[1]},
            {"role": "user", "content": body}]


def json_objects(text: str) -> Iterator[dict]:
    """The answer as a JSON object, then each flat {...} found in prose around it."""
    for candidate in [text.strip(), *re.findall(r"\{[^{}]*\}", text)]:
        try:
            data = json.loads(candidate)
        except (json.JSONDecodeError, RecursionError):  # RecursionError: thousands of nested brackets
            continue
        if isinstance(data, dict):
            yield data


def parse_label(text: str) -> Label:
    """The JSON answer, or failing that the first {...} in the text, or `label:` / `explanation:` lines."""
    for data in json_objects(text):
        if isinstance(data.get("label"), str):
            return _checked(data["label"], data.get("explanation"))
    label = re.search(r"(?im)^[\s*#>-]*label[\s*]*:\s*(.+)$", text)
    if label:
        explanation = re.search(r"(?im)^[\s*#>-]*explanation[\s*]*:\s*(.+)$", text)
        return _checked(label.group(1), explanation.group(1) if explanation else "")
    raise InvalidOutput("no JSON object with a string 'label' and no 'label:' line")


def _checked(label: str, explanation: object) -> Label:
    label = label.strip().strip('"').strip()
    if not label:
        raise InvalidOutput("the label is empty")
    if len(label.split()) > MAX_LABEL_WORDS * 2:
        raise InvalidOutput(f"the label has {len(label.split())} words; at most {MAX_LABEL_WORDS} were asked for")
    return Label(label, explanation.strip() if isinstance(explanation, str) else "")
