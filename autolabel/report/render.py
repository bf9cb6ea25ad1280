"""HTML: the Jinja2 environment (autoescape on), token highlighting, and JSON safe to embed in a page.

Corpus text and labels are untrusted. Templates escape every string they print;
the two places that build markup in Python (token highlighting here, the
embedded JSON below) escape each piece themselves and are the only sources of
`Markup` in the report.
"""

from __future__ import annotations

import json
import math
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup, escape

from autolabel.report.features import Example

HEAT_LEVELS = 10  # token colours: activation / the feature's max, in ten steps


def page_path(layer: int, feature: int) -> str:
    """A feature page, relative to the report folder."""
    return f"features/{layer}-{feature}.html"


def script_json(value: Any) -> Markup:
    """JSON for a <script type="application/json"> block: '<', '>' and '&' become \\u escapes, so no
    string in it can close the script element or open a comment, whatever the corpus holds."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return Markup(text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026"))


def number(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:,.0f}"


def percent(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{100 * value:.{digits}f}%"


def environment() -> Environment:
    env = Environment(loader=PackageLoader("autolabel.report", "templates"),
                      autoescape=select_autoescape(default=True, default_for_string=True),
                      trim_blocks=True, lstrip_blocks=True)
    env.filters.update(number=number, percent=percent, script_json=script_json)
    env.globals.update(page_path=page_path, heat_levels=HEAT_LEVELS)
    return env


def decode_pieces(tokenizer, token_ids: set[int], known: dict[int, str]) -> None:
    """Add the escaped text of each new token id to `known` (every distinct id is decoded once)."""
    new = sorted(token_ids - known.keys())
    if new:
        for token_id, text in zip(new, tokenizer.batch_decode([[t] for t in new]), strict=True):
            known[token_id] = str(escape(text))


def example_html(example: Example, pieces: dict[int, str], max_act: float | None) -> Markup:
    """An example's tokens as markup: runs of one role in a span (its role shown where it changes),
    firing tokens in <mark> coloured by their share of the feature's max, with the value as a tooltip."""
    scale = HEAT_LEVELS / max_act if max_act else 0.0
    out: list[str] = []
    current = None
    for token_id, act, role in zip(example.tokens, example.acts, example.roles):
        if role != current:
            if current is not None:
                out.append("</span>")
            out.append(f'<span class="seg r-{role}" data-role="{role}">')
            current = role
        if act > 0:
            level = min(HEAT_LEVELS - 1, int(act * scale))
            out.append(f'<mark class="h{level}" title="{act:.3g}">{pieces[token_id]}</mark>')
        else:
            out.append(pieces[token_id])
    if current is not None:
        out.append("</span>")
    return Markup("".join(out))
