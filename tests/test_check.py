"""The transcoder check is stored by what it depends on, so a re-run reads it instead of measuring."""

from __future__ import annotations

import copy

import pytest
import torch
from test_transcoder_train import random_windows

from autolabel.errors import AutolabelError
from autolabel.models import SubjectModel
from autolabel.store import Store
from autolabel.transcoders.check import check_transcoders
from autolabel.transcoders.formats import load_transcoders, save_circuit_tracer
from autolabel.transcoders.transcoder import Transcoder, TranscoderSet


@pytest.fixture
def saved_set(tmp_path) -> TranscoderSet:
    torch.manual_seed(0)
    layer = Transcoder(
        1, torch.randn(32, 64) / 8, torch.zeros(64), torch.randn(64, 32) / 8, torch.zeros(32), "topk", k=8
    )
    save_circuit_tracer(TranscoderSet({1: layer}), tmp_path / "tc", "tiny-llama")
    return load_transcoders(tmp_path / "tc", "circuit_tracer")


def counted_check(store, subject, tset, corpus_id, max_fvu=1e9, **changes):
    """(quality, forward passes the check made)."""
    calls = []
    handle = subject.layers[0].register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        args = {"n_tokens": 200, "corpus_id": corpus_id, "settings": {"heldout_every": 10}} | changes
        _, quality = check_transcoders(store, subject, tset, random_windows(8), max_fvu=max_fvu, **args)
    finally:
        handle.remove()
    return quality, len(calls)


def test_second_check_reads_the_stored_figures(tmp_path, tiny_subject, saved_set):
    with Store(tmp_path / "s.duckdb") as store:
        first, passes = counted_check(store, tiny_subject, saved_set, "corpus-a")
        assert passes > 0 and first[1].n_tokens >= 200
        again, passes = counted_check(store, tiny_subject, saved_set, "corpus-a")
        assert passes == 0 and again == first
        assert store.one("SELECT count(*) FROM transcoder_checks")[0] == 1
        assert store.one("SELECT fvu_by_layer[1] FROM transcoders")[0] == pytest.approx(first[1].fvu)

        # Another corpus, more tokens or other settings measure again.
        assert counted_check(store, tiny_subject, saved_set, "corpus-b")[1] > 0
        assert counted_check(store, tiny_subject, saved_set, "corpus-a", n_tokens=300)[1] > 0
        assert counted_check(store, tiny_subject, saved_set, "corpus-a", settings={"heldout_every": 5})[1] > 0
        # No corpus id: nothing to key on, so it always measures and stores nothing.
        assert counted_check(store, tiny_subject, saved_set, None)[1] > 0
        assert store.one("SELECT count(*) FROM transcoder_checks")[0] == 4


def test_changed_dtype_or_weights_measure_again(tmp_path, tiny_subject, saved_set):
    half = SubjectModel(
        copy.deepcopy(tiny_subject.model).to(torch.bfloat16), tiny_subject.tokenizer, tiny_subject.model_id
    )
    with Store(tmp_path / "s.duckdb") as store:
        counted_check(store, tiny_subject, saved_set, "corpus-a")
        quality, passes = counted_check(store, half, saved_set, "corpus-a")
        assert passes > 0
        assert counted_check(store, half, saved_set, "corpus-a")[1] == 0

        layer = saved_set[1]
        changed = TranscoderSet(
            {
                1: Transcoder(
                    1,
                    layer.W_enc.detach() * 2,
                    layer.b_enc.detach(),
                    layer.W_dec.detach(),
                    layer.b_dec.detach(),
                    "topk",
                    k=8,
                )
            }
        )
        save_circuit_tracer(changed, tmp_path / "tc2", "tiny-llama")
        assert (
            counted_check(store, tiny_subject, load_transcoders(tmp_path / "tc2", "circuit_tracer"), "corpus-a")[1] > 0
        )


def test_stored_bad_fit_is_refused_without_measuring(tmp_path, tiny_subject, saved_set):
    with Store(tmp_path / "s.duckdb") as store:
        with pytest.raises(AutolabelError, match="does not reconstruct"):
            counted_check(store, tiny_subject, saved_set, "corpus-a", max_fvu=1e-6)
        calls = []
        handle = tiny_subject.layers[0].register_forward_pre_hook(lambda *_: calls.append(1))
        try:
            with pytest.raises(AutolabelError, match="does not reconstruct"):
                check_transcoders(
                    store, tiny_subject, saved_set, random_windows(8), 200, 1e-6, "corpus-a", {"heldout_every": 10}
                )
        finally:
            handle.remove()
        assert calls == []
