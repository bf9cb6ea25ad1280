"""HTML: the Jinja2 environment (autoescape on), token highlighting, and JSON safe to embed in a page.

Corpus text and labels are untrusted. Templates escape every string they print.
Markup built in Python is built here only: token highlighting (each token's text
escaped once, in `decode_pieces`, before any tag goes around it), the histogram
and legend (numbers and fixed names), and embedded JSON (no '<', '>' or '&' left).
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pyarrow as pa
from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup, escape

from autolabel.config import ROLES
from autolabel.intervene.evidence import CAUSAL_KL

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
    env = Environment(
        loader=PackageLoader("autolabel.report", "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(number=number, percent=percent, script_json=script_json)
    env.globals.update(page_path=page_path, heat_legend=heat_legend(), causal_kl=CAUSAL_KL)
    return env


def decode_pieces(tokenizer, token_ids: set[int], known: dict[int, str]) -> None:
    """Add the escaped text of each new token id to `known` (every distinct id is decoded once)."""
    new = sorted(token_ids - known.keys())
    if new:
        for token_id, text in zip(new, tokenizer.batch_decode([[t] for t in new]), strict=True):
            known[token_id] = str(escape(text))


def example_lists(
    table: pa.Table, pieces: dict[int, str], peak_of_feature: dict[int, float]
) -> dict[tuple[int, str], Markup]:
    """(feature, kind) -> that feature's examples of that kind as <li> items: runs of one role in a span
    (the role named where it changes), firing tokens in <mark> shaded by their share of the feature's
    max, with the value as a tooltip.

    Built for a whole layer at once with numpy (a report holds millions of tokens): each token's text
    comes from `pieces` (escaped once per distinct id) and only firing tokens, role changes and example
    bounds get tags. Rows arrive ordered by feature and kind, so each list is one contiguous join.
    """
    tokens_column = table.column("tokens").combine_chunks()
    offsets, token_ids = tokens_column.offsets.to_numpy(), tokens_column.values.to_numpy()  # [rows + 1], [tokens]
    lengths = np.diff(offsets)  # [rows]
    text = _token_texts(token_ids, pieces)  # [tokens] of str, the pieces this function wraps in tags
    features = table.column("feature").to_pylist()
    _mark_firing(text, table, np.repeat(_heat_scales(features, peak_of_feature), lengths))
    _wrap_role_runs(text, _token_roles(table, lengths), offsets, lengths)
    _wrap_examples(text, table, offsets, lengths)
    return _joined_lists(text.tolist(), offsets.tolist(), features, table.column("kind").to_pylist())


def _token_texts(token_ids: np.ndarray, pieces: dict[int, str]) -> np.ndarray:
    """Each token's escaped text, looked up by id: [tokens] of str."""
    lookup = np.empty(int(token_ids.max(initial=0)) + 1, dtype=object)
    for token_id, text in pieces.items():
        if token_id < len(lookup):
            lookup[token_id] = text
    return lookup[token_ids]


def _token_roles(table: pa.Table, lengths: np.ndarray) -> np.ndarray:
    """Each token's role code (index in ROLES): from the corpus, or the role at the peak when the example's
    document is not in the store: [tokens] int64."""
    peak_roles = np.array([ROLES.index(r) for r in table.column("role").to_pylist()], dtype=np.int64)  # [rows]
    role_codes = np.repeat(peak_roles, lengths)
    codes_column = table.column("codes").combine_chunks()
    has_roles = np.repeat(codes_column.is_valid().to_numpy(zero_copy_only=False), lengths)
    corpus_codes = codes_column.values.to_numpy(zero_copy_only=False)
    if len(corpus_codes) == has_roles.sum():
        role_codes[has_roles] = corpus_codes
    return role_codes


def _heat_scales(features: list[int], peak_of_feature: dict[int, float]) -> np.ndarray:
    """Per row, the factor that turns an activation into a heat level (0 for a feature that never fired): [rows]."""
    peaks = np.array([peak_of_feature.get(f) or 0.0 for f in features])
    return np.divide(HEAT_LEVELS, peaks, out=np.zeros_like(peaks), where=peaks > 0)


