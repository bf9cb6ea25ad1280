"""Writing our own circuit-tracer sets, and every way a release folder can be broken: each must give
an error that names the file, the tensor or key, and what was expected."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.numpy import load_file as load_numpy, save_file
from test_transcoder_formats import D, F, N_TOK, TOL, ct_config, ct_layer, gemma_scope_1, rand, run

from autolabel.errors import AutolabelError
from autolabel.transcoders.formats import load_transcoders, save_circuit_tracer
from autolabel.transcoders.transcoder import Transcoder, TranscoderSet


# ---------------------------------------------------------------- saving for circuit-tracer

def test_save_circuit_tracer_round_trip(tmp_path):
    g = torch.Generator().manual_seed(10)
    r = lambda *s: torch.randn(*s, generator=g) * 0.5  # noqa: E731
    transcoders = {
        0: Transcoder(0, r(D, F), r(F), r(F, D), r(D), "jumprelu", r(F).abs(), W_skip=r(D, D)),
        1: Transcoder(1, r(D, F), r(F), r(F, D), r(D), "jumprelu", r(F).abs()),
    }
    tset = TranscoderSet(transcoders, "mlp.hook_in", "hook_mlp_out", metadata={"trained_on": "tiny corpus", "steps": 3})
    save_circuit_tracer(tset, tmp_path / "out", "tiny-model")

    config = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert config["model_kind"] == "transcoder_set" and config["model_name"] == "tiny-model"
    assert (config["feature_input_hook"], config["feature_output_hook"]) == ("mlp.hook_in", "hook_mlp_out")
    assert json.loads((tmp_path / "out" / "autolabel.json").read_text()) == tset.metadata

    back = load_transcoders(tmp_path / "out")
    assert (back.layers, back.input_hook, back.output_hook, back.metadata) == ([0, 1], "mlp.hook_in", "hook_mlp_out", tset.metadata)
    for layer, tc in transcoders.items():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold", "W_skip"):
            a, b = getattr(tc, name), getattr(back[layer], name)
            assert (a is None and b is None) or torch.equal(a, b), name
        # the saved file, read with circuit-tracer's own formulas, computes what autolabel computes
        f = load_numpy(str(tmp_path / "out" / f"layer_{layer}.safetensors"))
        x = rand(np.random.default_rng(layer), N_TOK, D, scale=1.0)
        pre = x @ f["W_enc"].T + f["b_enc"]
        out = (pre * (pre > f["activation_function.threshold"])) @ f["W_dec"] + f["b_dec"]
        out = out + (x @ f["W_skip"].T if "W_skip" in f else 0)
        np.testing.assert_allclose(run(tc, x)[1], out, **TOL)


def test_save_circuit_tracer_topk_and_input_bias(tmp_path):
    g = torch.Generator().manual_seed(11)
    r = lambda *s: torch.randn(*s, generator=g) * 0.5  # noqa: E731
    tc = Transcoder(3, r(D, F), r(F) + 3, r(F, D), r(D), "topk", k=6, b_in=r(D))
    save_circuit_tracer(TranscoderSet({3: tc}), tmp_path, "m")  # a set that does not start at layer 0
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert (config["activation"], config["k"], config["layers"]) == ("topk", 6, [3])
    save_file({"junk": np.zeros(1, np.float32)}, str(tmp_path / "layer_0.safetensors"))  # stale file of another set
    assert load_transcoders(tmp_path).layers == [3]
    back = load_transcoders(tmp_path / "config.yaml")[3]
    assert back.activation == "topk" and back.k == 6 and back.b_in is None
    x = torch.randn(N_TOK, D, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(back(x), tc(x), rtol=1e-5, atol=1e-5)


def test_save_circuit_tracer_refuses_cross_layer(tmp_path):
    clt = Transcoder(0, torch.zeros(D, F), torch.zeros(F), torch.zeros(F, 2, D), torch.zeros(2, D))
    with pytest.raises(AutolabelError, match="cross-layer"):
        save_circuit_tracer(TranscoderSet({0: clt}), tmp_path, "m")


# ---------------------------------------------------------------- errors

def plt_folder(tmp_path: Path, n: int = 2, **layer_changes) -> Path:
    rng = np.random.default_rng(12)
    for i in range(n):
        t = ct_layer(rng)
        t.update(layer_changes)
        for key in [k for k, v in layer_changes.items() if v is None]:
            del t[key]
        save_file(t, str(tmp_path / f"layer_{i}.safetensors"))
    ct_config(tmp_path)
    return tmp_path


def test_error_missing_folder(tmp_path):
    with pytest.raises(AutolabelError, match="does not exist"):
        load_transcoders(tmp_path / "nope")


def test_error_unknown_format_lists_expected_files(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0" * 10)
    with pytest.raises(AutolabelError) as err:
        load_transcoders(tmp_path)
    for needle in ("unknown transcoder format", "weights.bin", "config.yaml", "sae_weights.safetensors", "params.npz"):
        assert needle in str(err.value)
    with pytest.raises(AutolabelError, match="unknown transcoder format 'pickle'"):
        load_transcoders(tmp_path, fmt="pickle")


def test_error_missing_layer_file(tmp_path):
    plt_folder(tmp_path, n=3)
    (tmp_path / "layer_1.safetensors").unlink()
    with pytest.raises(AutolabelError, match=r"missing layer_1\.safetensors"):
        load_transcoders(tmp_path)
    assert load_transcoders(tmp_path, layers=[0, 2]).layers == [0, 2]
    with pytest.raises(AutolabelError, match=r"no transcoder for layer\(s\) \[5\]"):
        load_transcoders(tmp_path, layers=[5])


def test_error_layer_files_without_config(tmp_path):
    plt_folder(tmp_path)
    (tmp_path / "config.yaml").unlink()
    with pytest.raises(AutolabelError, match="no config.yaml"):
        load_transcoders(tmp_path)


def test_error_truncated_safetensors(tmp_path):
    plt_folder(tmp_path)
    path = tmp_path / "layer_1.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(AutolabelError, match=r"layer_1\.safetensors.*truncated or corrupt"):
        load_transcoders(tmp_path)


def test_error_corrupt_npz(tmp_path):
    gemma_scope_1(np.random.default_rng(13), tmp_path)
    path = tmp_path / "layer_0" / "width_16k" / "average_l0_10" / "params.npz"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(AutolabelError, match=r"params\.npz.*truncated or corrupt"):
        load_transcoders(tmp_path)


def test_error_wrong_shape_names_tensor_and_shapes(tmp_path):
    plt_folder(tmp_path, W_dec=np.zeros((F - 1, D), np.float32))
    with pytest.raises(AutolabelError) as err:
        load_transcoders(tmp_path)
    message = str(err.value)
    assert "layer_0.safetensors" in message and "W_dec" in message and f"[{F - 1}, {D}]" in message and f"[{F}, {D}]" in message


def test_error_transposed_gemma_scope_encoder(tmp_path):
    params = gemma_scope_1(np.random.default_rng(14), tmp_path)
    sub = tmp_path / "layer_2" / "width_16k" / "average_l0_10"
    np.savez(sub / "params.npz", **{**params[2], "W_enc": params[2]["W_enc"].T.copy()})
    with pytest.raises(AutolabelError, match=r"layer_2.*params\.npz.*W_dec has shape \[24, 16\] but \[16, 16\]"):
        load_transcoders(tmp_path)


def test_error_missing_tensor_and_config_key(tmp_path):
    (tmp_path / "a").mkdir()
    plt_folder(tmp_path / "a", b_enc=None)
    with pytest.raises(AutolabelError, match=r"layer_0\.safetensors has no tensor 'b_enc'"):
        load_transcoders(tmp_path / "a")
    (tmp_path / "b").mkdir()
    plt_folder(tmp_path / "b")
    ct_config(tmp_path / "b", feature_output_hook=None)
    with pytest.raises(AutolabelError, match="lacks the required key 'feature_output_hook'"):
        load_transcoders(tmp_path / "b")


def test_error_unresolvable_hook_and_missing_listed_file(tmp_path):
    plt_folder(tmp_path)
    ct_config(tmp_path, feature_input_hook="hook_resid_pre")
    with pytest.raises(AutolabelError, match="'hook_resid_pre' is not a hook autolabel can capture"):
        load_transcoders(tmp_path)
    ct_config(tmp_path, transcoders=["hf://org/repo/layer_0/params.npz"])
    with pytest.raises(AutolabelError, match="config.yaml lists hf://org/repo/layer_0/params.npz for layer 0"):
        load_transcoders(tmp_path)
