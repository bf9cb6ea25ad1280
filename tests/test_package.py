"""autolabel as a user gets it from a wheel: a plain (non-editable) install, used from another folder,
finds its default spec, groups, prompt sets and transcoders inside the package, not in a checkout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import yaml

from autolabel.config import PROJECT_ROOT

CHECK = """
import json, sys
import autolabel
from autolabel.audit import load_spec
from autolabel.cluster.groups import load_groups
from autolabel.config import load_config
from autolabel.corpus.sources import load_source
from autolabel.transcoders.stage import open_transcoders

config = load_config(None)
prompts = next(s for s in config.corpus.sources if s.name == "prompts")
print(json.dumps({
    "package": autolabel.__file__,
    "spec": load_spec(config.audit.specs[0]).name,
    "groups": sorted(load_groups(config.cluster.groups).groups),
    "prompt_documents": len(load_source(prompts, 0)),
    "transcoder_layers": open_transcoders(config.transcoder.source, "auto").layers,
}))
"""


def test_a_wheel_installed_elsewhere_runs_on_its_own_package_data(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(PROJECT_ROOT / name, source / name)
    for package in ("autolabel", "flows"):
        shutil.copytree(PROJECT_ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(source),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("autolabel-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "autolabel/data/defaults/assistant_pervasiveness.yaml" in names
    assert "autolabel/data/defaults/prompts/recipe.jsonl" in names
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    environment = {**os.environ, "PYTHONPATH": str(site)}  # ahead of the checkout's editable install

    config = subprocess.run(
        [sys.executable, "-m", "autolabel", "config"], cwd=elsewhere, env=environment, capture_output=True, text=True
    )
    assert config.returncode == 0, config.stderr
    defaults = yaml.safe_load(config.stdout)
    for path in (*defaults["audit"]["specs"], defaults["cluster"]["groups"]):
        assert Path(path).is_file() and Path(path).is_relative_to(site), path

    checked = subprocess.run(
        [sys.executable, "-c", CHECK], cwd=elsewhere, env=environment, capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stderr
    found = json.loads(checked.stdout.strip().splitlines()[-1])
    assert Path(found["package"]).is_relative_to(site)
    assert found["spec"] == "assistant_pervasiveness" and "refusal" in found["groups"]
    assert found["prompt_documents"] == 6 * 24 and found["transcoder_layers"] == [6, 15, 24]
