"""Collection on the tiny model: streamed results equal a brute-force dense reference,
resuming after a crash changes nothing, and the planted features fire where they were built to."""

from __future__ import annotations

import json
import random
from collections import defaultdict

import numpy as np
import pytest
import torch
from test_cli import run_cli

from autolabel.collect import collect_stage
from autolabel.collect.orders import LogBins, feature_salts, priorities, quantile_bins
from autolabel.collect.stage import (
    CorpusIndex,
    capture_batches,
    encode,
    plan_shards,
    shard_windows,
)
from autolabel.config import ROLES, CollectConfig, CorpusConfig, SourceConfig
from autolabel.corpus import build_corpus, iter_windows
from autolabel.store import Store
from autolabel.transcoders.transcoder import Transcoder, TranscoderSet

WORDS = "the cat sat on a mat while rain fell over old town roads and quiet rivers ran past green hills".split()
LAYER = 1
CONFIG = CollectConfig(
    top_k=6,
    example_tokens=8,
    quantile_bins=4,
    per_bin=3,
    random_examples=5,
    bins_per_octave=2,
    octaves=3,
    batch_windows=3,
    shard_tokens=700,
)
TABLES = {
    "features": "layer, feature",
    "role_stats": "layer, feature, role",
    "category_stats": "layer, feature, category, role",
    "examples": "layer, feature, kind, rank",
}


