"""Shared fixtures: the real SmolLM2 tokenizer (from the embedded GGUF, converted
once per session) and tiny random models built from transformers configs, so no
test downloads anything."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@pytest.fixture(scope="session")
def prefect_api() -> str:
    """One temporary Prefect API and database for the session (Prefect's own test harness): its URL.

    The flow module is imported here, before any test's capsys: Prefect's console log handler keeps
    the stderr it first sees, which must outlive a single test.
    """
    import flows.audit_pipeline  # noqa: F401
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness():
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """Reuse a converted model across sessions when AUTOLABEL_CACHE_DIR is set."""
    configured = os.environ.get("AUTOLABEL_CACHE_DIR")
    return Path(configured) if configured else tmp_path_factory.mktemp("autolabel-cache")


@pytest.fixture(scope="session")
def smollm2(cache_dir):
    from autolabel.models import load_subject_model

    return load_subject_model("embedded:smollm2", cache_dir)


@pytest.fixture(scope="session")
def tokenizer(smollm2):
    return smollm2.tokenizer


def tiny_model(family: str = "llama", n_layers: int = 4, vocab_size: int = 49152):
    """A random model of the given family, small enough to run in milliseconds."""
    from transformers import AutoModelForCausalLM, Gemma2Config, LlamaConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    config = {"llama": LlamaConfig, "qwen2": Qwen2Config, "gemma2": Gemma2Config}[family](**common)
    if family == "gemma2":
        config.head_dim = 8
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="session")
def tiny_subject(tokenizer):
    from autolabel.models import SubjectModel

    return SubjectModel(tiny_model("llama"), tokenizer, "tiny-llama")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A local HF folder (tiny random Llama + SmolLM2 tokenizer) whose chat template refuses two user turns."""
    folder = tmp_path_factory.mktemp("tiny-model")
    tiny_model("llama").save_pretrained(folder)
    strict = __import__("copy").deepcopy(tokenizer)
    strict.chat_template = ("{% for m in messages %}{% if loop.index0 > 0 and m['role'] == messages[loop.index0 - 1]['role'] %}"
                            "{{ raise_exception('Conversation roles must alternate') }}{% endif %}"
                            "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    strict.save_pretrained(folder)
    return folder
