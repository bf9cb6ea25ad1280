from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from autolabel.errors import AutolabelError
from autolabel.models import HookPoint, SubjectModel, load_subject_model


@pytest.mark.parametrize(
    "family,resid_mid,mlp_out",
    [
        ("llama", "2.post_attention_layernorm", "2.mlp"),
        ("qwen2", "2.post_attention_layernorm", "2.mlp"),
        ("gemma2", "2.pre_feedforward_layernorm", "2.post_feedforward_layernorm"),
    ],
)
def test_hook_aliases_per_family(tokenizer, family, resid_mid, mlp_out):
    subject = SubjectModel(tiny_model(family, vocab_size=64), tokenizer, f"tiny-{family}")
    for name in ["blocks.2.mlp.hook_in", "mlp_in", "model.layers.2.mlp:input"]:
        assert subject.hook_point(name, layer=2) == HookPoint(2, "2.mlp", "input")
    norm = resid_mid.split(".")[1]
    assert subject.hook_point("blocks.2.ln2.hook_normalized") == HookPoint(2, f"2.{norm}", "output", pregain=True)
    assert subject.hook_point("mlp.hook_in", layer=2) == HookPoint(2, "2.mlp", "input")
    assert subject.hook_point("blocks.2.hook_resid_mid") == HookPoint(2, resid_mid, "input")
    assert subject.hook_point("hook_mlp_out", layer=2) == HookPoint(2, mlp_out, "output")
    assert subject.hook_point("layers.2.mlp:output") == HookPoint(2, "2.mlp", "output")


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_pregain_normalized_hook(tokenizer, family):
    """ln2.hook_normalized is the residual divided by its RMS, before the norm's gain."""
    subject = SubjectModel(tiny_model(family, vocab_size=64), tokenizer, f"tiny-{family}")
    norm = subject.hook_point("resid_mid", 1).module
    with torch.no_grad():  # a non-trivial gain, so dividing it out matters
        subject.layers.get_submodule(norm).weight.uniform_(0.5, 1.5)
    ids = torch.tensor([[3, 9, 27, 40]])
    resid, normalized, mlp_in = (subject.hook_point(n, 1) for n in ("resid_mid", "ln2.hook_normalized", "mlp_in"))
    got = subject.capture(ids, None, [resid, normalized, mlp_in])
    x = got[resid].float()
    eps = subject.model.config.rms_norm_eps
    assert torch.allclose(got[normalized], x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps), atol=1e-5)
    assert not torch.allclose(got[normalized], got[mlp_in], atol=1e-3)


def test_bad_hook_names_are_clear(tiny_subject):
    with pytest.raises(AutolabelError, match="unknown hook point"):
        tiny_subject.hook_point("blocks.1.hook_attn_z")
    with pytest.raises(AutolabelError, match="names no layer"):
        tiny_subject.hook_point("mlp.hook_in")
    with pytest.raises(AutolabelError, match="outside 0..3"):
        tiny_subject.hook_point("blocks.9.mlp.hook_in")
    with pytest.raises(AutolabelError, match="no module"):
        tiny_subject.hook_point("model.layers.1.moe:input")


def test_capture_matches_reference_and_stops_early(tiny_subject):
    ids = torch.tensor([[5, 17, 300, 42, 9], [7, 7, 8, 1000, 3]])
    mask = torch.ones_like(ids)
    resid_pre_2 = tiny_subject.hook_point("model.layers.2.input_layernorm:input")
    mlp_in, mlp_out = tiny_subject.hook_point("mlp_in", 1), tiny_subject.hook_point("mlp_out", 1)
    calls = []
    handle = tiny_subject.layers[3].register_forward_hook(lambda *_: calls.append(1))
    try:
        got = tiny_subject.capture(ids, mask, [resid_pre_2, mlp_in, mlp_out])
    finally:
        handle.remove()
    assert calls == []  # layer 3 never ran: the forward stopped after the deepest hook
    with torch.inference_mode():
        reference = tiny_subject.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    assert torch.allclose(got[resid_pre_2], reference.hidden_states[2], atol=1e-6)
    assert got[mlp_in].shape == (2, 5, 32)
    with torch.inference_mode():
        assert torch.allclose(tiny_subject.layers[1].mlp(got[mlp_in]), got[mlp_out], atol=1e-6)


def test_embedded_model_converts_once(smollm2, cache_dir):
    assert (smollm2.family, smollm2.n_layers, smollm2.d_model) == ("llama", 30, 576)
    folders = list((cache_dir / "models").iterdir())
    stamp = [f.stat().st_mtime_ns for f in folders]
    again = load_subject_model("embedded:smollm2", cache_dir)
    assert [f.stat().st_mtime_ns for f in (cache_dir / "models").iterdir()] == stamp
    ids = smollm2.tokenizer("The cat sat", return_tensors="pt").input_ids
    with torch.inference_mode():
        assert torch.equal(again.model(ids).logits, smollm2.model(ids).logits)


def test_model_source_errors(tmp_path, cache_dir, monkeypatch):
    with pytest.raises(AutolabelError, match="does not exist"):
        load_subject_model(str(tmp_path / "nope"), cache_dir)
    with pytest.raises(AutolabelError, match="does not exist"):
        load_subject_model(str(tmp_path / "nope.gguf"), cache_dir)
    with pytest.raises(AutolabelError, match="no config.json"):
        load_subject_model(str(tmp_path), cache_dir)
    with pytest.raises(AutolabelError, match="unknown embedded model"):
        load_subject_model("embedded:gpt5", cache_dir)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(AutolabelError, match="local HF folder or .gguf"):
        load_subject_model("someone/some-model", cache_dir)
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(AutolabelError, match="cannot read GGUF"):
        load_subject_model(str(broken), cache_dir)


def test_auto_dtype_follows_the_cpu_and_keys_the_collection(monkeypatch, tiny_model_dir, cache_dir):
    import autolabel.config as config
    from autolabel.collect.stage import fingerprint

    monkeypatch.setattr(config, "native_bfloat16", lambda: True)
    assert config.ModelConfig().dtype == "bfloat16"
    assert config.ModelConfig(dtype="float32").dtype == "float32"  # an explicit choice wins
    monkeypatch.setattr(config, "native_bfloat16", lambda: False)
    assert config.RunConfig().model.dtype == "float32"
    assert config.RunConfig.model_validate({"model": {"dtype": "auto"}}).model_dump()["model"]["dtype"] == "float32"

    subject = load_subject_model(str(tiny_model_dir), cache_dir, "bfloat16")
    assert subject.dtype == "bfloat16" and next(subject.model.parameters()).dtype == torch.bfloat16
    keys = {
        fingerprint(config.CollectConfig(), "corpus", "tc", subject.model_id, dtype)
        for dtype in ("float32", "bfloat16")
    }
    assert len(keys) == 2  # a bfloat16 run never resumes or reuses a float32 collection
