"""The labeling prompt and the parsing of its answer.

The prompt is short on purpose (a small local labeler has a small context, and a
server reuses the shared prefix): a fixed instruction that decides in order, four
worked examples, one per rule (a word, a word family, a kind of turn, a kind of
document, so labels stop copying one form), then the feature's examples, each about
20 tokens around its peak with the firing tokens marked <<like this>> and tagged
with whose text it is and its document category, then which tokens fire (counted
over the shown examples: a small labeler reads "'said' in 6 of 6 examples" where it
misses the pattern in six marked texts, and "most of the tokens shown fire" tells a
feature of a kind of text from one of a word), then where the feature fires by role
and by document category (no peer shows this: a feature of the assistant's turn can
only be named as one if the labeler sees that it fires on 97% of assistant turns and
1% of user turns, a feature of news text if 97% of its firing tokens are in the news
that holds 34% of the corpus), then the tokens its decoder row promotes and
suppresses through the unembedding.
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
    "which tokens fire, counted over the examples; where the feature fires by role (and by document category "
    "when one stands out); and the output tokens it makes more and less likely. Decide in this order. "
    "1. If 'Firing tokens' names one token in most examples, the label is that token, as in \"the word "
    'because". 2. If it names several tokens of one kind, the label names the kind, as in "colours". '
    "3. If whole stretches of text fire: when 'Where it fires' puts most firing tokens in one kind of turn, "
    "the label names that turn, as in \"the user's message\"; otherwise, when 'By category' puts most in one "
    'category, the label names that kind of text, as in "sports reports". The topic of the unmarked text '
    "around the marked tokens is not the label. Answer with JSON only: "
    '{"label": "<at most 8 words>", "explanation": "<one sentence: when the feature fires>"}.'
)

# (evidence, answer) pairs shown before the feature's own evidence, one per rule of the instruction: one
# token, a word family, a kind of turn, a kind of document (each kind of answer once, so labels stop
# copying one form).
WORKED_EXAMPLES = [
    (
        "Examples:\n"
        "1. [plain text, stories] she stayed home<< because>> it was raining\n"
        "2. [user turn, travel] is it cheaper<< because>> of the season\n"
        "3. [plain text, news] the match was called off<< because>> of snow\n"
        "Firing tokens: 'because' in 3 of 3 examples; 6% of the tokens shown fire.\n"
        "Where it fires: 70% of its firing tokens are plain text, 30% user turn.\n"
        "Promoted outputs: of, it, the\n"
        "Suppressed outputs: ., and, to",
        '{"label": "the word because", "explanation": "Fires on the word because, introducing a reason."}',
    ),
    (
        "Examples:\n"
        "1. [plain text, news] the<< jury>> found him guilty after a two-week<< trial>>\n"
        "2. [plain text, news] appeared before<< magistrates>> on Monday\n"
        "3. [user turn, legal] can my landlord take me to<< court>>\n"
        "Firing tokens: 'court' in 1 of 3 examples, 'jury' in 1 of 3, 'magistrates' in 1 of 3, 'trial' in 1 of 3; "
        "10% of the tokens shown fire.\n"
        "Where it fires: 85% of its firing tokens are plain text, 15% user turn.\n"
        "Promoted outputs: judge, hearing, sentenced",
        '{"label": "courts and trials", "explanation": "Fires on words for courts, juries and legal proceedings."}',
    ),
    (
        "Examples:\n"
        "1. [assistant turn, travel]<< Sure! Paris is lovely in spring>>\n"
        "2. [assistant turn, coding]<< You can sort the list with sorted()>>\n"
        "3. [assistant turn, chitchat]<< I'm glad you asked>>\n"
        "Firing tokens: 100% of the tokens shown fire, in stretches of 9 tokens on average (whole stretches "
        "of text).\n"
        "Where it fires: 97% of its firing tokens are assistant turn, 3% chat template; "
        "it fires in 96% of assistant turns and 1% of user turns.\n"
        "Promoted outputs: you, can, help",
        '{"label": "the assistant\'s reply", "explanation": "Fires throughout the assistant\'s turn in a chat, '
        'whatever the topic."}',
    ),
    (
        "Examples:\n"
        "1. [plain text, recipes]<< Preheat the oven to 180C and grease a round tin>>\n"
        "2. [plain text, recipes]<< Whisk the eggs with the sugar until pale and thick>>\n"
        "3. [plain text, recipes] Method:<< fold in the flour, then bake for 25 minutes>>\n"
        "Firing tokens: 94% of the tokens shown fire, in stretches of 11 tokens on average (whole stretches "
        "of text).\n"
        "Where it fires: 100% of its firing tokens are plain text.\n"
        "By category: 96% of its firing tokens are in recipes (6% of all tokens).\n"
        "Promoted outputs: minutes, oven, until",
        '{"label": "recipe texts", "explanation": "Fires throughout recipes, whatever the dish."}',
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
    categories: str = ""  # by_category(...), or "" when the run has one category or none


# A feature that fires on more than half the tokens shown, or in runs of 4 tokens or more on average, is
# about a kind of text: its firing tokens are whatever words that text has. Word features fire in runs of 1
# (a number written digit by digit in runs of 2-3) on the known-answer benchmark, turns and news in runs of 6-13.
WHOLE_STRETCHES, STRETCH_RUN = 0.5, 4.0
FIRING_TOKENS_SHOWN = 6


def firing_tokens(windows: list[tuple[list[str], list[float]]], mark_fraction: float) -> str:
    """ "Firing tokens: 'said' in 6 of 8 examples, 'says' in 1 of 8; 4% of the tokens shown fire." over the
    shown windows (pieces, acts), each marked at `mark_fraction` of its own peak as the examples are. A token
    counts once per example, whitespace and case aside, so a word repeated in one text does not outweigh a
    word found in every text."""
    in_examples: dict[str, int] = {}
    spelled: dict[str, str] = {}
    firing = shown = runs = 0
    for pieces, acts in windows:
        threshold = mark_fraction * max(acts, default=0.0)
        fires = [act > threshold for act in acts]
        fired = {piece.strip().lower(): piece.strip() for piece, fire in zip(pieces, fires, strict=True) if fire}
        for key, text in fired.items():
            in_examples[key] = in_examples.get(key, 0) + 1
            spelled.setdefault(key, text)
        firing += sum(fires)
        shown += len(fires)
        runs += sum(fire and not before for fire, before in zip(fires, [False, *fires], strict=False))
    if not shown or not firing:
        return ""
    share, run = firing / shown, firing / runs
    if share > WHOLE_STRETCHES or run >= STRETCH_RUN:
        return (
            f"Firing tokens: {share:.0%} of the tokens shown fire, in stretches of {run:.0f} tokens on average "
            "(whole stretches of text)."
        )
    n = len(windows)
    ranked = sorted(in_examples.items(), key=lambda item: (-item[1], item[0]))[:FIRING_TOKENS_SHOWN]
    counts = ", ".join(
        f"{_quoted(spelled[key])} in {count} of {n}{' examples' if i == 0 else ''}"
        for i, (key, count) in enumerate(ranked)
    )
    return f"Firing tokens: {counts}; {share:.0%} of the tokens shown fire."


def _quoted(token: str) -> str:
    return f"'{token}'" if token else "a space or line break"


def tagged(role: str | None, category: str | None, text: str) -> str:
    tags = [ROLE_NAMES.get(role or "", ""), category or ""]
    return f"[{', '.join(t for t in tags if t)}] {text}" if any(tags) else text


TURNS_SHOWN_FROM = 0.05


def where_it_fires(active_by_role: dict[str, int], turns_by_role: dict[str, tuple[int, int]]) -> str:
    """ "Where it fires: 81% of its firing tokens are assistant turn, 12% user turn; it fires in 95% of
    assistant turns and 3% of user turns." from role_stats (shares under 1% are left out, and the turns when
    it fires in under 5% of either: "0% of user turns and 0% of assistant turns" drew a small labeler to name
    a word feature after a turn)."""
    total = sum(active_by_role.values())
    if not total:
        return ""
    shares = sorted(((n / total, role) for role, n in active_by_role.items() if n / total >= 0.01), reverse=True)
    text = "Where it fires: " + ", ".join(
        f"{share:.0%}{' of its firing tokens are' if i == 0 else ''} {ROLE_NAMES[role]}"
        for i, (share, role) in enumerate(shares)
    )
    turns = [(active / n, role) for role, (active, n) in turns_by_role.items() if role in ("user", "assistant") and n]
    if turns and max(turns)[0] >= TURNS_SHOWN_FROM:
        text += "; it fires in " + " and ".join(f"{share:.0%} of {ROLE_NAMES[role]}s" for share, role in turns)
    return text + "."


CATEGORIES_SHOWN = 3
# A category is evidence when it holds most of the firing tokens and well over its share of the corpus; spread
# shares (an assistant-turn feature over the chat categories) drew a small labeler to name a topic.
CATEGORY_STANDS_OUT, CATEGORY_LIFT = 0.5, 1.5


def by_category(active_by_category: dict[str, int], tokens_by_category: dict[str, int]) -> str:
    """ "By category: 97% of its firing tokens are in news (34% of all tokens), 2% in chitchat (39%)." from
    category_stats, or "" when no category stands out: a feature of a kind of document shows as a share far
    above the category's own share of the corpus (categories under 5% of the firing tokens left out)."""
    firing, total = sum(active_by_category.values()), sum(tokens_by_category.values())
    if not firing or not total or len(tokens_by_category) < 2:
        return ""
    shares = sorted(
        ((n / firing, category) for category, n in active_by_category.items() if n / firing >= 0.05), reverse=True
    )[:CATEGORIES_SHOWN]
    if not shares:  # spread over more than 20 categories: none can stand out
        return ""
    top_share, top = shares[0]
    if top_share < CATEGORY_STANDS_OUT or top_share < CATEGORY_LIFT * tokens_by_category[top] / total:
        return ""
    return (
        "By category: "
        + ", ".join(
            f"{share:.0%}{' of its firing tokens are' if i == 0 else ''} in {category} "
            f"({tokens_by_category[category] / total:.0%}{' of all tokens' if i == 0 else ''})"
            for i, (share, category) in enumerate(shares)
        )
        + "."
    )


def explain_messages(examples: list[str], evidence: Evidence, tokens: str = "") -> list[dict[str, str]]:
    """Chat messages asking for a label; `examples` are already marked and tagged, `tokens` is
    firing_tokens(...) of the same examples ("" leaves the line out)."""
    body = "Examples:\n" + "\n".join(f"{i + 1}. {text}" for i, text in enumerate(examples))
    if tokens:
        body += "\n" + tokens
    if evidence.where:
        body += "\n" + evidence.where
    if evidence.categories:
        body += "\n" + evidence.categories
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
