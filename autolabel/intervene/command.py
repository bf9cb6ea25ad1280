"""`autolabel intervene` on a collected run: its own model and transcoders, the command's settings.

Every input is checked before the model loads and before anything is written: the options, then each
feature against the run's transcoder and collected statistics.
"""

from __future__ import annotations

from autolabel.config import RunConfig
from autolabel.intervene.stage import InterveneSummary, intervene_stage
from autolabel.intervene.targets import Key, audit_features, check_features
from autolabel.pipeline import collected_run, subject_model, transcoders
from autolabel.store import Store


def intervene_run(
    config: RunConfig,
    run_id: str | None = None,
    features: list[Key] | None = None,
    audit: str | None = None,
    show_progress: bool = True,
) -> InterveneSummary:
    """Intervene on `features`, or on the best-ranked flagged features of `audit` (None: of every audit)."""
    with Store(config.store, create=False) as store:
        run_id, stored = collected_run(store, run_id)
        tset = transcoders(stored.transcoder.source, stored.transcoder.format)
        keys = features or audit_features(store, run_id, audit, config.intervene.limit)
        check_features(store, run_id, tset, keys)
        subject = subject_model(stored.model.source, config.cache_dir, stored.model.dtype)
        settings = stored.model_copy(update={"intervene": config.intervene, "llm": config.llm, "label": config.label})
        return intervene_stage(store, subject, tset, run_id, keys, settings, show_progress)


TABLE_TITLE = (
    "KL(clean || intervened) of the next token: ablated where the feature fires (its peak token; "
    "95% interval over prompts) and on silent contexts, steered to N x its max activation (all prompts)"
)


def summary_rows(summary: InterveneSummary, multiples: list[float]) -> tuple[list[str], list[tuple]]:
    """The command's table: one row per feature."""
    columns = ["feature", "label", "ablated", "95%", "silent", *[f"x{m:g}" for m in multiples], "steering score"]
    rows = []
    for result in summary.features:
        effect = result.ablation
        interval = "-" if effect is None or effect.low is None else f"{effect.low:.3f}-{effect.high:.3f}"
        score = f"{result.score:.2f}" if result.score is not None else result.score_status or "-"
        rows.append(
            (
                f"{result.layer}:{result.feature}",
                result.label or "-",
                "-" if effect is None else f"{effect.mean:.3f}",
                interval,
                "-" if result.ablation_neutral is None else f"{result.ablation_neutral:.3f}",
                *[f"{result.steering_kl[m]:.3f}" if m in result.steering_kl else "-" for m in multiples],
                score,
            )
        )
    return columns, rows
