"""What the commands print: rich tables and one-line summaries of each stage's result."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

console = Console()


def print_table(title: str, columns: list[str], rows: list[tuple]) -> None:
    """Cells are plain text, never markup: they carry corpus text, labels and file names."""
    table = Table(title=Text(title))
    for column in columns:
        table.add_column(Text(column))
    for row in rows:
        table.add_row(*[Text("" if v is None else str(v)) for v in row])
    console.print(table)


def print_corpus_summary(summary) -> None:
    state = "reused (already built)" if summary.reused else f"built, {summary.generated} assistant turns generated"
    console.print(
        f"corpus [bold]{summary.corpus_id}[/]: {summary.n_docs} documents, {summary.n_tokens:,} tokens; {state}"
    )
    print_table("tokens by role", ["role", "tokens"], sorted(summary.tokens_by_role.items()))
    print_table("tokens by category", ["category", "tokens"], sorted(summary.tokens_by_category.items()))


def print_quality(quality) -> None:
    rows = [
        (q.layer, f"{q.fvu:.3f}", f"{q.l0:.1f}", f"{q.dead_fraction:.1%}", q.n_tokens)
        for q in sorted(quality.values(), key=lambda q: q.layer)
    ]
    print_table("held-out reconstruction", ["layer", "FVU", "L0", "dead", "tokens"], rows)


def print_collect(summary) -> None:
    collect = summary.collect
    rows = [
        (layer, counts["active"], counts["rare"], counts["dead"])
        for layer, counts in sorted(collect.status_by_layer.items())
    ]
    print_table("features collected", ["layer", "active", "rare", "dead"], rows)
    if summary.reused_from:
        console.print(
            f"collection reused from run {escape(summary.reused_from)} (same model, transcoder, corpus and "
            f"settings; --fresh collects again)"
        )
        return
    resumed = f", resumed after {collect.resumed_shards} shards" if collect.resumed_shards else ""
    console.print(f"collected over {collect.n_tokens:,} tokens in {collect.seconds:.0f} s{resumed}")


def print_labels(summary) -> None:
    print_table("labels", ["status", "features"], sorted(summary.by_status.items()))
    console.print(
        f"run [bold]{summary.run_id}[/]: {summary.unreliable} labels flagged unreliable; "
        f"{summary.calls} requests, ${summary.cost_usd:.4f}, {summary.seconds:.0f} s"
    )
    if summary.stopped:
        console.print(
            f"[yellow]stopped early:[/] {escape(str(summary.stopped))}; "
            f"`autolabel label --run {summary.run_id}` resumes"
        )


def interval(metric: tuple | None, lower_only: bool = False) -> str:
    """ "0.95 (0.93-0.97)", or "20.2 >=18.0" for a lift, whose lower bound is what gates the flag."""
    if metric is None or metric[0] is None:
        return "-"
    value, low, high = (f"{x:.2f}" if x is not None else "inf" for x in metric)
    if low == high == value:
        return value
    return f"{value} >={low}" if lower_only else f"{value} ({low}-{high})"


def print_audit(summary) -> None:
    if summary.skipped:
        console.print(f"[yellow]audit skipped:[/] {escape(summary.skipped)}")
    for result in summary.results:
        shown = [
            m
            for m in ("lift_vs_user", "lift_vs_text", "lift_vs_other_categories", "breadth")
            if any(m in f["metrics"] for f in result.flagged)
        ]
        rows = [
            (
                f["rank"],
                f"{f['layer']}/{f['feature']}",
                interval(f["metrics"].get("assistant_turn_share")),
                *(interval(f["metrics"].get(m), m.startswith("lift")) for m in shown),
                interval(f["metrics"].get("ablation_kl")),
                interval(f["metrics"].get("influence_share")),
                f["group_name"],
                f["label"],
            )
            for f in result.flagged
        ]
        print_table(
            f"{result.audit}: {len(result.flagged)} of {result.n_features} features flagged (top 20)",
            [
                "rank",
                "layer/feature",
                "assistant turns",
                *(m.replace("_", " ") for m in shown),
                "ablation KL",
                "influence share",
                "group",
                "label",
            ],
            rows[:20],
        )
        if result.template:
            rows = [(f["rank"], f"{f['layer']}/{f['feature']}", f["label"]) for f in result.template]
            print_table("template and marker features (not flagged)", ["rank", "layer/feature", "label"], rows)
        for note in result.notes:
            console.print(f"[yellow]note:[/] {escape(note)}")
        if summary.against:
            changes = ", ".join(f"{n} {change.replace('_', ' ')}" for change, n in sorted(result.changes.items()))
            console.print(f"against {summary.against}: {changes or 'no changes'}")
    console.print(
        f"run [bold]{summary.run_id}[/]: findings in audit_findings"
        + (", changes in audit_diffs" if summary.against else "")
    )


def print_cluster(summary) -> None:
    print_table("clusters", ["name status", "clusters"], sorted(summary.names_by_status.items()))
    print_table("audit groups", ["group", "features"], list(summary.group_sizes.items()))
    for group, categories in summary.missing_categories.items():
        console.print(
            f"[yellow]note:[/] group {escape(group)}: the run's corpus has no {', '.join(categories)} documents, "
            f"so they give no lift evidence"
        )
    stability = f"; ARI {summary.ari:.3f} against seed {summary.ari_vs_seed}" if summary.ari is not None else ""
    console.print(
        f"run [bold]{summary.run_id}[/]: {summary.n_features} features ({summary.n_reliable} reliably "
        f"labeled) in {summary.n_clusters} clusters, {summary.noise_fraction:.0%} noise{stability}; "
        f"{summary.calls} requests, {summary.seconds['total']:.0f} s"
    )
