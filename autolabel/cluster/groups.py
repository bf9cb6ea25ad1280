"""Audit groups (refusal, reward-model bias, sycophancy, ...) as data, and which features join them.

A group in a groups file (the built-in autolabel/data/defaults/groups.yaml) has concept seeds (descriptions and example
phrases) and optionally probe categories of the corpus. A feature joins a group
- by similarity: the MiniLM cosine between its reliable label and the nearest
  seed reaches the group's `min_similarity`; or
- by lift: its activation rate on the probe categories' tokens (of the group's
  roles) over its rate on the control categories' tokens of the same roles (every
  other category when the group names no controls) reaches `min_lift`, with at
  least `min_active` active probe tokens.
Both numbers are stored with the membership, whichever let it in, so an auditor
can see why a feature is in a group.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
from pydantic import Field, StringConstraints, ValidationError

from autolabel.config import ROLES, Strict, read_yaml_mapping
from autolabel.errors import AutolabelError
from autolabel.store import Store

Seed = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]


class Thresholds(Strict):
    min_similarity: float = Field(default=0.6, gt=0, le=1)  # cosine of label and nearest seed
    min_lift: float = Field(default=4.0, gt=1)  # activation rate on probe categories / elsewhere
    min_active: int = Field(default=5, ge=1)  # active probe tokens needed for a lift to count


class GroupSpec(Strict):
    description: str
    seeds: list[Seed] = Field(min_length=1)  # descriptions and example phrases of the concept
    categories: list[str] = Field(default_factory=list)  # probe document categories (category_stats)
    # Matched look-alikes the probes are compared with (benign requests for harmful ones); empty: every
    # other category. Without controls, a lift also measures topic (injections ask to summarise documents).
    controls: list[str] = Field(default_factory=list)
    roles: list[str] = Field(default_factory=list)  # token roles the lift is measured on; empty: all
    min_similarity: float | None = Field(default=None, gt=0, le=1)  # None: the file's defaults
    min_lift: float | None = Field(default=None, gt=1)
    min_active: int | None = Field(default=None, ge=1)

    def thresholds(self, defaults: Thresholds) -> Thresholds:
        return defaults.model_copy(
            update={k: v for k in Thresholds.model_fields if (v := getattr(self, k)) is not None}
        )


class GroupsSpec(Strict):
    defaults: Thresholds = Field(default_factory=Thresholds)
    groups: dict[str, GroupSpec] = Field(min_length=1)


_FIXES = {
    "extra_forbidden": "remove it or fix its spelling (fields: {fields})",
    "too_short": "give at least one non-empty entry",
    "string_too_short": "write a non-empty phrase",
    "greater_than": "use a larger value",
    "greater_than_equal": "use a larger value",
    "less_than_equal": "use a value of at most 1",
    "missing": "add it",
}


def load_groups(path: str | Path) -> GroupsSpec:
    """The validated spec; any problem is an AutolabelError naming the file, the group, the field and the fix."""
    path = Path(path)
    raw = read_yaml_mapping(
        path,
        "audit group file",
        'set cluster.groups to an existing YAML file, or to "" for no groups',
        "with a `groups:` key (see autolabel/data/defaults/groups.yaml)",
    )
    try:
        spec = GroupsSpec.model_validate(raw)
    except ValidationError as err:
        raise AutolabelError(
            f"audit group file {path} is invalid: " + "; ".join(_problem(e) for e in err.errors())
        ) from err
    for name, group in spec.groups.items():
        unknown = sorted(set(group.roles) - set(ROLES))
        if unknown:
            raise AutolabelError(
                f"audit group file {path}: group {name!r}, field 'roles': unknown role(s) {unknown}; "
                f"use some of {list(ROLES)}"
            )
        both = sorted(set(group.categories) & set(group.controls))
        if both:
            raise AutolabelError(
                f"audit group file {path}: group {name!r}, field 'controls': {both} are also probe "
                f"categories; a category is either probed or a control"
            )
    return spec


def _problem(error: dict) -> str:
    loc = [str(part) for part in error["loc"]]
    where = (
        f"group {loc[1]!r}, field {'.'.join(loc[2:])!r}"
        if loc[:1] == ["groups"] and len(loc) > 2
        else f"field {'.'.join(loc)!r}"
    )
    model = GroupSpec if loc[:1] == ["groups"] else Thresholds if loc[:1] == ["defaults"] else GroupsSpec
    fix = _FIXES.get(error["type"], "see audits/groups.yaml for the format").format(
        fields=", ".join(model.model_fields)
    )
    return f"{where}: {error['msg']}; {fix}"


@dataclass
class Member:
    group_name: str
    key: tuple[int, int]  # (layer, feature)
    similarity: float | None
    nearest_seed: str | None
    lift: float | None
    n_active: int | None  # active tokens on the probe categories
    via: str  # similarity, lift, or similarity+lift


def probe_lift(store: Store, run_id: str, group: GroupSpec) -> dict[tuple[int, int], tuple[float, int]]:
    """(layer, feature) -> (lift, active probe tokens), from category_stats; empty without probe categories."""
    if not group.categories:
        return {}
    roles = group.roles or list(ROLES)
    controls = "category IN (SELECT unnest($controls))" if group.controls else "category NOT IN (SELECT unnest($cats))"
    rows = store.rows(
        f"""SELECT layer, feature,
                  coalesce(sum(n_active) FILTER (WHERE category IN (SELECT unnest($cats))), 0) AS a_in,
                  coalesce(sum(n_tokens) FILTER (WHERE category IN (SELECT unnest($cats))), 0) AS n_in,
                  coalesce(sum(n_active) FILTER (WHERE {controls}), 0) AS a_out,
                  coalesce(sum(n_tokens) FILTER (WHERE {controls}), 0) AS n_out
           FROM category_stats WHERE run_id = $run AND CAST(role AS VARCHAR) IN (SELECT unnest($roles))
           GROUP BY ALL HAVING n_in > 0 AND n_out > 0""",
        {
            "cats": group.categories,
            "run": run_id,
            "roles": roles,
            **({"controls": group.controls} if group.controls else {}),
        },
    )
    # Add-one smoothing keeps a feature silent outside the probes finite, and a rare one from a huge ratio.
    return {
        (layer, feature): (((a_in + 1) / (n_in + 1)) / ((a_out + 1) / (n_out + 1)), int(a_in))
        for layer, feature, a_in, n_in, a_out, n_out in rows
    }


def missing_categories(store: Store, run_id: str, spec: GroupsSpec) -> dict[str, list[str]]:
    """Probe and control categories of each group that the run's corpus does not have."""
    present = {row[0] for row in store.rows("SELECT DISTINCT category FROM category_stats WHERE run_id = ?", [run_id])}
    return {
        name: missing
        for name, group in spec.groups.items()
        if (missing := sorted(set(group.categories + group.controls) - present))
    }


