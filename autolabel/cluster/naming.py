"""One LLM call per cluster: a short name and a sentence from its members' labels.

Only reliable labels are shown (the members nearest the cluster's centre first),
so a cluster of unlabeled or badly labeled features is left unnamed rather than
named from noise. The answer is asked for as JSON with a schema, parsed as every answer is
(autolabel.answers: the first {...} in prose, or a `name:` line); an answer
that never parses is recorded as `invalid` with the error, never invented.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np

from autolabel.answers import answer_fields, json_schema
from autolabel.llm import BudgetExhausted, InvalidOutput, LLMClient

MAX_NAME_WORDS = 6

INSTRUCTION = (
    "You name groups of features of a language model. You see the labels of features that belong together. "
    "Say what they share. Answer with JSON only: "
    '{"name": "<at most 6 words>", "description": "<one sentence: what the features have in common>"}.'
)

NAME_SCHEMA = json_schema(
    "cluster_name", {"name": {"type": "string", "maxLength": 60}, "description": {"type": "string", "maxLength": 200}}
)


@dataclass
class ClusterName:
    cluster_id: int
    name: str | None
    description: str | None
    status: str  # ok, invalid, error, unnamed (no reliable label to name it from), noise
    error: str | None
    n_reliable: int


def naming_messages(labels: list[str]) -> list[dict[str, str]]:
    listing = "\n".join(f"- {label}" for label in labels)
    return [{"role": "system", "content": INSTRUCTION}, {"role": "user", "content": f"Feature labels:\n{listing}"}]


def parse_name(text: str) -> tuple[str, str]:
    """(name, description) from the JSON answer, a {...} in prose, or `name:` / `description:` lines."""
    found = answer_fields(text, "name", "description")
    if found is None:
        raise InvalidOutput("no JSON object with a string 'name' and no 'name:' line")
    return _checked(*found)


def _checked(name: str, description: object) -> tuple[str, str]:
    name = name.strip().strip('"').strip()
    if not name:
        raise InvalidOutput("the name is empty")
    if len(name.split()) > MAX_NAME_WORDS * 2:
        raise InvalidOutput(f"the name has {len(name.split())} words; at most {MAX_NAME_WORDS} were asked for")
    return name, description.strip() if isinstance(description, str) else ""


def labels_to_show(
    cluster_space: np.ndarray, labels: list[str | None], reliable: np.ndarray, members: np.ndarray, n: int
) -> list[str]:
    """Distinct reliable labels of `members` (indices), nearest the members' centre first, at most n."""
    trusted = members[reliable[members]]
    centre = cluster_space[members].mean(0)  # [cluster_dims]
    order = trusted[np.argsort(np.linalg.norm(cluster_space[trusted] - centre, axis=1), kind="stable")]
    return list(dict.fromkeys(labels[i] for i in order))[:n]


async def name_clusters(
    client: LLMClient | None,
    cluster_space: np.ndarray,
    cluster_ids: np.ndarray,
    labels: list[str | None],
    reliable: np.ndarray,
    n_labels: int,
) -> list[ClusterName]:
    """A ClusterName per cluster id (noise, -1, included); no client: every cluster left unnamed."""

    async def one(cluster_id: int) -> ClusterName:
        members = np.flatnonzero(cluster_ids == cluster_id)
        n_reliable = int(reliable[members].sum())
        if cluster_id == -1:
            return ClusterName(-1, None, None, "noise", None, n_reliable)
        shown = labels_to_show(cluster_space, labels, reliable, members, n_labels)
        if not shown or client is None:
            reason = "no reliably labeled member" if not shown else "naming is off (cluster.name_clusters)"
            return ClusterName(cluster_id, None, None, "unnamed", reason, n_reliable)
        try:
            reply = await client.complete(naming_messages(shown), parse_name, NAME_SCHEMA)
        except BudgetExhausted as err:  # the budget is spent: this cluster stays unnamed, the rest is kept
            return ClusterName(cluster_id, None, None, "error", str(err), n_reliable)
        name, description = reply.value if reply.value else (None, None)
        return ClusterName(cluster_id, name, description, reply.status, reply.error, n_reliable)

    return list(await asyncio.gather(*(one(int(c)) for c in np.unique(cluster_ids))))
