"""Every supported transcoder layout: random weights written in the format's own orientation,
loaded with auto-detection, and checked against a reference computed here from the raw arrays
with that format's own formulas (never with autolabel's Transcoder)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.numpy import save_file

from autolabel.transcoders.formats import load_transcoders
from autolabel.transcoders.transcoder import Transcoder

D, F, N_LAYERS, N_TOK = 16, 24, 3, 7
TOL = dict(rtol=1e-4, atol=1e-4)


def rand(rng, *shape, scale=0.5):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def relu(a):
    return np.maximum(a, 0.0)


def top_k(pre, k, apply_relu=True):
    """Keep the k largest pre-activations per row (then ReLU, unless the format skips it)."""
    idx = np.argsort(-pre, axis=-1)[:, :k]
    out = np.zeros_like(pre)
    np.put_along_axis(out, idx, np.take_along_axis(pre, idx, -1), -1)
    return relu(out) if apply_relu else out


def run(tc: Transcoder, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    xt = torch.from_numpy(x)
    with torch.no_grad():
        return tc.encode(xt).numpy(), tc(xt).numpy()


def write_yaml(path: Path, data: dict) -> None:
    path.write_text(yaml.safe_dump(data))


def ct_config(folder: Path, **extra) -> None:
    write_yaml(
        folder / "config.yaml",
        {
            "model_name": "tiny",
            "model_kind": "transcoder_set",
            "feature_input_hook": "mlp.hook_in",
            "feature_output_hook": "mlp.hook_out",
            **extra,
        },
    )


def ct_layer(rng, threshold=False, skip=False):
    t = {"W_enc": rand(rng, F, D), "W_dec": rand(rng, F, D), "b_enc": rand(rng, F, scale=0.1), "b_dec": rand(rng, D)}
    if threshold:
        t["activation_function.threshold"] = np.abs(rand(rng, F))
    if skip:
        t["W_skip"] = rand(rng, D, D)
    return t


# ---------------------------------------------------------------- circuit-tracer per-layer sets


@pytest.mark.parametrize("kind", ["relu", "jumprelu_skip", "topk"])
def test_circuit_tracer_set(tmp_path, kind):
    rng = np.random.default_rng(0)
    files = {}
    for i in range(N_LAYERS):
        files[i] = ct_layer(rng, threshold=kind.startswith("jump"), skip=kind.endswith("skip"))
        if kind == "topk":
            files[i]["b_enc"] += 3.0  # circuit-tracer's TopK keeps negative values; keep the top k positive
        save_file(files[i], str(tmp_path / f"layer_{i}.safetensors"))
    ct_config(tmp_path, **({"activation": "topk", "k": 5} if kind == "topk" else {}))

    tset = load_transcoders(tmp_path)
    assert (tset.source_format, tset.layers, tset.model_name) == ("circuit-tracer", [0, 1, 2], "tiny")
    assert (tset.input_hook, tset.output_hook) == ("mlp.hook_in", "mlp.hook_out")
    for i, t in files.items():
        x = rand(rng, N_TOK, D, scale=1.0)
        pre = x @ t["W_enc"].T + t["b_enc"]  # circuit-tracer: F.linear(x, W_enc, b_enc)
        if kind == "relu":
            acts = relu(pre)
        elif kind == "topk":
            acts = top_k(pre, 5, apply_relu=False)
            assert (np.sort(pre, -1)[:, -5:] > 0).all()
        else:
            acts = pre * (pre > t["activation_function.threshold"])
            assert not np.allclose(acts, relu(pre))  # the threshold matters in this test
        out = acts @ t["W_dec"] + t["b_dec"] + (x @ t["W_skip"].T if "W_skip" in t else 0)
        got_acts, got_out = run(tset[i], x)
        np.testing.assert_allclose(got_acts, acts, **TOL)
        np.testing.assert_allclose(got_out, out, **TOL)


def test_circuit_tracer_k_tensor_in_layer_file(tmp_path):
    rng = np.random.default_rng(1)
    t = ct_layer(rng)
    t["b_enc"] += 3.0
    save_file({**t, "k": np.array(3, dtype=np.int64)}, str(tmp_path / "layer_0.safetensors"))
    ct_config(tmp_path, activation="topk")
    tc = load_transcoders(tmp_path)[0]
    x = rand(rng, N_TOK, D, scale=1.0)
    np.testing.assert_allclose(run(tc, x)[0], top_k(x @ t["W_enc"].T + t["b_enc"], 3, False), **TOL)


def test_circuit_tracer_clt_reconstruction_sums_sources(tmp_path):
    rng = np.random.default_rng(2)
    enc, dec = {}, {}
    for i in range(N_LAYERS):
        enc[i] = {
            f"W_enc_{i}": rand(rng, F, D),
            f"b_enc_{i}": rand(rng, F, scale=0.1),
            f"b_dec_{i}": rand(rng, D),
            f"threshold_{i}": np.abs(rand(rng, F, scale=0.3)),
        }
        dec[i] = {f"W_dec_{i}": rand(rng, F, N_LAYERS - i, D)}
        save_file(enc[i], str(tmp_path / f"W_enc_{i}.safetensors"))
        save_file(dec[i], str(tmp_path / f"W_dec_{i}.safetensors"))
    write_yaml(
        tmp_path / "config.yaml",
        {
            "model_name": "tiny",
            "model_kind": "cross_layer_transcoder",
            "feature_input_hook": "hook_resid_mid",
            "feature_output_hook": "hook_mlp_out",
        },
    )
    tset = load_transcoders(tmp_path)
    assert tset.source_format == "circuit-tracer-clt" and tset.cross_layer
    assert (tset.input_hook, tset.output_hook) == ("hook_resid_mid", "hook_mlp_out")

    xs = {i: rand(rng, N_TOK, D, scale=1.0) for i in range(N_LAYERS)}
    acts = {}
    for i in range(N_LAYERS):
        pre = xs[i] @ enc[i][f"W_enc_{i}"].T + enc[i][f"b_enc_{i}"]
        acts[i] = pre * (pre > enc[i][f"threshold_{i}"])
        np.testing.assert_allclose(run(tset[i], xs[i])[0], acts[i], **TOL)
    # circuit-tracer: recon[j] = sum over sources i <= j of acts_i @ W_dec_i[:, j - i] + b_dec[j]
    expected = {
        j: sum(acts[i] @ dec[i][f"W_dec_{i}"][:, j - i] for i in range(j + 1)) + enc[j][f"b_dec_{j}"]
        for j in range(N_LAYERS)
    }
    with torch.no_grad():
        got = tset.reconstruct({i: torch.from_numpy(x) for i, x in xs.items()})
    assert sorted(got) == [0, 1, 2]
    for j in range(N_LAYERS):
        np.testing.assert_allclose(got[j].numpy(), expected[j], **TOL)
    assert torch.equal(tset[1].b_dec[0], torch.from_numpy(enc[1]["b_dec_1"]))
    assert not tset[1].b_dec[1:].any()  # each layer's bias lives only in its own source's slot 0


# ---------------------------------------------------------------- Gemma Scope 1 and 2


def gemma_scope_1(rng, folder: Path) -> dict:
    params = {}
    for i in range(N_LAYERS):
        sub = folder / f"layer_{i}" / "width_16k" / "average_l0_10"
        sub.mkdir(parents=True)
        threshold = rand(rng, F, scale=0.4)  # some negative: relu(pre) * (pre > thr) must still hold
        params[i] = {
            "W_enc": rand(rng, D, F),
            "W_dec": rand(rng, F, D),
            "b_enc": rand(rng, F, scale=0.1),
            "b_dec": rand(rng, D),
            "threshold": threshold,
        }
        np.savez(sub / "params.npz", **params[i])
    return params


def gemma_reference(p: dict, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    keys = {k.lower(): v for k, v in p.items()}
    pre = x @ keys["w_enc"] + keys["b_enc"]
    acts = (pre > keys["threshold"]) * relu(pre)
    out = acts @ keys["w_dec"] + keys["b_dec"]
    if "affine_skip_connection" in keys:
        out = out + x @ keys["affine_skip_connection"]
    return acts, out


def test_gemma_scope_1_npz(tmp_path):
    rng = np.random.default_rng(3)
    params = gemma_scope_1(rng, tmp_path)
    tset = load_transcoders(tmp_path)
    assert (tset.source_format, tset.layers) == ("gemma-scope", [0, 1, 2])
    assert (tset.input_hook, tset.output_hook) == ("ln2.hook_normalized", "hook_mlp_out")
    for i, p in params.items():
        x = rand(rng, N_TOK, D, scale=1.0)
        acts, out = gemma_reference(p, x)
        got_acts, got_out = run(tset[i], x)
        np.testing.assert_allclose(got_acts, acts, **TOL)
        np.testing.assert_allclose(got_out, out, **TOL)
    single = load_transcoders(tmp_path / "layer_1" / "width_16k" / "average_l0_10" / "params.npz")
    assert single.layers == [1]


def test_circuit_tracer_config_listing_gemma_scope_files(tmp_path):
    rng = np.random.default_rng(4)
    params = gemma_scope_1(rng, tmp_path)
    uris = [
        f"hf://google/gemma-scope-2b-pt-transcoders/layer_{i}/width_16k/average_l0_10/params.npz"
        for i in range(N_LAYERS)
    ]
    write_yaml(
        tmp_path / "config.yaml",
        {
            "model_name": "google/gemma-2-2b",
            "model_kind": "transcoder_set",
            "feature_input_hook": "ln2.hook_normalized",
            "feature_output_hook": "hook_mlp_out",
            "transcoders": uris,
        },
    )
    tset = load_transcoders(tmp_path, layers=[2])
    assert (tset.source_format, tset.layers, tset.model_name) == ("circuit-tracer", [2], "google/gemma-2-2b")
    x = rand(rng, N_TOK, D, scale=1.0)
    np.testing.assert_allclose(run(tset[2], x)[1], gemma_reference(params[2], x)[1], **TOL)


def test_gemma_scope_2_safetensors_with_affine_skip(tmp_path):
    rng = np.random.default_rng(5)
    params = {}
    for i in range(N_LAYERS):
        sub = tmp_path / "transcoder_all" / f"layer_{i}_width_16k_l0_small_affine"
        sub.mkdir(parents=True)
        params[i] = {
            "w_enc": rand(rng, D, F),
            "w_dec": rand(rng, F, D),
            "b_enc": rand(rng, F, scale=0.1),
            "b_dec": rand(rng, D),
            "threshold": np.abs(rand(rng, F, scale=0.4)),
            "affine_skip_connection": rand(rng, D, D),
        }
        save_file(params[i], str(sub / "params.safetensors"))
        (sub / "config.json").write_text(
            json.dumps(
                {
                    "model_name": "google/gemma-3-1b-pt",
                    "architecture": "jump_relu",
                    "width": F,
                    "hf_hook_point_in": f"model.layers.{i}.pre_feedforward_layernorm.output",
                    "hf_hook_point_out": f"model.layers.{i}.post_feedforward_layernorm.output",
                }
            )
        )
    tset = load_transcoders(tmp_path)
    assert (tset.source_format, tset.layers, tset.model_name) == ("gemma-scope-2", [0, 1, 2], "google/gemma-3-1b-pt")
    assert (tset.input_hook, tset.output_hook) == ("mlp_in", "mlp_out")
    for i, p in params.items():
        x = rand(rng, N_TOK, D, scale=1.0)
        acts, out = gemma_reference(p, x)
        got_acts, got_out = run(tset[i], x)
        np.testing.assert_allclose(got_acts, acts, **TOL)
        np.testing.assert_allclose(got_out, out, **TOL)


# ---------------------------------------------------------------- SAELens

D_OUT = 12  # transcoders may write a different width than they read


def saelens_folder(folder: Path, cfg: dict, weights: dict) -> None:
    folder.mkdir(parents=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(weights, str(folder / "sae_weights.safetensors"))


@pytest.mark.parametrize("arch", ["transcoder", "skip_transcoder", "jumprelu_transcoder"])
def test_saelens_transcoders(tmp_path, arch):
    rng = np.random.default_rng(6)
    weights = {}
    for i in range(2):
        w = {
            "W_enc": rand(rng, D, F),
            "W_dec": rand(rng, F, D_OUT),
            "b_enc": rand(rng, F, scale=0.1),
            "b_dec": rand(rng, D_OUT),
        }
        if arch == "skip_transcoder":
            w["W_skip"] = rand(rng, D_OUT, D)
        if arch == "jumprelu_transcoder":
            w["threshold"] = rand(rng, F, scale=0.4)
        cfg = {
            "architecture": arch,
            "d_in": D,
            "d_sae": F,
            "d_out": D_OUT,
            "dtype": "float32",
            "device": "cpu",
            "apply_b_dec_to_input": False,
            "normalize_activations": "none",
            "metadata": {
                "model_name": "gpt2",
                "hook_name": f"blocks.{i}.ln2.hook_normalized",
                "hook_name_out": f"blocks.{i}.hook_mlp_out",
                "sae_lens_version": "6.6.0",
            },
        }
        saelens_folder(tmp_path / f"tc_{i}", cfg, w)
        weights[i] = w
    tset = load_transcoders(tmp_path)
    assert (tset.source_format, tset.layers, tset.model_name) == ("saelens", [0, 1], "gpt2")
    assert (tset.input_hook, tset.output_hook) == ("ln2.hook_normalized", "hook_mlp_out")
    for i, w in weights.items():
        x = rand(rng, N_TOK, D, scale=1.0)
        pre = x @ w["W_enc"] + w["b_enc"]
        acts = relu(pre) * (pre > w["threshold"]) if "threshold" in w else relu(pre)
        out = acts @ w["W_dec"] + w["b_dec"] + (x @ w["W_skip"].T if "W_skip" in w else 0)
        got_acts, got_out = run(tset[i], x)
        np.testing.assert_allclose(got_acts, acts, **TOL)
        np.testing.assert_allclose(got_out, out, **TOL)


def test_saelens_pre_6_topk_sae_applies_b_dec_to_input_and_scaling_factor(tmp_path):
    rng = np.random.default_rng(7)
    w = {
        "W_enc": rand(rng, D, F),
        "W_dec": rand(rng, F, D),
        "b_enc": rand(rng, F, scale=0.1),
        "b_dec": rand(rng, D),
        "scaling_factor": (1 + np.abs(rand(rng, F))).astype(np.float32),
    }
    cfg = {
        "architecture": "standard",
        "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": 4},
        "d_in": D,
        "d_sae": F,
        "hook_point": "blocks.2.hook_mlp_out",
        "hook_point_layer": 2,
        "finetuning_scaling_factor": True,
        "model_name": "gpt2",
        "sae_lens_training_version": "3.13.0",
    }
    saelens_folder(tmp_path / "sae", cfg, w)
    tset = load_transcoders(tmp_path / "sae")  # the SAE's own folder works too
    assert (tset.layers, tset.input_hook, tset.output_hook) == ([2], "hook_mlp_out", "hook_mlp_out")
    x = rand(rng, N_TOK, D, scale=1.0)
    acts = top_k((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"], 4)
    out = (acts * w["scaling_factor"]) @ w["W_dec"] + w["b_dec"]
    got_acts, got_out = run(tset[2], x)
    np.testing.assert_allclose(got_acts, acts, **TOL)
    np.testing.assert_allclose(got_out, out, **TOL)


def test_saelens_topk_rescaled_by_decoder_norm(tmp_path):
    rng = np.random.default_rng(8)
    w = {"W_enc": rand(rng, D, F), "W_dec": rand(rng, F, D), "b_enc": rand(rng, F, scale=0.1), "b_dec": rand(rng, D)}
    cfg = {
        "architecture": "topk",
        "d_in": D,
        "d_sae": F,
        "k": 5,
        "rescale_acts_by_decoder_norm": True,
        "apply_b_dec_to_input": False,
        "metadata": {"hook_name": "blocks.0.hook_mlp_out", "sae_lens_version": "6.6.0"},
    }
    saelens_folder(tmp_path / "sae", cfg, w)
    tc = load_transcoders(tmp_path)[0]
    x = rand(rng, N_TOK, D, scale=1.0)
    norms = np.linalg.norm(w["W_dec"], axis=-1)
    acts = top_k((x @ w["W_enc"] + w["b_enc"]) * norms, 5)  # SAELens encode output
    out = (acts / norms) @ w["W_dec"] + w["b_dec"]
    got_acts, got_out = run(tc, x)
    np.testing.assert_allclose(got_acts, acts, **TOL)
    np.testing.assert_allclose(got_out, out, **TOL)


# ---------------------------------------------------------------- sparsify


@pytest.mark.parametrize("transcode", [True, False])
def test_sparsify_hookpoint_folders(tmp_path, transcode):
    rng = np.random.default_rng(9)
    weights = {}
    for i in range(2):
        sub = tmp_path / f"layers.{i}.mlp"
        sub.mkdir()
        w = {
            "encoder.weight": rand(rng, F, D),
            "encoder.bias": rand(rng, F, scale=0.1),
            "W_dec": rand(rng, F, D),
            "b_dec": rand(rng, D),
            "W_skip": rand(rng, D, D),
        }
        save_file(w, str(sub / "sae.safetensors"))
        (sub / "cfg.json").write_text(
            json.dumps(
                {
                    "activation": "topk",
                    "expansion_factor": 32,
                    "normalize_decoder": True,
                    "num_latents": F,
                    "k": 4,
                    "multi_topk": False,
                    "skip_connection": True,
                    "transcode": transcode,
                    "d_in": D,
                }
            )
        )
        weights[i] = w
    tset = load_transcoders(tmp_path)
    assert (tset.source_format, tset.layers) == ("sparsify", [0, 1])
    assert (tset.input_hook, tset.output_hook) == (("mlp_in" if transcode else "mlp_out"), "mlp_out")
    for i, w in weights.items():
        x = rand(rng, N_TOK, D, scale=1.0)
        x_enc = x if transcode else x - w["b_dec"]  # autoencoders subtract b_dec first
        pre = relu(x_enc @ w["encoder.weight"].T + w["encoder.bias"])  # sparsify: ReLU, then top k
        acts = top_k(pre, 4, apply_relu=False)
        out = acts @ w["W_dec"] + w["b_dec"] + x @ w["W_skip"].T
        got_acts, got_out = run(tset[i], x)
        np.testing.assert_allclose(got_acts, acts, **TOL)
        np.testing.assert_allclose(got_out, out, **TOL)


def test_a_features_direction_is_its_decoder_row_and_a_cross_layer_decoders_slices_summed():
    """The one convention that labels, reports, clusters and audit diffs read a feature's direction by."""
    generator = torch.Generator().manual_seed(0)
    per_layer = torch.randn(5, 4, generator=generator)
    cross = torch.randn(5, 3, 4, generator=generator)  # [d_feat, n_out_layers, d_out]
    plain = Transcoder(0, torch.zeros(4, 5), torch.zeros(5), per_layer, torch.zeros(4))
    clt = Transcoder(0, torch.zeros(4, 5), torch.zeros(5), cross, torch.zeros(3, 4))
    assert torch.equal(plain.decoder_rows(), per_layer) and torch.equal(plain.decoder_rows([3, 1]), per_layer[[3, 1]])
    assert torch.allclose(clt.decoder_rows(), cross.sum(1)) and clt.decoder_rows([2]).shape == (1, 4)
    assert not clt.decoder_rows().requires_grad


def test_a_saved_circuit_tracer_set_names_its_hooks_as_circuit_tracer_does_and_loads_back(tmp_path):
    """circuit-tracer resolves only its own hook names; autolabel reads them back as the same hooks."""
    from autolabel.transcoders.formats import save_circuit_tracer
    from autolabel.transcoders.transcoder import TranscoderSet

    layers = {
        layer: Transcoder(layer, torch.randn(4, 6), torch.zeros(6), torch.randn(6, 4), torch.zeros(4))
        for layer in (0, 1)
    }
    save_circuit_tracer(TranscoderSet(layers, "mlp_in", "mlp_out"), tmp_path, "tiny")
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert (config["feature_input_hook"], config["feature_output_hook"]) == ("mlp.hook_in", "hook_mlp_out")
    loaded = load_transcoders(tmp_path)
    assert torch.allclose(loaded[1].W_dec, layers[1].W_dec) and loaded.layers == [0, 1]
