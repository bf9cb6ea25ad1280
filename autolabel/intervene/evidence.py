"""Causal evidence read back from `interventions`, in the form the audit and the commands use.

A feature's ablation effect is the mean, over prompts where it fires, of KL(clean || ablated) at the
prompt's last token (the example's peak), with a 95% Student-t interval over those prompts. Prompts are
few (`intervene.prompts`) and KL is skewed, so the interval is wide on purpose: a flagged feature whose
interval reaches 0 has not been shown to change what the model says.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scipy.stats import t as student_t

from autolabel.store import Store

Key = tuple[int, int]


# Below this many nats of KL at the peak token, removing a feature has not changed the next-token
# distribution measurably (bfloat16 rounding alone moves it by about 1e-6).
CAUSAL_KL = 1e-3


@dataclass(frozen=True)
class Effect:
    mean: float
    low: float | None  # None with fewer than two prompts
    high: float | None
    n: int  # prompts

    @property
    def causal(self) -> bool:
        """Ablating the feature changed the output beyond doubt: the interval's low end clears CAUSAL_KL."""
        return self.low is not None and self.low > CAUSAL_KL


def mean_interval(values: list[float], confidence: float = 0.95) -> Effect:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return Effect(mean, None, None, n)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(student_t.ppf(1 - (1 - confidence) / 2, n - 1)) * sd / math.sqrt(n)
    return Effect(mean, max(mean - half, 0.0), mean + half, n)  # KL is never negative


def ablation_effects(store: Store, run_id: str, role: str | None = "assistant") -> dict[Key, Effect]:
    """Per feature, the ablation KL over its prompts where it fires whose peak token has `role` (None: any)."""
    rows = store.rows(
        "SELECT layer, feature, list(kl ORDER BY prompt_index) FROM interventions WHERE run_id = ? "
        "AND setting = 'ablate' AND prompt_kind = 'active' AND (? IS NULL OR role = ?) GROUP BY ALL ORDER BY ALL",
        [run_id, role, role],
    )
    return {(layer, feature): mean_interval(values) for layer, feature, values in rows}
