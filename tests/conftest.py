"""Shared fixtures: the real SmolLM2 tokenizer (from the embedded GGUF, converted
once per session), tiny random models built from transformers configs, so no
test downloads anything, and the fixtures more than one test module uses. Their
helpers stay with the tests they belong to (test_collect, test_store)."""

from __future__ import annotations

import os
from collections.abc import Callable
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
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    import flows.audit_pipeline  # noqa: F401

    # A loaded machine (CI beside other jobs) can take minutes to start it; Prefect's 30 s default fails there.
    with prefect_test_harness(server_startup_timeout=300):
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

    common = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
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
    strict.chat_template = (
        "{% for m in messages %}{% if loop.index0 > 0 and m['role'] == messages[loop.index0 - 1]['role'] %}"
        "{{ raise_exception('Conversation roles must alternate') }}{% endif %}"
        "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    strict.save_pretrained(folder)
    return folder


@pytest.fixture
def filled_store(tmp_path) -> Path:
    """A store holding a two-document corpus `c1`."""
    from test_store import doc_rows

    from autolabel.store import Store

    path = tmp_path / "s.duckdb"
    with Store(path) as store:
        store.write_shard("c1", "corpus", "docs-0", doc_rows("c1", ["a", "b"]))
    return path


@pytest.fixture
def config(tmp_path, tiny_model_dir, cache_dir):
    """A whole run's RunConfig on the tiny model (test_collect.tiny_run_config)."""
    from test_collect import tiny_run_config

    from autolabel.config import RunConfig

    return RunConfig.model_validate(tiny_run_config(tmp_path, tiny_model_dir, cache_dir))


@pytest.fixture(scope="session")
def corpus(tmp_path_factory, tiny_subject) -> tuple:
    """The collection tests' corpus: (store path, corpus_id, windows). A module may bring its own."""
    from test_collect import file_corpus, write_corpus

    folder = tmp_path_factory.mktemp("collect")
    write_corpus(folder / "docs.jsonl")
    return file_corpus(folder, tiny_subject, ctx_len=48)


@pytest.fixture(scope="session")
def built_once() -> Callable:
    """`built_once(name, corpus, build)`: what `build()` returned the first time this session asked for `name`
    on this corpus, so modules sharing a corpus share its transcoder and collection, and a module with its
    own `corpus` (test_report) gets its own."""
    built: dict[tuple[str, str], object] = {}

    def once(name: str, corpus: tuple, build: Callable[[], object]):
        key = (name, str(corpus[0]))
        if key not in built:
            built[key] = build()
        return built[key]

    return once


@pytest.fixture(scope="module")
def planted(corpus, tiny_subject, built_once):
    """(transcoder set, target token ids): test_collect.plant on this module's corpus."""
    from test_collect import plant

    return built_once("planted", corpus, lambda: plant(corpus, tiny_subject))


@pytest.fixture(scope="module")
def collected(corpus, tiny_subject, planted, built_once):
    """(run_id, summary) of collecting this module's corpus with the planted transcoder."""
    from test_collect import collect

    store_path, corpus_id, _ = corpus
    return built_once("collected", corpus, lambda: collect(store_path, corpus_id, tiny_subject, planted[0]))
