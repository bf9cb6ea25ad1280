"""The cluster stage on features written straight into a temporary store: planted topics come back as
clusters, audit groups tag by label similarity and by probe lift, cluster names come over HTTP (the
fault-injecting server for garbage and for the cache, the real llama.cpp server for the wiring), bad
group specs fail clearly, and a re-run with another seed records its ARI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from sklearn.metrics import adjusted_rand_score
from test_cli import run_cli
from test_llm import FaultServer

from autolabel.cluster import cluster_stage
from autolabel.cluster.embed import combine, load_embedder
from autolabel.cluster.groups import load_groups
from autolabel.config import ClusterConfig, LLMConfig, RunConfig
from autolabel.errors import AutolabelError
from autolabel.store import Store, now, to_json
from autolabel.transcoders.transcoder import Transcoder, TranscoderSet

RUN = "run-1"

TOPICS = {
    "animals": [
        "cats and kittens",
        "dog breeds",
        "horses and riding",
        "birds such as sparrows and crows",
        "fish in rivers and lakes",
        "wild animals like lions and tigers",
        "pet rabbits and hamsters",
        "farm animals: cows, pigs and sheep",
        "insects such as bees and ants",
        "puppies and pet dogs",
    ],
    "programming": [
        "Python function definitions",
        "for loops in source code",
        "variable assignment in JavaScript",
        "import statements in Python",
        "SQL SELECT queries",
        "compiler error messages",
        "curly braces closing a code block",
        "class and method names in Java",
        "return statements in functions",
        "array indexing in C code",
    ],
    "weather": [
        "rain and storms",
        "sunny weather forecasts",
        "hot temperatures during a heatwave",
        "snow and winter cold",
        "wind speed and gusts",
        "cloudy skies and overcast days",
        "the weather forecast for tomorrow",
        "humidity and morning fog",
        "thunder and lightning",
        "hurricanes and tropical storms",
    ],
    "music": [
        "song lyrics",
        "guitar and piano playing",
        "concerts and live music",
        "music albums and records",
        "singers and bands",
        "musical notes and chords",
        "orchestras and classical music",
        "rap and hip hop songs",
        "drums and rhythm",
        "music charts and hit singles",
    ],
}
AUDIT_LABELS = {
    100: ("refuses harmful requests", "Fires where the assistant declines to help with a dangerous request."),
    101: ("chocolate in recipes", "Fires on chocolate added to cooking and baking recipes."),
}
RECIPE_FEATURE = 102  # no label; fires almost only on assistant tokens of recipe chats
UNLABELED = [103, 104]  # no label: placed from their top examples' text, reliable = false


def feature_rows(labels: dict[int, tuple[str, str]], unlabeled: list[int]) -> dict[str, list[dict]]:
    features = [
        {
            "run_id": RUN,
            "layer": 0,
            "feature": f,
            "n_tokens": 1000,
            "n_active": 10,
            "density": 0.01,
            "max_act": 1.0,
            "mean_act": 0.5,
            "status": "active",
        }
        for f in [*labels, *unlabeled]
    ]
    label_rows = [
        {
            "run_id": RUN,
            "layer": 0,
            "feature": f,
            "labeler": "test",
            "label": label,
            "explanation": explanation,
            "status": "ok",
            "created_at": now(),
        }
        for f, (label, explanation) in labels.items()
    ]
    return {"features": features, "labels": label_rows}


@pytest.fixture
def store_path(tmp_path, tokenizer):
    """Four planted topics, the two audit labels, one recipe-probe feature and two unlabeled features."""
    labels = {
        i * 10 + j: (label, f"Fires on text about {label}.")
        for i, topic in enumerate(TOPICS.values())
        for j, label in enumerate(topic)
    }
    labels.update(AUDIT_LABELS)
    rows = feature_rows(labels, [RECIPE_FEATURE, *UNLABELED])
    rows["examples"] = [
        {
            "run_id": RUN,
            "layer": 0,
            "feature": f,
            "kind": "top",
            "rank": 0,
            "tokens": tokenizer.encode(text),
            "acts": [1.0],
            "max_act": 1.0,
        }
        for f, text in [
            (RECIPE_FEATURE, "Melt the butter and stir in the flour"),
            (103, "the the the of of"),
            (104, "and so on and so forth"),
        ]
    ]
    rows["category_stats"] = [  # RECIPE_FEATURE: 40 of 200 recipe assistant tokens, 2 of 5000 in the travel
        # controls; as many in news, which is not a control of reward-model bias; feature 100 the other way round
        {
            "run_id": RUN,
            "layer": 0,
            "feature": f,
            "category": category,
            "role": "assistant",
            "n_tokens": n,
            "n_active": active,
            "sum_act": float(active),
            "n_turns": 10,
            "n_turns_active": min(active, 10),
        }
        for f, category, n, active in [
            (RECIPE_FEATURE, "recipe", 200, 40),
            (RECIPE_FEATURE, "travel", 5000, 2),
            (RECIPE_FEATURE, "news", 5000, 2000),
            (100, "recipe", 200, 1),
            (100, "travel", 5000, 25),
        ]
    ]
    rows["scores"] = [
        {
            "run_id": RUN,
            "layer": 0,
            "feature": 39,
            "labeler": "test",
            "scorer": "detection",
            "value": 0.4,
            "n": 10,
            "status": "ok",
            "unreliable": True,
        }
    ]  # a flagged label: placed, not trusted
    path = tmp_path / "s.duckdb"
    with Store(path) as store:
        store.write_shard(RUN, "test", "rows", rows)
    return path


@pytest.fixture(scope="module")
def embedder():
    return load_embedder(ClusterConfig().embed_dtype)


def config(server: FaultServer | None = None, **cluster) -> RunConfig:
    llm = (
        LLMConfig(base_url=server.base_url, model="namer", backoff_s=0.01, invalid_retries=1)
        if server
        else LLMConfig(max_tokens=96, concurrency=2)
    )
    return RunConfig(cluster=ClusterConfig(**{"min_cluster_size": 4, "neighbors": 8, **cluster}), llm=llm)


def named_server() -> FaultServer:
    return FaultServer([], answer=json.dumps({"name": "a topic", "description": "Features about one topic."}))


def test_planted_topics_are_recovered_and_names_come_over_http_then_from_the_cache(store_path, tokenizer, embedder):
    server = named_server()
    try:
        with Store(store_path) as store:
            summary = cluster_stage(store, tokenizer, None, RUN, config(server), embedder, show_progress=False)
            requests = server.requests
            placed = {
                (layer, f): (c, r)
                for layer, f, c, r in store.query(
                    "SELECT layer, feature, cluster_id, reliable FROM feature_map WHERE run_id = ?", [RUN]
                )[1]
            }
            clusters = store.query(
                "SELECT cluster_id, name, status, size FROM clusters WHERE run_id = ? ORDER BY cluster_id", [RUN]
            )[1]
            again = cluster_stage(store, tokenizer, None, RUN, config(server), embedder, show_progress=False)
            ledger = store.query("SELECT stage, cached, count(*) FROM llm_calls GROUP BY ALL ORDER BY ALL")[1]
    finally:
        server.close()
    truth = [i for i, topic in enumerate(TOPICS.values()) for _ in topic]
    found = [placed[(0, i * 10 + j)][0] for i, topic in enumerate(TOPICS.values()) for j in range(len(topic))]
    assert adjusted_rand_score(truth, found) >= 0.8, found
    # Every feature that fired has a place; unlabeled and flagged ones are placed but not reliable.
    assert len(placed) == 4 * 10 + len(AUDIT_LABELS) + 1 + len(UNLABELED) == summary.n_features
    assert [placed[(0, f)][1] for f in [RECIPE_FEATURE, *UNLABELED, 39]] == [False] * 4
    assert placed[(0, 0)][1] is True and summary.n_reliable == 4 * 10 + len(AUDIT_LABELS) - 1
    named = [c for c in clusters if c[0] >= 0]
    assert len(named) == summary.n_clusters >= 4
    assert all(status == "ok" and name == "a topic" for _, name, status, _ in named)
    assert sum(size for *_, size in clusters) == summary.n_features  # noise (-1) included
    assert requests == summary.calls == summary.names_by_status["ok"] > 0
    assert again.calls == 0 and server.requests == requests  # the second run: all from the cache
    assert ledger == [("cluster", False, requests), ("cluster", True, requests)]


def test_audit_groups_by_label_similarity_and_by_probe_lift(store_path, tokenizer, embedder):
    with Store(store_path) as store:
        summary = cluster_stage(store, tokenizer, None, RUN, config(name_clusters=False), embedder, show_progress=False)
        members = {
            (g, f): (s, lift, via)
            for g, f, s, lift, via in store.query(
                "SELECT group_name, feature, similarity, lift, via FROM groups WHERE run_id = ?", [RUN]
            )[1]
        }
    refusal = members[("refusal", 100)]
    assert refusal[0] >= 0.5 and "similarity" in refusal[2]
    assert ("reward_model_bias", 100) not in members
    assert "similarity" in members[("reward_model_bias", 101)][2] and ("refusal", 101) not in members
    # The unlabeled recipe feature joins by lift alone: (40+1)/(200+1) / ((2+1)/(5000+1)), about 340.
    similarity, lift, via = members[("reward_model_bias", RECIPE_FEATURE)]
    assert via == "lift" and similarity is None and lift == pytest.approx((41 / 201) / (3 / 5001))
    assert not any(f in {i * 10 + j for i in range(4) for j in range(10)} and g == "refusal" for g, f in members)
    assert summary.group_sizes["refusal"] >= 1 and summary.names_by_status == {"unnamed": summary.n_clusters}
    # Probe categories this corpus lacks are reported, not silently ignored.
    assert summary.missing_categories["reward_model_bias"] == ["coding", "poem", "units"]
    assert summary.missing_categories["refusal"] == ["benign", "harmful_request", "over_refusal"]
    assert "hallucination" not in summary.missing_categories


def test_garbage_names_are_recorded_as_failures_not_invented(store_path, tokenizer, embedder):
    server = FaultServer(["wrong_schema"] * 1000)
    try:
        with Store(store_path) as store:
            summary = cluster_stage(store, tokenizer, None, RUN, config(server), embedder, show_progress=False)
            rows = store.query("SELECT name, status, error FROM clusters WHERE run_id = ? AND cluster_id >= 0", [RUN])[
                1
            ]
    finally:
        server.close()
    assert rows and all(name is None and status == "invalid" and "name" in error for name, status, error in rows)
    assert summary.names_by_status == {"invalid": len(rows)} and server.requests == 2 * len(rows)


def test_another_seed_replaces_the_clustering_and_records_the_ari(store_path, tokenizer, embedder):
    with Store(store_path) as store:
        cluster_stage(store, tokenizer, None, RUN, config(name_clusters=False), embedder, show_progress=False)
        before = {(layer, f): c for layer, f, c in store.query("SELECT layer, feature, cluster_id FROM feature_map")[1]}
        cached_before = store.one("SELECT count(*) FROM text_embeddings")[0]
        second = cluster_stage(
            store, tokenizer, None, RUN, config(name_clusters=False, seed=1), embedder, show_progress=False
        )
        after = {(layer, f): c for layer, f, c in store.query("SELECT layer, feature, cluster_id FROM feature_map")[1]}
        runs = store.query(
            "SELECT seed, ari_vs_seed, ari, n_features, ari_clustered FROM cluster_runs ORDER BY created_at"
        )[1]
        cached = store.one("SELECT count(*) FROM text_embeddings")[0]
        clusters = store.one("SELECT count(*) FROM clusters WHERE cluster_id >= 0")[0]
    keys = sorted(before)
    expected = adjusted_rand_score([before[k] for k in keys], [after[k] for k in keys])
    clustered = [k for k in keys if before[k] >= 0 and after[k] >= 0]
    assert runs[0][:3] == (0, None, None) and runs[1][:2] == (1, 0)
    assert runs[1][4] == pytest.approx(
        adjusted_rand_score([before[k] for k in clustered], [after[k] for k in clustered])
    )
    assert runs[1][2] == pytest.approx(expected) == second.ari and second.ari_vs_seed == 0
    assert second.ari > 0.5 and len(after) == len(before) == runs[1][3]
    assert cached == cached_before >= len(before)  # every text was embedded once, then read from the cache
    assert clusters == second.n_clusters  # the first run's clusters were replaced, none left over


def test_label_plus_decoder_mixes_the_cosines_and_weight_1_clusters_by_decoder(store_path, tokenizer, embedder):
    text = np.eye(3, 4, dtype=np.float32)
    decoder = np.array([[1, 0], [1, 0], [0, 1]], dtype=np.float32)
    mixed = combine(text, decoder, 0.3)
    # cosine = 0.7 * text cosine + 0.3 * decoder cosine, and every point stays a unit vector
    assert np.allclose(mixed @ mixed.T, 0.7 * (text @ text.T) + 0.3 * (decoder @ decoder.T), atol=1e-6)
    # Decoder rows planted in three directions that cut across the label topics (feature id mod 3):
    # with all the weight on the decoder, the clusters follow the decoder, not the labels.
    generator = torch.Generator().manual_seed(0)
    axes = torch.eye(16)[:3] * 5
    W_dec = axes[torch.arange(110) % 3] + torch.randn(110, 16, generator=generator) * 0.3
    tset = TranscoderSet({0: Transcoder(0, torch.zeros(4, 110), torch.zeros(110), W_dec, torch.zeros(16))})
    with Store(store_path) as store:
        cluster_stage(
            store,
            tokenizer,
            tset,
            RUN,
            config(name_clusters=False, embedding="label+decoder", decoder_weight=1.0),
            embedder,
            show_progress=False,
        )
        placed = store.query("SELECT feature, cluster_id FROM feature_map WHERE run_id = ? ORDER BY 1", [RUN])[1]
    assert adjusted_rand_score([f % 3 for f, _ in placed], [c for _, c in placed]) >= 0.8, placed


def write_spec(tmp_path, change) -> str:
    spec = yaml.safe_load(Path(ClusterConfig().groups).read_text())
    change(spec)
    path = tmp_path / "groups.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def test_bad_group_specs_name_the_file_group_field_and_fix(tmp_path):
    assert len(load_groups(ClusterConfig().groups).groups) == 7  # the shipped spec is valid
    unknown = write_spec(tmp_path, lambda s: s["groups"]["refusal"].update(sedes=["x"]))
    with pytest.raises(AutolabelError, match=r"groups.yaml.*group 'refusal', field 'sedes'.*remove it"):
        load_groups(unknown)
    empty = write_spec(tmp_path, lambda s: s["groups"]["sycophancy"].update(seeds=[]))
    with pytest.raises(AutolabelError, match=r"group 'sycophancy', field 'seeds'.*at least one"):
        load_groups(empty)
    blank = write_spec(tmp_path, lambda s: s["groups"]["sycophancy"].update(seeds=["  "]))
    with pytest.raises(AutolabelError, match=r"group 'sycophancy', field 'seeds.0'"):
        load_groups(blank)
    threshold = write_spec(tmp_path, lambda s: s["groups"]["refusal"].update(min_similarity=1.5))
    with pytest.raises(AutolabelError, match=r"group 'refusal', field 'min_similarity'.*at most 1"):
        load_groups(threshold)
    role = write_spec(tmp_path, lambda s: s["groups"]["refusal"].update(roles=["assistent"]))
    with pytest.raises(AutolabelError, match=r"group 'refusal', field 'roles'.*assistent"):
        load_groups(role)
    overlap = write_spec(tmp_path, lambda s: s["groups"]["refusal"].update(controls=["harmful_request"]))
    with pytest.raises(AutolabelError, match=r"group 'refusal', field 'controls'.*harmful_request"):
        load_groups(overlap)


def test_cli_exits_2_on_a_bad_spec_leaving_the_store_as_it_was_then_clusters(
    monkeypatch, capsys, tmp_path, tiny_model_dir, store_path
):
    with Store(store_path) as store:  # make the planted rows a collected run of the tiny model
        store.con.execute(
            "INSERT INTO runs (run_id, started_at, status, config_json) VALUES (?, ?, 'complete', ?)",
            [RUN, now(), to_json(RunConfig(model={"source": str(tiny_model_dir)}).model_dump(mode="json"))],
        )
        store.write_shard(RUN, "collect", "final", {})
    code, out, _ = run_cli(monkeypatch, capsys, "cluster", "--help")
    assert code == 0 and "--seed" in out and "--groups" in out
    spec = write_spec(tmp_path, lambda s: s["groups"]["refusal"].update(sedes=["x"]))
    code, _, err = run_cli(monkeypatch, capsys, "cluster", "--store", str(store_path), "--groups", spec, "--no-names")
    assert code == 2 and "field 'sedes'" in err and "remove it" in err
    with Store(store_path) as store:
        assert store.one("SELECT count(*) FROM feature_map")[0] == 0
        assert store.one("SELECT count(*) FROM shards WHERE stage = 'cluster'")[0] == 0
    code, out, err = run_cli(monkeypatch, capsys, "cluster", "--store", str(store_path), "--no-names", "--quiet")
    assert code == 0 and "refusal" in out and "45 features (41 reliably labeled)" in out, err
    with Store(store_path) as store:
        assert store.one("SELECT count(*) FROM feature_map WHERE run_id = ?", [RUN])[0] == 45


def test_names_from_the_real_local_llama_server(tmp_path, tokenizer, embedder):
    """The wiring with llama.cpp serving SmolLM2: the schema makes it answer in the right shape."""
    labels = {
        i * 10 + j: (label, f"Fires on text about {label}.")
        for i, topic in enumerate(list(TOPICS.values())[:2])
        for j, label in enumerate(topic)
    }
    with Store(tmp_path / "s.duckdb") as store:
        store.write_shard(RUN, "test", "rows", feature_rows(labels, []))
        summary = cluster_stage(store, tokenizer, None, RUN, config(groups=""), embedder, show_progress=False)
        rows = store.query("SELECT name, status FROM clusters WHERE run_id = ? AND cluster_id >= 0", [RUN])[1]
        calls = store.one("SELECT count(*) FROM llm_calls WHERE stage = 'cluster' AND status = 'ok'")[0]
    assert rows and all(status == "ok" and name for name, status in rows), rows
    assert calls == summary.calls == len(rows)
