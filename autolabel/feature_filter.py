"""Which of a run's features a stage works on: one owner of the filter that labeling and clustering share.

A feature that never fired (status `dead`) has no examples, no label and no place
on the map, so neither stage takes it; `layers` and `features` narrow the rest.
"""

from __future__ import annotations


def live_features(
    run_id: str, layers: list[int] | None = None, features: list[int] | None = None, alias: str = "f"
) -> tuple[list[str], list]:
    """(conditions to AND into a WHERE over `features AS alias`, their parameters, in order)."""
    where, params = [f"{alias}.run_id = ?", f"{alias}.status <> 'dead'"], [run_id]
    if layers is not None:
        where.append(f"{alias}.layer IN (SELECT unnest(?))")
        params.append(layers)
    if features is not None:
        where.append(f"{alias}.feature IN (SELECT unnest(?))")
        params.append(features)
    return where, params
