"""The labeling prompt and the parsing of its answer.

The prompt is short on purpose (a small local labeler has a small context, and a
server reuses the shared prefix): a fixed instruction and three worked examples of
different kinds (a word, a kind of turn, a topic, so labels stop copying one form),
then the feature's examples, each about 20 tokens around its peak with the firing
tokens marked <<like this>> and tagged with whose text it is and its document
category, then where the feature fires by role (no peer shows this: a feature of
the assistant's turn can only be named as one if the labeler sees that it fires on
97% of assistant turns and 1% of user turns), then the tokens its decoder row
promotes and suppresses through the unembedding.
"""

from __future__ import annotations

from dataclasses import dataclass

from autolabel.answers import answer_fields, json_schema
from autolabel.llm import InvalidOutput

MAX_LABEL_WORDS = 8
MAX_LABEL_CHARS = 60

# How the prompt names each role of the corpus (config.ROLES).
ROLE_NAMES = {
    "system": "system prompt",
    "user": "user turn",
    "assistant": "assistant turn",
    "template": "chat template",
    "text": "plain text",
}

INSTRUCTION = (
    "You name features of a language model. Each feature fires on some tokens of some texts. "
    "You see examples with the firing tokens marked <<like this>>, each tagged with whose text it is "
    "(plain text, system prompt, user turn, assistant turn, chat template) and its document category; "
    "where the feature fires by role; and the output tokens it makes more and less likely. "
    "Name what the MARKED tokens share: the same word, word family or symbol, named as such. Only when whole "
    "stretches of a text are marked, name the kind of text or turn, from the tags and where it fires. The "
    "topic of the unmarked text around them is not the label. Answer with JSON only: "
    '{"label": "<at most 8 words>", "explanation": "<one sentence: when the feature fires>"}.'
)

# (evidence, answer) pairs shown before the feature's own evidence: a word, a turn, a topic.
WORKED_EXAMPLES = [
    (
        "Examples:\n"
        "1. [plain text, recipes] I bought three<< apples>> and a pear\n"
        "2. [user turn, recipes] pie made with<< apples>> from the orchard\n"
        "3. [plain text, stories] the<< apple>> tree in our garden\n"
        "Where it fires: 80% of its firing tokens are plain text, 20% user turn.\n"
        "Promoted outputs: pie, juice, orchard\n"
        "Suppressed outputs: ., the, and",
        '{"label": "apples", "explanation": "Fires on the word apple or apples naming the fruit."}',
    ),
    (
        "Examples:\n"
        "1. [assistant turn, travel]<< Sure! Paris is lovely in spring>>\n"
        "2. [assistant turn, coding]<< You can sort the list with sorted()>>\n"
        "3. [assistant turn, chitchat]<< I'm glad you asked>>\n"
        "Where it fires: 97% of its firing tokens are assistant turn, 3% chat template; "
        "it fires in 96% of assistant turns and 1% of user turns.\n"
        "Promoted outputs: you, can, help",
        '{"label": "the assistant\'s reply", "explanation": "Fires throughout the assistant\'s turn in a chat, '
        'whatever the topic."}',
    ),
    (
        "Examples:\n"
        "1. [plain text, news] the<< jury>> found him guilty after a two-week<< trial>>\n"
        "2. [plain text, news] appeared before<< magistrates>> on Monday\n"
        "3. [user turn, legal] can my landlord take me to<< court>>\n"
        "Where it fires: 85% of its firing tokens are plain text, 15% user turn.\n"
        "Promoted outputs: judge, hearing, sentenced",
        '{"label": "courts and trials", "explanation": "Fires on words for courts, juries and legal proceedings."}',
    ),
]

LABEL_SCHEMA = json_schema(
    "feature_label",
    {
        "label": {"type": "string", "maxLength": 160},  # room to end a word
        "explanation": {"type": "string", "maxLength": 200},
    },
)


@dataclass
class Label:
    label: str
    explanation: str


