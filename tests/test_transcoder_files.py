"""Writing our own circuit-tracer sets, and every way a release folder can be broken: each must give
an error that names the file, the tensor or key, and what was expected."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file
from test_transcoder_formats import N_TOK, TOL, D, F, ct_config, ct_layer, gemma_scope_1, rand, run, saelens_folder

from autolabel.errors import AutolabelError
from autolabel.transcoders.check import LayerQuality, refuse_bad_fit
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
    assert (back.layers, back.input_hook, back.output_hook, back.metadata) == (
        [0, 1],
        "mlp.hook_in",
        "hook_mlp_out",
        tset.metadata,
    )
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
    assert (
        "layer_0.safetensors" in message
        and "W_dec" in message
        and f"[{F - 1}, {D}]" in message
        and f"[{F}, {D}]" in message
    )


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


# ---------------------------------------------------------------- non-finite weights, a non-finite fit


def spoil(path: Path, tensor: str, value: float, index: int = 5) -> None:
    """Rewrite one tensor of a layer file with one value replaced (a diverged run or a damaged export)."""
    tensors = {key: array.copy() for key, array in load_numpy(str(path)).items()}
    tensors.setdefault(tensor, np.full(F, 0.1, np.float32))  # a threshold, for the layers that have none
    tensors[tensor].flat[index] = value
    save_file(tensors, str(path))


@pytest.mark.parametrize(
    "tensor, value, name, counts",
    [
        ("W_dec", np.nan, "W_dec", "1 NaN and 0 infinite"),
        ("b_enc", np.inf, "b_enc", "0 NaN and 1 infinite"),
        ("activation_function.threshold", -np.inf, "threshold", "0 NaN and 1 infinite"),
    ],
)
def test_non_finite_weights_are_refused_naming_layer_tensor_and_file(tmp_path, tensor, value, name, counts):
    plt_folder(tmp_path, n=3)
    spoil(tmp_path / "layer_1.safetensors", tensor, value)
    with pytest.raises(AutolabelError) as err:
        load_transcoders(tmp_path)
    message = str(err.value)
    assert f"layer 1: {name} in {tmp_path / 'layer_1.safetensors'} holds {counts}" in message
    assert "again" in message  # the fix
    assert load_transcoders(tmp_path, layers=[0, 2]).layers == [0, 2]  # the intact layers still load


def test_non_finite_weights_are_refused_in_every_format(tmp_path):
    params = gemma_scope_1(np.random.default_rng(15), tmp_path / "gemma")
    sub = tmp_path / "gemma" / "layer_2" / "width_16k" / "average_l0_10"
    W_enc = params[2]["W_enc"].copy()
    W_enc[3, 4] = np.nan
    np.savez(sub / "params.npz", **{**params[2], "W_enc": W_enc})
    with pytest.raises(AutolabelError, match=r"layer 2: W_enc in .*params\.npz holds 1 NaN"):
        load_transcoders(tmp_path / "gemma")
    # a float64 value beyond float32's range becomes infinite when loaded, so it is refused too
    rng = np.random.default_rng(16)
    w = {
        "W_enc": rand(rng, D, F),
        "W_dec": rand(rng, F, D).astype(np.float64),
        "b_enc": rand(rng, F),
        "b_dec": rand(rng, D),
    }
    w["W_dec"][0, 0] = 1e300
    saelens_folder(
        tmp_path / "sae", {"architecture": "standard", "metadata": {"hook_name": "blocks.4.hook_mlp_out"}}, w
    )
    with pytest.raises(
        AutolabelError, match=r"layer 4: W_dec in .*sae_weights\.safetensors holds 0 NaN and 1 infinite"
    ):
        load_transcoders(tmp_path / "sae")
    # and a trained set that diverged, which never passes through a file
    W_dec = torch.zeros(F, D)
    W_dec[2, 1] = float("nan")
    with pytest.raises(AutolabelError, match=r"transcoder layer 0: W_dec holds 1 NaN .*first at index \[2, 1\]"):
        Transcoder(0, torch.zeros(D, F), torch.zeros(F), W_dec, torch.zeros(D))


def test_fit_check_refuses_a_non_finite_fvu_or_bound():
    tset = TranscoderSet(
        {0: Transcoder(0, torch.zeros(D, F), torch.zeros(F), torch.zeros(F, D), torch.zeros(D))}, path="/releases/tc"
    )
    fine = LayerQuality(0, 0.1, 5.0, 0.0, 100)
    refuse_bad_fit(tset, {0: fine}, 0.5)
    for fvu in (float("nan"), float("inf")):
        with pytest.raises(AutolabelError) as err:
            refuse_bad_fit(tset, {0: fine, 3: LayerQuality(3, fvu, 5.0, 0.0, 100)}, 0.5)
        assert "/releases/tc reconstructs" in str(err.value) and f"layer 3: FVU {fvu}" in str(err.value)
        assert "model.dtype: float32" in str(err.value)
    for bound in (float("nan"), float("inf"), 0.0, -1.0):  # e.g. `transcoder check --max-fvu nan`
        with pytest.raises(AutolabelError, match="must be a positive finite number"):
            refuse_bad_fit(tset, {0: fine}, bound)


# ---------------------------------------------------------------- numbers in a release's config


@pytest.mark.parametrize("k", [5000, -3, 0, "sixty", 2.5, True])
def test_bad_k_in_circuit_tracer_config_is_one_clear_error(tmp_path, k):
    plt_folder(tmp_path)
    ct_config(tmp_path, activation="topk", k=k)
    with pytest.raises(AutolabelError) as err:
        load_transcoders(tmp_path)
    assert f"{tmp_path / 'config.yaml'}: k is {k!r} but must be an integer from 1 to {F}" in str(err.value)
    assert "features each token keeps" in str(err.value) and "fix it in the file" in str(err.value)


def test_bad_k_in_other_formats_names_the_file_and_field(tmp_path):
    rng = np.random.default_rng(17)
    t = ct_layer(rng)
    save_file({**t, "k": np.array(0, dtype=np.int64)}, str(tmp_path / "layer_0.safetensors"))
    ct_config(tmp_path, activation="topk")
    with pytest.raises(AutolabelError, match=r"layer_0\.safetensors: tensor 'k' is 0 but must be an integer from 1"):
        load_transcoders(tmp_path)

    w = {"W_enc": rand(rng, D, F), "W_dec": rand(rng, F, D), "b_enc": rand(rng, F), "b_dec": rand(rng, D)}
    saelens_folder(
        tmp_path / "sae",
        {
            "architecture": "standard",
            "activation_fn": "topk",
            "activation_fn_kwargs": {"k": 5000},
            "metadata": {"hook_name": "blocks.0.hook_mlp_out"},
        },
        w,
    )
    with pytest.raises(
        AutolabelError, match=rf"sae.cfg\.json: activation_fn_kwargs\.k is 5000 but must be an integer from 1 to {F}"
    ):
        load_transcoders(tmp_path / "sae")

    sub = tmp_path / "sparsify" / "layers.0.mlp"
    sub.mkdir(parents=True)
    save_file(
        {
            "encoder.weight": rand(rng, F, D),
            "encoder.bias": rand(rng, F),
            "W_dec": rand(rng, F, D),
            "b_dec": rand(rng, D),
        },
        str(sub / "sae.safetensors"),
    )
    (sub / "cfg.json").write_text(json.dumps({"activation": "topk", "k": "sixty", "transcode": True}))
    with pytest.raises(AutolabelError, match=r"layers\.0\.mlp.cfg\.json: k is 'sixty' but must be an integer"):
        load_transcoders(tmp_path / "sparsify")


def test_bad_layer_numbers_in_a_config_name_the_file_and_field(tmp_path):
    (tmp_path / "ct").mkdir()
    plt_folder(tmp_path / "ct")
    for layers, needle in (
        ("0,1", "layers is '0,1' but must be a list of layer numbers"),
        ([0, -1], "layers is -1 but must be an integer of at least 0"),
        ([0, "one"], "layers is 'one' but must be an integer of at least 0"),
    ):
        ct_config(tmp_path / "ct", layers=layers)
        with pytest.raises(AutolabelError) as err:
            load_transcoders(tmp_path / "ct")
        assert f"{tmp_path / 'ct' / 'config.yaml'}: {needle}" in str(err.value)
    ct_config(tmp_path / "ct", transcoders="layer_0.safetensors")  # one string, not a list
    with pytest.raises(AutolabelError, match="transcoders is 'layer_0.safetensors' but must be a list of weight files"):
        load_transcoders(tmp_path / "ct")

    rng = np.random.default_rng(18)
    w = {"W_enc": rand(rng, D, F), "W_dec": rand(rng, F, D), "b_enc": rand(rng, F), "b_dec": rand(rng, D)}
    saelens_folder(
        tmp_path / "sae",
        {"architecture": "standard", "hook_point": "blocks.2.hook_mlp_out", "hook_point_layer": "three"},
        w,
    )
    with pytest.raises(AutolabelError, match=r"sae.cfg\.json: hook_point_layer is 'three' but must be an integer"):
        load_transcoders(tmp_path / "sae")