def group_members(
    spec: GroupsSpec,
    seed_vectors: dict[str, np.ndarray],
    keys: list[tuple[int, int]],
    label_vectors: np.ndarray,
    reliable: np.ndarray,
    lifts: dict[str, dict[tuple[int, int], tuple[float, int]]],
) -> list[Member]:
    """Members of every group. label_vectors [n, 384] are unit vectors of the features' texts (only
    reliable labels count for similarity); seed_vectors[group] [n_seeds, 384]."""
    members = []
    for name, group in spec.groups.items():
        limits = group.thresholds(spec.defaults)
        similarity = label_vectors @ seed_vectors[name].T  # [n, n_seeds]
        nearest = similarity.argmax(1)
        best = similarity.max(1)
        for i, key in enumerate(keys):
            lift, n_active = lifts[name].get(key, (None, None))
            by_similarity = bool(reliable[i]) and best[i] >= limits.min_similarity
            by_lift = lift is not None and lift >= limits.min_lift and n_active >= limits.min_active
            if by_similarity or by_lift:
                members.append(
                    Member(
                        name,
                        key,
                        float(best[i]) if reliable[i] else None,
                        group.seeds[nearest[i]] if reliable[i] else None,
                        lift,
                        n_active,
                        "+".join(v for v, ok in (("similarity", by_similarity), ("lift", by_lift)) if ok),
                    )
                )
    return members