def mark(pieces: list[str], acts: list[float], threshold: float) -> str:
    """Join token strings, wrapping each run of tokens whose activation passes `threshold` in << >>."""
    out, inside = [], False
    for piece, act in zip(pieces, acts, strict=True):
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
    return tokens[start : start + width], acts[start : start + width]


@dataclass
class Evidence:
    """What the labeler sees of one feature besides its examples."""

    where: str  # where_it_fires(...), or "" when the run has no role statistics
    promoted: list[str]
    suppressed: list[str]


def tagged(role: str | None, category: str | None, text: str) -> str:
    tags = [ROLE_NAMES.get(role or "", ""), category or ""]
    return f"[{', '.join(t for t in tags if t)}] {text}" if any(tags) else text


def where_it_fires(active_by_role: dict[str, int], turns_by_role: dict[str, tuple[int, int]]) -> str:
    """ "Where it fires: 81% of its firing tokens are assistant turn, 12% user turn; it fires in 95% of
    assistant turns and 3% of user turns." from role_stats (shares under 1% are left out)."""
    total = sum(active_by_role.values())
    if not total:
        return ""
    shares = sorted(((n / total, role) for role, n in active_by_role.items() if n / total >= 0.01), reverse=True)
    text = "Where it fires: " + ", ".join(
        f"{share:.0%}{' of its firing tokens are' if i == 0 else ''} {ROLE_NAMES[role]}"
        for i, (share, role) in enumerate(shares)
    )
    turns = [(active / n, role) for role, (active, n) in turns_by_role.items() if role in ("user", "assistant") and n]
    if turns:
        text += "; it fires in " + " and ".join(f"{share:.0%} of {ROLE_NAMES[role]}s" for share, role in turns)
    return text + "."


def explain_messages(examples: list[str], evidence: Evidence) -> list[dict[str, str]]:
    """Chat messages asking for a label; `examples` are already marked and tagged."""
    body = "Examples:\n" + "\n".join(f"{i + 1}. {text}" for i, text in enumerate(examples))
    if evidence.where:
        body += "\n" + evidence.where
    if evidence.promoted:
        body += "\nPromoted outputs: " + ", ".join(evidence.promoted)
    if evidence.suppressed:
        body += "\nSuppressed outputs: " + ", ".join(evidence.suppressed)
    worked = [
        message
        for shown, answer in WORKED_EXAMPLES
        for message in ({"role": "user", "content": shown}, {"role": "assistant", "content": answer})
    ]
    return [{"role": "system", "content": INSTRUCTION}, *worked, {"role": "user", "content": body}]


def parse_label(text: str) -> Label:
    """The JSON answer, or failing that the first {...} in the text, or `label:` / `explanation:` lines."""
    found = answer_fields(text, "label", "explanation")
    if found is None:
        raise InvalidOutput("no JSON object with a string 'label' and no 'label:' line")
    return _checked(*found)


def _checked(label: str, explanation: object) -> Label:
    """The label without the prompt's marker syntax, cut at a word to the asked length."""
    words = _unmarked(label).strip('"').split()
    if len(words) > MAX_LABEL_WORDS * 2:  # a sentence, not a label: ask again rather than cut it
        raise InvalidOutput(f"the label has {len(words)} words; at most {MAX_LABEL_WORDS} were asked for")
    kept: list[str] = []
    for word in words[:MAX_LABEL_WORDS]:
        if len(" ".join(kept + [word])) > MAX_LABEL_CHARS:
            break
        kept.append(word)
    if not kept:
        raise InvalidOutput(
            "the label is empty"
            if not words
            else f"the label's first word has {len(words[0])} characters; at most {MAX_LABEL_CHARS} fit"
        )
    return Label(" ".join(kept), _unmarked(explanation) if isinstance(explanation, str) else "")


def _unmarked(text: str) -> str:
    """`<<us>>` came back as a label: the markers belong to the prompt, never to an answer."""
    return " ".join(text.replace("<<", "").replace(">>", "").split())
