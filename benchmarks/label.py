"""Labeling cost per feature (explain + detection + fuzzing) against one local server, next to delphi's.

    .venv/bin/python benchmarks/label.py [--features 6] [--delphi-python /work/venvs/delphi/bin/python]

Both tools talk to the same llama.cpp server (SmolLM2-135M-Instruct, started by
autolabel on 127.0.0.1) about the same features of a collected run of the
embedded transcoders: the latest run in --store, or a small collection made
first. autolabel labels in a copy of the store that keeps no labels, scores or
cached answers, so every feature is labeled and every request really goes to
the server; its row counts the labels, scores and requests of those features
only. delphi runs in its own venv
(benchmarks/delphi_label.py) on the same examples: the even-ranked top examples
to explain from, the odd-ranked ones and the random contexts to score with.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from autolabel.config import LabelConfig, LLMConfig, RunConfig
from autolabel.label.evidence import read_examples
from autolabel.label.stage import label_stage
from autolabel.llm import local_server
from autolabel.models import load_subject_model
from autolabel.store import Store
from autolabel.transcoders.stage import open_transcoders


def pick_features(store: Store, run_id: str, n: int) -> list[tuple[int, int]]:
    """n features with at least 8 top examples, spread evenly over the density ranking."""
    rows = store.con.execute(
        "SELECT f.layer, f.feature FROM features f JOIN examples e USING (run_id, layer, feature) "
        "WHERE f.run_id = ? AND e.kind = 'top' GROUP BY ALL HAVING count(*) >= 8 "
        "ORDER BY any_value(f.density) DESC, 1, 2",
        [run_id],
    ).fetchall()
    step = max(len(rows) // n, 1)
    return [tuple(r) for r in rows[::step][:n]]


def export(store: Store, run_id: str, features: list[tuple[int, int]], tokenizer, path: Path) -> None:
    records = []
    for layer, feature in features:
        examples = read_examples(store, run_id, layer, feature, tokenizer)
        shape = lambda e: {"tokens": [], "str_tokens": e.pieces, "acts": e.acts}  # noqa: E731
        records.append(
            {
                "layer": layer,
                "feature": feature,
                "train": [shape(e) for e in examples["top"][0::2][:8]],
                "test": [shape(e) for e in examples["top"][1::2]],
                "negatives": [shape(e) for e in examples["random"]],
            }
        )
    path.write_text(json.dumps(records))


def forget_labels(store: Store) -> None:
    """The copy's earlier labels would count as done and its cached answers would be replayed for free."""
    for table in ("labels", "scores", "llm_cache", "llm_calls"):
        store.con.execute(f"DELETE FROM {table}")
    store.con.execute("DELETE FROM shards WHERE stage = 'label'")


