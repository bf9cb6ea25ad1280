"""Harder detection negatives: silent contexts that mention the label's own words.

Against random silent contexts only, a vague label ("words in English text")
passes detection as easily as a precise one: the judge has only to tell text that
matches the topic from text that does not. So a share (`label.hard_negatives`) of
the detection negatives are contexts where the feature is known to be silent and
that contain one of the label's content words: a label that names the word but not
what about it the feature fires on then loses to them.

Known silent means every token's activation is 0 in the stored example, as
collection stores it (table `examples`): the feature's random contexts (chunks of
`collect.example_tokens` tokens where it never fires) and the silent stretches of
its held-out activating examples (the longest run of zero-activation tokens, kept
when it is at least half an example long, the length collection asks of a random
context). Nothing else is known: another feature's examples carry that feature's
activations, not this one's.

A content word is a word of the label (letters only, lowercased) of at least 3
letters that is not in GENERIC_WORDS; a context mentions it when one of its words
is the same after a final "s" is dropped from both (so "apple" finds "apples").
Hard negatives come from the random contexts first (they look like the positives:
whole contexts), then from the stretches; when there are fewer than the share asks
for, random contexts fill the rest, so the number of negatives does not change.
"""

from __future__ import annotations

import re

from autolabel.label.prompts import Label
from autolabel.label.scorers import Example

# Words a label uses to say what kind of thing it names, not what the thing is.
GENERIC_WORDS = frozenset(
    "the and for with from into about that this these those its their any all some word words token tokens "
    "text texts feature features fires firing mention mentions name names term terms phrase phrases "
    "kind type use uses used".split()
)
WORD = re.compile(r"[^\W\d_]+")


def _stem(word: str) -> str:
    return word[:-1] if len(word) > 3 and word.endswith("s") else word


def content_words(label: Label) -> set[str]:
    """The stems of the label's content words (its explanation is not the label)."""
    return {_stem(w) for w in WORD.findall(label.label.lower()) if len(w) >= 3 and w not in GENERIC_WORDS}


def mentions(text: str, stems: set[str]) -> bool:
    return any(_stem(w) in stems for w in WORD.findall(text.lower()))


def silent_stretches(examples: list[Example]) -> list[Example]:
    """The longest run of zero-activation tokens of each example, when it is at least half the example long."""
    stretches = []
    for example in examples:
        best, start = (0, 0), None
        for i, act in enumerate([*example.acts, 1.0]):  # a sentinel ends the last run
            if act <= 0 and start is None:
                start = i
            elif act > 0 and start is not None:
                best, start = max(best, (i - start, start)), None
        length, first = best
        if length and length * 2 >= len(example.acts):
            stretches.append(
                Example(
                    example.pieces[first : first + length],
                    example.acts[first : first + length],
                    example.role,
                    example.category,
                )
            )
    return stretches


def detection_negatives(
    label: Label, random_contexts: list[Example], stretches: list[Example], n: int, share: float
) -> tuple[list[Example], int]:
    """(n negatives or fewer, how many of them are hard): round(share * n) silent contexts that mention a
    content word of the label, random contexts first, then the other random contexts."""
    stems = content_words(label)
    wanted = round(share * n)
    hard = [e for e in random_contexts + stretches if stems and mentions(e.text, stems)][:wanted]
    plain = [e for e in random_contexts if all(e is not h for h in hard)]
    return (hard + plain)[:n], len(hard)
