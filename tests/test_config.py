"""Config values that parse but make no sense are refused when the config is read, with the one-line error every
other config problem gets, rather than disabling a check or failing a later stage."""

from __future__ import annotations

import pytest
import yaml
from test_cli import run_cli

from autolabel.config import load_config
from autolabel.errors import AutolabelError


@pytest.mark.parametrize(
    "text, message",
    [
        # NaN passes every bound, so this switched the fit check off
        ("transcoder:\n  max_fvu: .nan\n", "transcoder.max_fvu: Input should be a finite number"),
        ("transcoder:\n  max_fvu: -1\n", "transcoder.max_fvu: Input should be greater than 0"),
        ("llm:\n  timeout_s: .inf\n", "llm.timeout_s: Input should be a finite number"),
        (
            "llm:\n  prices:\n    gpt-x:\n      input_per_mtok: .nan\n",
            "llm.prices.gpt-x.input_per_mtok: Input should be a finite",
        ),
        ("corpus:\n  sources: []\n", "corpus.sources: Value error, lists no sources"),
        (
            "corpus:\n  sources:\n  - name: bbc_newz\n  - name: chitchat\n",
            "corpus.sources: Value error, unknown source name(s) 'bbc_newz'; known sources: bbc_news, chitchat",
        ),
        (
            "transcoder:\n  train:\n    corpus:\n      sources:\n      - name: wiki\n",
            "transcoder.train.corpus.sources: Value error, unknown source name(s) 'wiki'",
        ),
        ("transcoder:\n  train:\n    k: 5000\n    d_feat: 2048\n", "k 5000 is more features than d_feat 2048"),
        ("transcoder:\n  train:\n    lr: 0\n", "transcoder.train.lr: Input should be greater than 0"),
        (
            "transcoder:\n  train:\n    layers: [6, -1]\n",
            "transcoder.train.layers.1: Input should be greater than or equal to 0",
        ),
        ("transcoder:\n  train:\n    jumprelu_init_threshold: -0.1\n", "transcoder.train.jumprelu_init_threshold"),
        ("collect:\n  rare_density: 2\n", "collect.rare_density: Input should be less than or equal to 1"),
        ("label:\n  layers: []\n", "label.layers: List should have at least 1 item"),
        ("label:\n  features: [-4]\n", "label.features.0: Input should be greater than or equal to 0"),
        ("cluster:\n  seed: -1\n", "cluster.seed: Input should be greater than or equal to 0"),
        ("corpus:\n  seed: 4294967296\n", "corpus.seed: Input should be less than 4294967296"),
    ],
)
def test_nonsensical_values_exit_2_with_one_line(monkeypatch, capsys, tmp_path, text, message):
    path = tmp_path / "run.yaml"
    path.write_text(text, encoding="utf-8")
    code, out, err = run_cli(monkeypatch, capsys, "config", "--config", str(path))
    assert code == 2 and out == ""
    assert message in err and str(path) in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_only_the_nonsense_is_refused_beside_sensible_edge_values(tmp_path):
    edges = {
        "corpus": {
            "sources": [
                {"name": "bbc_news", "limit": 1},
                {"name": "prompts", "path": "p"},
                {"name": "file", "path": "f.jsonl"},
            ],
            "seed": 4294967295,
        },
        "transcoder": {"max_fvu": float("nan"), "train": {"k": 32, "d_feat": 32, "aux_k": 0, "resample_until": 1.0}},
        "collect": {"rare_density": 0.0, "random_examples": 0},
        "label": {"layers": None, "features": [0, 5], "unreliable_below": 1.0},
        "llm": {"max_cost_usd": None, "temperature": 0.0, "backoff_s": 0},
        "cluster": {"decoder_weight": 1.0, "seed": 0},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(edges), encoding="utf-8")
    with pytest.raises(AutolabelError) as err:
        load_config(path)
    assert "is invalid: transcoder.max_fvu: Input should be a finite number (see" in str(err.value)  # the one problem
    edges["transcoder"]["max_fvu"] = 3.0
    path.write_text(yaml.safe_dump(edges), encoding="utf-8")
    config = load_config(path)
    assert [s.name for s in config.corpus.sources] == ["bbc_news", "prompts", "file"]
    assert (config.transcoder.max_fvu, config.transcoder.train.k, config.label.layers) == (3.0, 32, None)