def _mark_firing(text: np.ndarray, table: pa.Table, scale: np.ndarray) -> None:
    """Wrap each firing token in a <mark> shaded by its heat level, its activation as the tooltip."""
    acts = table.column("acts").combine_chunks().values.to_numpy(zero_copy_only=False)  # [tokens]
    firing = acts > 0
    levels = np.minimum(HEAT_LEVELS - 1, (acts[firing] * scale[firing]).astype(np.int64))
    text[firing] = [
        f'<mark class="h{level}" title="{act:.3g}">{piece}</mark>'
        for level, act, piece in zip(levels.tolist(), acts[firing].tolist(), text[firing].tolist(), strict=True)
    ]


def _wrap_role_runs(text: np.ndarray, role_codes: np.ndarray, offsets: np.ndarray, lengths: np.ndarray) -> None:
    """Put each run of one role inside an example in a span naming the role."""
    opens = np.ones(len(text), dtype=bool)
    opens[1:] = role_codes[1:] != role_codes[:-1]
    opens[offsets[:-1][lengths > 0]] = True
    closes = np.zeros(len(text), dtype=bool)
    closes[:-1] = opens[1:]
    closes[offsets[1:][lengths > 0] - 1] = True
    open_tags = np.array([f'<span class="seg r-{role}" data-role="{role}">' for role in ROLES], dtype=object)
    text[opens] = open_tags[role_codes[opens]] + text[opens]
    text[closes] = text[closes] + "</span>"


def _wrap_examples(text: np.ndarray, table: pa.Table, offsets: np.ndarray, lengths: np.ndarray) -> None:
    """Open each non-empty example with its <li> and a line of bin, peak and document; close it after its last token."""
    heads = [
        f'<li><span class="ex-meta">{"" if bin_ is None else f"bin {bin_} · "}{peak:.3g} · {escape(doc_id)}'
        f'</span><div class="ex">'
        for bin_, peak, doc_id in zip(
            table.column("bin").to_pylist(),
            table.column("max_act").to_pylist(),
            table.column("doc_id").to_pylist(),
            strict=True,
        )
    ]
    shown = lengths > 0
    firsts, lasts = offsets[:-1][shown], offsets[1:][shown] - 1
    text[firsts] = np.array(heads, dtype=object)[shown] + text[firsts]
    text[lasts] = text[lasts] + "</div></li>\n"


def _joined_lists(
    pieces: list[str], bounds: list[int], features: list[int], kinds: list[str]
) -> dict[tuple[int, str], Markup]:
    """One Markup per (feature, kind): the pieces of its contiguous rows joined."""
    lists: dict[tuple[int, str], Markup] = {}
    start = 0
    for row in range(1, len(features) + 1):
        if row == len(features) or (features[row], kinds[row]) != (features[start], kinds[start]):
            lists[(features[start], kinds[start])] = Markup("".join(pieces[bounds[start] : bounds[row]]))
            start = row
    return lists


def histogram_svg(histogram: list[int] | None, edges: list[float] | None) -> Markup | None:
    """The activation histogram as inline SVG bars, heights on a log scale (counts span orders of magnitude)."""
    if not histogram or not edges or not any(histogram):
        return None
    counts = np.asarray(histogram, dtype=float)
    heights = 58 * np.log1p(counts) / np.log1p(counts.max())
    bars = "".join(
        f'<rect x="{10 * i + 1}" y="{60 - h:.2f}" width="8" height="{h:.2f}"><title>'
        f"({number(edges[i])}, {number(edges[i + 1])}]: {int(c):,} tokens</title></rect>"
        for i, (c, h) in enumerate(zip(counts.tolist(), heights.tolist(), strict=False))
    )
    return Markup(
        f'<svg class="histogram" viewBox="0 0 {10 * len(counts)} 60" preserveAspectRatio="none" role="img" '
        f'aria-label="activation histogram">{bars}</svg><div class="spark-axis"><span>{number(edges[0])}'
        f"</span><span>log-spaced bins, log counts</span><span>{number(edges[-1])}</span></div>"
    )


def heat_legend() -> Markup:
    """The colour scale of firing tokens, the same on every page."""
    steps = "".join(f'<mark class="h{level}">{level / HEAT_LEVELS:.1f}</mark>' for level in range(HEAT_LEVELS))
    roles = "".join(f'<span class="seg r-{role}">{role}</span>' for role in ROLES)
    return Markup(f'activation / max {steps}<span class="roles-legend">{roles}</span>')