def made(store: Store, run_id: str, labeler: str, features: list[tuple[int, int]]) -> dict:
    """What labeling `features` of the run made: valid labels, mean prompt tokens, mean score per scorer."""
    wanted = set(features)
    statuses = [
        status
        for layer, feature, status in store.con.execute(
            "SELECT layer, feature, status FROM labels WHERE run_id = ? AND labeler = ?", [run_id, labeler]
        ).fetchall()
        if (layer, feature) in wanted
    ]
    scores: dict[str, list[float]] = {}
    for layer, feature, scorer, value in store.con.execute(
        "SELECT layer, feature, scorer, value FROM scores WHERE run_id = ? AND status = 'ok'", [run_id]
    ).fetchall():
        if (layer, feature) in wanted:
            scores.setdefault(scorer, []).append(value)
    ((tokens_in,),) = store.query(
        "SELECT avg(tokens_in) FROM llm_calls WHERE run_id = ? AND model = ? "
        "AND stage = 'label' AND status = 'ok' AND NOT cached",
        [run_id, labeler],
    )[1]
    return {
        "valid": statuses.count("ok"),
        "prompt_tokens": tokens_in,
        **{scorer: _mean(values) for scorer, values in scores.items()},
    }


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default="/tmp/autolabel-bench/bench.duckdb", help="a store with a collected run")
    parser.add_argument("--features", type=int, default=6)
    parser.add_argument("--delphi-python", help="python of a venv with eai-delphi installed")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="label-bench-"))
    store_path = workdir / "copy.duckdb"
    shutil.copy(args.store, store_path)  # labels and cached answers are cleared in the copy below
    base = RunConfig()
    subject = load_subject_model(base.model.source, base.cache_dir)
    tset = open_transcoders(base.transcoder.source)
    with Store(store_path) as store:
        row = store.one(
            "SELECT run_id FROM shards WHERE stage = 'collect' AND shard = 'final' ORDER BY committed_at DESC"
        )
        if row is None:
            raise SystemExit(f"{args.store} has no collected run; run benchmarks/collect.py first")
        run_id = row[0]
        forget_labels(store)
        features = pick_features(store, run_id, args.features)
        export(store, run_id, features, subject.tokenizer, workdir / "examples.json")

    llm = LLMConfig(concurrency=2)
    rows = {}
    with local_server(llm) as base_url:
        served = llm.model_copy(update={"base_url": base_url})
        config = RunConfig(label=LabelConfig(features=None, scorers=["detection", "fuzzing"]), llm=served)
        started = time.perf_counter()
        with Store(store_path) as store:
            by_layer: dict[int, list[int]] = {}
            for layer, feature in features:
                by_layer.setdefault(layer, []).append(feature)
            calls = 0
            for layer, ids in by_layer.items():
                config.label.layers, config.label.features = [layer], ids
                calls += label_stage(store, subject, tset, run_id, config, show_progress=False).calls
            seconds = time.perf_counter() - started
            result = made(store, run_id, llm.model, features)
        rows["autolabel (explain + detection + fuzzing)"] = {
            "seconds_per_feature": seconds / len(features),
            "requests_per_feature": calls / len(features),
            "valid": f"{result['valid']}/{len(features)}",
            "prompt_tokens": result["prompt_tokens"],
            "detection": result.get("detection"),
            "fuzzing": result.get("fuzzing"),
        }
        if args.delphi_python:
            command = [
                args.delphi_python,
                str(Path(__file__).parent / "delphi_label.py"),
                "--base-url",
                base_url,
                "--model",
                llm.model,
                "--examples",
                str(workdir / "examples.json"),
                "--max-tokens",
                str(llm.max_tokens),
            ]
            out = json.loads(
                subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1]
            )
            rows["delphi 0.1.3 (explain + detection + fuzzing)"] = {
                "seconds_per_feature": out["seconds_per_feature"],
                "requests_per_feature": out["requests_per_feature"],
                "valid": f"{out['features'] - out['failures']}/{out['features']}",
                "prompt_tokens": None,
                "detection": _mean([f["detection"] for f in out["per_feature"]]),
                "fuzzing": _mean([f["fuzzing"] for f in out["per_feature"]]),
            }

    print(f"\n{len(features)} features of run {run_id}; labeler SmolLM2-135M-Instruct on a local llama.cpp server")
    print(f"{'what':<46}{'s/feature':>10}{'req/feat':>9}{'valid':>7}{'prompt tok':>11}{'detect':>8}{'fuzz':>7}")
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    for name, r in rows.items():
        print(
            f"{name:<46}{r['seconds_per_feature']:>10.1f}{fmt(r['requests_per_feature'], '.1f'):>9}{r['valid']:>7}"
            f"{fmt(r['prompt_tokens'], '.0f'):>11}{fmt(r['detection'], '.2f'):>8}{fmt(r['fuzzing'], '.2f'):>7}"
        )
    if len(rows) == 2:
        ours, theirs = rows.values()
        ratio = ours["seconds_per_feature"] / theirs["seconds_per_feature"]
        print(f"\nautolabel takes {ratio:.2f}x delphi's seconds per feature")


if __name__ == "__main__":
    main()