def write_corpus(path, n_text: int = 24, n_chat: int = 16, seed: int = 0) -> None:
    rng = random.Random(seed)
    rows = [
        {
            "id": f"t{i}",
            "category": ["news", "story"][i % 2],
            "text": " ".join(rng.choices(WORDS, k=rng.randint(3, 150))),
        }
        for i in range(n_text)
    ]
    rows += [
        {
            "id": f"c{i}",
            "category": ["help", "chit"][i % 2],
            "messages": [
                {"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(3, 30)))},
                {
                    "role": "assistant",
                    "content": "well certainly " + " ".join(rng.choices(WORDS, k=rng.randint(20, 90))),
                },
                {"role": "user", "content": " ".join(rng.choices(WORDS, k=5))},
                {
                    "role": "assistant",
                    "content": "well certainly " + " ".join(rng.choices(WORDS, k=rng.randint(2, 10))),
                },
            ],
        }
        for i in range(n_chat)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def file_corpus(folder, subject, ctx_len: int) -> tuple:
    """Build the corpus of folder/docs.jsonl (no generated replies) in folder/s.duckdb: (store, corpus_id, windows)."""
    config = CorpusConfig(sources=[SourceConfig(name="file", path=str(folder / "docs.jsonl"))], ctx_len=ctx_len)
    config.generation.enabled = False
    with Store(folder / "s.duckdb") as store:
        corpus_id = build_corpus(store, config, subject, show_progress=False).corpus_id
        windows = list(iter_windows(store, corpus_id))
    return folder / "s.duckdb", corpus_id, windows


def window_acts(subject, tset: TranscoderSet, store_path, corpus_id, config: CollectConfig):
    """(window, [len, d_feat] activations) for every window, through the same batches collection runs."""
    with Store(store_path) as store:
        index = CorpusIndex.read(store, corpus_id)
        shards = [
            shard_windows(store, corpus_id, index, a, b) for a, b in plan_shards(index.doc_tokens, config.shard_tokens)
        ]
    pairs = []
    for windows in shards:
        for start in range(0, len(windows), config.batch_windows):
            group = windows[start : start + config.batch_windows]
            ((_, inputs),) = capture_batches(subject, tset, group, index, len(group))
            acts = encode(tset, LAYER, inputs[LAYER])
            pairs += [(w, acts[row, : len(w.token_ids)]) for row, w in enumerate(group)]
    return pairs


def mlp_inputs(subject, windows) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """The MLP inputs [N, d] at LAYER of every window token but the first, with their token ids and roles [N]."""
    point = subject.hook_point("mlp_in", LAYER)
    raw = torch.cat(
        [
            subject.capture(torch.from_numpy(w.token_ids.astype("int64"))[None], None, [point])[point][0, 1:]
            for w in windows
        ]
    )
    return raw, np.concatenate([w.token_ids[1:] for w in windows]), np.concatenate([w.roles[1:] for w in windows])


def detector(raw: torch.Tensor, mask: np.ndarray) -> tuple[torch.Tensor, float]:
    """An encoder column and bias that fire on the masked tokens' direction and on nothing else."""
    assert mask.any(), "the planted target never occurs in the corpus"
    inside, outside = raw[torch.from_numpy(mask)], raw[torch.from_numpy(~mask)]
    direction = inside.mean(0) - outside.mean(0)
    direction /= direction.norm()
    return direction, -float((outside @ direction).max())


def plant(corpus: tuple, tiny_subject) -> tuple[TranscoderSet, list[int]]:
    """A ReLU transcoder whose features are built from the model's own activations to fire on known things
    (the `planted` fixture): (transcoder set, target token ids)."""
    _, _, windows = corpus
    tokenizer = tiny_subject.tokenizer
    raw, ids, _ = mlp_inputs(tiny_subject, windows)  # [N, 32], [N]
    columns, biases = [torch.zeros(32), torch.zeros(32)], [-1.0, 1.0]  # 0: dead, 1: constant (all ties)
    targets = [tokenizer.convert_tokens_to_ids(f"Ġ{w}") for w in ("cat", "rain", "hills")]
    # 2-4: token detectors; 5: a word that only assistant turns use, so it marks assistant turns
    for mask in [ids == token for token in targets] + [ids == tokenizer.convert_tokens_to_ids("Ġcertainly")]:
        direction, bias = detector(raw, mask)
        columns.append(direction)
        biases.append(bias)
    generator = torch.Generator().manual_seed(0)
    for _ in range(10):  # dense random features with continuous values
        columns.append(torch.randn(32, generator=generator))
        biases.append(0.0)
    W_enc = torch.stack(columns, dim=1)  # [32, 16]
    tset = TranscoderSet({LAYER: Transcoder(LAYER, W_enc, torch.tensor(biases), torch.randn(16, 32), torch.zeros(32))})
    return tset, targets


def table(store: Store, name: str, run_id: str) -> list[tuple]:
    return store.query(f"SELECT * EXCLUDE (run_id) FROM {name} WHERE run_id = ? ORDER BY {TABLES[name]}", [run_id])[1]


def collect(store_path, corpus_id, subject, tset, config=CONFIG, **kwargs) -> tuple[str, object]:
    with Store(store_path) as store:
        run_id = kwargs.pop("run_id", None) or store.start_run("{}", subject.model_id)
        return run_id, collect_stage(
            store, subject, tset, corpus_id, "tc-test", config, run_id, show_progress=False, **kwargs
        )


def reference(pairs, config: CollectConfig):
    """Everything collection keeps, from all activations held at once and sorted outright."""
    bins, T = LogBins(config.bins_per_octave, config.octaves), config.example_tokens
    windows = [w for w, _ in pairs]
    per_window = [acts for _, acts in pairs]
    ordinal = {d: i for i, d in enumerate(sorted({w.doc_id for w in windows}))}
    F = per_window[0].shape[1]
    tokens = torch.cat([a[1:] for a in per_window])  # [N, F], every window's first token left out
    roles = np.concatenate([w.roles[1:] for w in windows])
    turn_of = [(w.doc_id, int(t), int(r)) for w in windows for t, r in zip(w.turns[1:], w.roles[1:], strict=True)]
    category = [w.category for w in windows for _ in range(len(w.token_ids) - 1)]
    exponent = bins.exponent_of(tokens.amax(0).clamp_min(1e-30))

    stats = {"n_active": (tokens > 0).sum(0), "sum": tokens.double().sum(0), "max": tokens.amax(0)}
    by_role, by_group, turns = {}, {}, defaultdict(lambda: torch.zeros(F, dtype=torch.bool))
    for r, name in enumerate(ROLES):
        mask = torch.from_numpy(roles == r)
        by_role[name] = (int(mask.sum()), (tokens[mask] > 0).sum(0), tokens[mask].double().sum(0))
    for key in set(zip(category, roles.tolist(), strict=True)):
        mask = torch.tensor([c == key[0] and r == key[1] for c, r in zip(category, roles.tolist(), strict=True)])
        by_group[key] = (int(mask.sum()), (tokens[mask] > 0).sum(0))
    for i, key in enumerate(turn_of):
        turns[(category[i], key)] |= tokens[i] > 0
    hist = torch.zeros(bins.n, F, dtype=torch.long)
    for f in range(F):
        values = tokens[:, f][tokens[:, f] > 0]
        hist[:, f] = torch.bincount(bins.bin_of(values, exponent[f]), minlength=bins.n)

    # Examples: one peak per window, contexts around it, as (doc_id, start, tokens, acts, max_act).
    peaks = []
    for w, acts in pairs:
        valid = acts.clone()
        valid[0] = 0
        value, pos = valid.max(0)
        for f in range(F):
            if value[f] <= 0:
                continue
            p = int(pos[f])
            first = min(max(p - T // 2, 1), max(len(w.token_ids) - T, 1))
            length = min(len(w.token_ids) - first, T)
            key = (ordinal[w.doc_id] << 20) | (w.start + p)
            peaks.append((f, float(value[f]), key, w, first, length, p, valid[first : first + length, f]))
    top, quantile = defaultdict(list), defaultdict(list)
    for f in range(F):
        mine = sorted((c for c in peaks if c[0] == f), key=lambda c: (-c[1], c[2]))
        seen = set()
        for c in mine:
            prefix = tuple(c[3].token_ids[c[4] : c[6] + 1])
            if prefix not in seen and len(top[f]) < config.top_k:
                seen.add(prefix)
                top[f].append(c)
        if not mine:
            continue
        peak_hist = torch.bincount(bins.bin_of(torch.tensor([c[1] for c in mine]), exponent[f]), minlength=bins.n)
        qbin = quantile_bins(peak_hist[:, None], config.quantile_bins)[:, 0]
        keyed = [
            (
                int(qbin[int(bins.bin_of(torch.tensor(c[1]), exponent[f]))]),
                int(priorities(torch.tensor(c[2]), feature_salts(F, config.seed)[f])),
                c,
            )
            for c in mine
        ]
        for q in range(config.quantile_bins):
            chosen = sorted((k for k in keyed if k[0] == q), key=lambda k: k[1])[: config.per_bin]
            quantile[f] += [(q, len(quantile[f]) + rank, k[2]) for rank, k in enumerate(chosen)]

    negatives = defaultdict(list)
    for w, acts in pairs:
        for first in range(1, len(w.token_ids), T):
            length = min(T, len(w.token_ids) - first)
            if length < T // 2:
                continue
            key = (ordinal[w.doc_id] << 20) | (w.start + first)
            for f in range(F):
                if acts[first : first + length, f].max() == 0:
                    negatives[f].append(
                        (int(priorities(torch.tensor(key), feature_salts(F, config.seed)[f])), w, first)
                    )
    negatives = {f: sorted(found, key=lambda n: n[0])[: config.random_examples] for f, found in negatives.items()}
    return {
        "stats": stats,
        "by_role": by_role,
        "by_group": by_group,
        "turns": turns,
        "hist": hist,
        "top": top,
        "quantile": quantile,
        "negatives": negatives,
        "n_tokens": tokens.shape[0],
    }


def test_collection_equals_brute_force_reference(corpus, tiny_subject, planted, collected):
    store_path, corpus_id, _ = corpus
    tset, _ = planted
    run_id, summary = collected
    ref = reference(window_acts(tiny_subject, tset, store_path, corpus_id, CONFIG), CONFIG)
    assert summary.n_tokens == ref["n_tokens"]
    with Store(store_path) as store:
        features = {
            r[0]: r
            for r in store.query(
                "SELECT feature, n_active, mean_act, max_act, histogram, status, n_tokens FROM features "
                "WHERE run_id = ? ORDER BY feature",
                [run_id],
            )[1]
        }
        roles = store.query(
            "SELECT feature, role, n_tokens, n_active, sum_act, n_turns, n_turns_active FROM role_stats "
            "WHERE run_id = ?",
            [run_id],
        )[1]
        groups = store.query(
            "SELECT feature, category, role, n_tokens, n_active, n_turns, n_turns_active "
            "FROM category_stats WHERE run_id = ?",
            [run_id],
        )[1]
        examples = store.query(
            "SELECT feature, kind, rank, bin, doc_id, start, tokens, acts, max_act FROM examples "
            "WHERE run_id = ? ORDER BY feature, kind, bin, rank",
            [run_id],
        )[1]

    F = tset.d_feat
    for f in range(F):
        n_active, mean_act, max_act, histogram, status, n_tokens = features[f][1:]
        assert n_tokens == ref["n_tokens"] and n_active == int(ref["stats"]["n_active"][f])
        assert histogram == ref["hist"][:, f].tolist()
        if n_active:
            assert max_act == pytest.approx(float(ref["stats"]["max"][f]))
            assert mean_act == pytest.approx(float(ref["stats"]["sum"][f]) / n_active, rel=1e-5)
        assert status == ("dead" if n_active == 0 else "active")
    for f, role, n_tokens, n_active, sum_act, n_turns, n_turns_active in roles:
        ref_tokens, ref_active, ref_sum = ref["by_role"][role]
        assert (n_tokens, n_active) == (ref_tokens, int(ref_active[f]))
        assert sum_act == pytest.approx(float(ref_sum[f]), rel=1e-5, abs=1e-6)
        turn_keys = [k for k in ref["turns"] if ROLES[k[1][2]] == role]
        assert n_turns == len(turn_keys)
        assert n_turns_active == sum(bool(ref["turns"][k][f]) for k in turn_keys)
    assert {(c, r) for _, c, r, *_ in groups} == {(c, ROLES[r]) for c, r in ref["by_group"]}
    for f, category, role, n_tokens, n_active, n_turns, n_turns_active in groups:
        ref_tokens, ref_active = ref["by_group"][(category, ROLES.index(role))]
        assert (n_tokens, n_active) == (ref_tokens, int(ref_active[f]))
        keys = [k for k in ref["turns"] if k[0] == category and ROLES[k[1][2]] == role]
        assert (n_turns, n_turns_active) == (len(keys), sum(bool(ref["turns"][k][f]) for k in keys))

    got = defaultdict(list)
    for f, kind, rank, bin_, doc_id, start, tokens, acts, max_act in examples:
        got[(f, kind)].append((bin_, rank, doc_id, start, tokens, acts, max_act))
    for f in range(F):
        expected = [
            (
                None,
                rank,
                c[3].doc_id,
                c[3].start + c[4],
                c[3].token_ids[c[4] : c[4] + c[5]].tolist(),
                c[7].tolist(),
                c[1],
            )
            for rank, c in enumerate(ref["top"][f])
        ]
        assert [e[:5] for e in got[(f, "top")]] == [e[:5] for e in expected], f"top examples of feature {f}"
        for row, e in zip(got[(f, "top")], expected, strict=True):
            # Context activations are kept in bfloat16 (3 significant digits); the peak in float32.
            assert row[5] == pytest.approx(e[5], rel=1e-2, abs=1e-6) and row[6] == pytest.approx(e[6])
        expected_q = [(q, rank, c[3].doc_id, c[3].start + c[4]) for q, rank, c in ref["quantile"][f]]
        assert [e[:4] for e in got[(f, "quantile")]] == expected_q, f"quantile samples of feature {f}"
        expected_neg = sorted((n[1].doc_id, n[1].start + n[2]) for n in ref["negatives"].get(f, []))
        assert sorted(e[2:4] for e in got[(f, "random")]) == expected_neg, f"random examples of feature {f}"


def test_planted_features_fire_where_built(corpus, tiny_subject, planted, collected):
    store_path, _, _ = corpus
    _, targets = planted
    run_id, summary = collected
    with Store(store_path) as store:
        status = dict(store.query("SELECT feature, status FROM features WHERE run_id = ?", [run_id])[1])
        top = store.query(
            "SELECT feature, tokens[list_position(acts, list_max(acts))] FROM examples "
            "WHERE run_id = ? AND kind = 'top' AND feature IN (2, 3, 4)",
            [run_id],
        )[1]
        turn_share = dict(
            store.query(
                "SELECT role, n_turns_active / n_turns FROM role_stats WHERE run_id = ? AND feature = 5", [run_id]
            )[1]
        )
        constant = store.one(
            "SELECT count(*), count(DISTINCT tokens[1:2]) FROM examples "
            "WHERE run_id = ? AND feature = 1 AND kind = 'top'",
            [run_id],
        )
    assert status[0] == "dead" and summary.status_by_layer[LAYER]["dead"] >= 1
    for feature, peak_token in top:  # token detectors peak on their token
        assert peak_token == targets[feature - 2]
    assert turn_share["assistant"] >= 0.9 and turn_share["user"] == turn_share["text"] == 0
    # A constant feature ties everywhere: its top contexts are still all distinct.
    assert constant[0] == CONFIG.top_k and constant[1] == constant[0]


class Crash(Exception):
    pass


def test_resume_after_crash_equals_uninterrupted_run(corpus, tiny_subject, planted, collected):
    store_path, corpus_id, _ = corpus
    tset, _ = planted
    full_run, _ = collected

    def crash_after_three(n_done: int) -> None:
        if n_done == 3:
            raise Crash

    with Store(store_path) as store:
        run_id = store.start_run("{}", tiny_subject.model_id)
    with pytest.raises(Crash):
        collect(store_path, corpus_id, tiny_subject, tset, run_id=run_id, after_shard=crash_after_three)
    with Store(store_path) as store:
        assert len(store.committed_shards(run_id, "collect")) == 3
        assert store.one("SELECT count(*) FROM features WHERE run_id = ?", [run_id])[0] == 0
    _, summary = collect(store_path, corpus_id, tiny_subject, tset, run_id=run_id)
    assert summary.resumed_shards == 3
    with Store(store_path) as store:
        for name in TABLES:
            assert table(store, name, run_id) == table(store, name, full_run), name
        assert not (store_path.parent / f"{store_path.name}.collect" / run_id).exists()  # checkpoints cleaned up


def test_resume_refuses_other_settings(corpus, tiny_subject, planted):
    from autolabel.errors import AutolabelError

    store_path, corpus_id, _ = corpus
    with Store(store_path) as store:
        run_id = store.start_run("{}", tiny_subject.model_id)

    def crash(n_done: int) -> None:
        raise Crash

    with pytest.raises(Crash):
        collect(store_path, corpus_id, tiny_subject, planted[0], run_id=run_id, after_shard=crash)
    with pytest.raises(AutolabelError, match="other collect settings"):
        collect(
            store_path,
            corpus_id,
            tiny_subject,
            planted[0],
            config=CONFIG.model_copy(update={"top_k": 9}),
            run_id=run_id,
        )


def tiny_run_config(folder, model_dir, cache_dir) -> dict:
    """A whole run's config on the tiny model: a corpus file, a random transcoder for layers 1 and 2
    saved in the circuit-tracer layout, and small shards."""
    from autolabel.transcoders.formats import save_circuit_tracer

    write_corpus(folder / "docs.jsonl", n_text=60, n_chat=30)
    generator = torch.Generator().manual_seed(1)
    tset = TranscoderSet(
        {
            layer: Transcoder(
                layer,
                torch.randn(32, 64, generator=generator),
                torch.zeros(64),
                1e-3 * torch.randn(64, 32, generator=generator),
                torch.zeros(32),
            )
            for layer in (1, 2)
        }
    )
    save_circuit_tracer(tset, folder / "tc", "tiny")
    return {
        "cache_dir": str(cache_dir),
        "store": str(folder / "s.duckdb"),
        "model": {"source": str(model_dir)},
        "corpus": {
            "sources": [{"name": "file", "path": str(folder / "docs.jsonl")}],
            "ctx_len": 48,
            "generation": {"enabled": False},
        },
        "transcoder": {"source": str(folder / "tc"), "max_fvu": 1e6, "check_tokens": 500},
        "collect": CONFIG.model_copy(update={"shard_tokens": 150, "batch_windows": 2}).model_dump(),
        "report": {"out_dir": str(folder / "reports")},
        "audit": {"label_flagged": 0},
    }


def test_kill_9_then_resume_equals_uninterrupted_run(
    monkeypatch, capsys, tmp_path, tiny_model_dir, cache_dir, prefect_api
):
    """The real thing: SIGKILL the CLI mid-collection, `collect --resume`, compare every table."""
    import os
    import signal
    import subprocess
    import sys

    import yaml

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_run_config(tmp_path, tiny_model_dir, cache_dir)))
    store = tmp_path / "s.duckdb"

    # The child stops itself (SIGSTOP) right after its second shard is committed and checkpointed; then
    # it is killed with SIGKILL, at exactly that point however loaded the machine is.
    stop_after_two = (
        "import os, signal\nfrom autolabel.collect import stage\nkeep = stage.Checkpoints.drop_older\n"
        "def drop_then_stop(self, n_done):\n    keep(self, n_done)\n    if n_done == 2:\n"
        "        os.kill(os.getpid(), signal.SIGSTOP)\n"
        "stage.Checkpoints.drop_older = drop_then_stop\nfrom autolabel.cli import main\nmain()"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", stop_after_two, "collect", "-q", "-c", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "PREFECT_API_URL": prefect_api},
    )
    _, wait_status = os.waitpid(process.pid, os.WUNTRACED)
    assert os.WIFSTOPPED(wait_status), process.stderr.read().decode()
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    with Store(store) as db:
        ((run_id, status),) = db.query("SELECT run_id, status FROM runs")[1]
        assert status == "running" and db.one("SELECT count(*) FROM features")[0] == 0
        assert db.committed_shards(run_id, "collect") == {"docs-00000", "docs-00001"}

    code, out, err = run_cli(monkeypatch, capsys, "collect", "--resume", "-q", "-c", str(config))
    assert code == 0, err
    assert f"run {run_id}" in out and "resumed after" in out
    # Uninterrupted, a new run; --fresh, or the flow would copy the resumed run's identical collection.
    code, _, err = run_cli(monkeypatch, capsys, "collect", "--fresh", "-q", "-c", str(config))
    assert code == 0, err
    with Store(store) as db:
        (other,) = [r for (r,) in db.query("SELECT run_id FROM runs")[1] if r != run_id]
        assert db.query("SELECT DISTINCT status FROM runs")[1] == [("complete",)]
        for name in TABLES:
            assert table(db, name, run_id) == table(db, name, other), name


def test_slices_collected_apart_and_merged_equal_one_pass(corpus, tiny_subject, planted, collected):
    """What scale-out relies on: any split of the shard plan, merged, gives the single-process tables."""
    from autolabel.collect.stage import collect_slice, merge_slices, slice_plan

    store_path, corpus_id, _ = corpus
    run_id, _ = collected
    with Store(store_path) as store:
        merged_run = store.start_run("{}", tiny_subject.model_id)
        slices = slice_plan(store, corpus_id, CONFIG, 3)
    assert len(slices) == 3 and slices[0][0] == 0 and all(a < b for a, b in slices)
    paths = [
        collect_slice(str(store_path), tiny_subject, planted[0], corpus_id, "tc-test", CONFIG, merged_run, a, b)
        for a, b in slices
    ]
    with Store(store_path) as store:
        merge_slices(store, tiny_subject, planted[0], corpus_id, "tc-test", CONFIG, merged_run, paths, 0.0)
        for name in TABLES:
            assert table(store, name, merged_run) == table(store, name, run_id), name


def bfloat16_error_bound(transcoder: Transcoder, x: torch.Tensor) -> torch.Tensor:
    """[N, F] bound on |bfloat16-weight pre-activation - float32 one| for bfloat16 inputs x [N, d_in]: the
    weights and the product are each rounded to bfloat16 once (relative error <= 2^-9 each), doubled for slack."""
    pre = transcoder.pre_acts(x)
    return 2**-8 * (x.float().abs() @ transcoder.W_enc.abs() + pre.abs()) + 1e-6


def test_bfloat16_encode_agrees_with_float32_on_planted_features(corpus, tiny_subject, planted):
    """Collection's encode of a bfloat16 model multiplies by bfloat16 weights: values stay within the rounding
    bound of the float32 encode, a feature fires differently only where its float32 pre-activation is inside
    that bound of zero (ReLU) or of the k-th largest (TopK), and the planted detectors fire wherever
    their float32 value clears the bound."""
    _, _, windows = corpus
    relu = planted[0][LAYER]
    x = mlp_inputs(tiny_subject, windows)[0].bfloat16()  # [N, 32], what a bfloat16 model hands over
    bound = bfloat16_error_bound(relu, x)
    reference, ours = relu.encode(x), relu.encode_at_input_precision(x)
    assert ours.dtype == torch.float32 and ((ours - reference).abs() <= bound).all()
    flipped = (ours > 0) != (reference > 0)
    assert (relu.pre_acts(x)[flipped].abs() <= bound[flipped]).all()
    clear = reference[:, 2:6] > bound[:, 2:6]  # token and assistant-turn detectors, outside the bound
    assert clear.any(0).all() and (ours[:, 2:6][clear] > 0).all()

    k = 4
    topk = Transcoder(
        LAYER,
        relu.W_enc.detach(),
        relu.b_enc.detach(),
        relu.W_dec.detach(),
        relu.b_dec.detach(),
        activation="topk",
        k=k,
    )
    reference, ours = topk.encode(x), topk.encode_at_input_precision(x)
    kth = topk.pre_acts(x).topk(k, dim=-1).values[:, -1:]  # [N, 1] float32 k-th largest
    flipped = (ours > 0) != (reference > 0)
    assert (ours > 0).sum(1).le(k).all() and flipped.float().mean() < 0.05
    assert ((topk.pre_acts(x) - kth).abs()[flipped] <= 2 * bound[flipped]).all()
    both = (ours > 0) & (reference > 0)
    assert ((ours - reference).abs()[both] <= bound[both]).all()


def test_float32_encode_unchanged_and_bfloat16_weights_follow_training(planted):
    """Float32 inputs take the float32 encode bit for bit; the cached bfloat16 weights are remade when
    W_enc changes in place (as an optimizer step does), so a trained transcoder never encodes with stale ones."""
    transcoder = planted[0][LAYER]
    x = torch.randn(64, transcoder.d_in, generator=torch.Generator().manual_seed(1))
    assert torch.equal(transcoder.encode_at_input_precision(x), transcoder.encode(x))
    copy = Transcoder(
        LAYER,
        transcoder.W_enc.detach().clone(),
        transcoder.b_enc.detach(),
        transcoder.W_dec.detach(),
        transcoder.b_dec.detach(),
    )
    before = copy.encode_at_input_precision(x.bfloat16())
    with torch.no_grad():
        copy.W_enc.mul_(-1)
    after = copy.encode_at_input_precision(x.bfloat16())
    assert not torch.equal(before, after)
    assert torch.equal(after, torch.relu((x.bfloat16() @ copy.W_enc.detach().bfloat16()).float() + copy.b_enc))
