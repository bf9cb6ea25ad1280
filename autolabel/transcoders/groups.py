"""A transcoder set for many layers, trained a group of layers at a time into one folder that can stop and continue.

Activation buffers for every layer at once do not fit in memory (buffer_tokens x 2 x d_model in fp16 per layer:
1.4 GB per SmolLM2 layer at 600 k tokens), so layers train `group_size` at a time, each group's buffers freed before
the next. The folder records the run, so a killed training re-run with the same arguments continues:

    plan.json                   settings, model and a digest of the data; a re-run with others is refused
    checkpoints/group-<g>.pt    the training state of the group in progress (written by rename: never half a file)
    groups/group-<g>/           a finished group: its set, held-out quality and history (renamed into place)
    config.yaml, layer_<L>.safetensors, autolabel.json, history.json
                                the merged set in the circuit-tracer layout, once every group is done

Merging moves the files into place with config.yaml last, so the folder loads only once it is whole, then
removes groups/ and checkpoints/. plan.json stays: a re-run finds the set finished and trains nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from autolabel.config import TranscoderTrainConfig
from autolabel.corpus.windows import Window
from autolabel.errors import AutolabelError
from autolabel.models import SubjectModel
from autolabel.transcoders.check import LayerQuality, measure_quality
from autolabel.transcoders.formats import load_transcoders, save_circuit_tracer
from autolabel.transcoders.train import train_transcoders
from autolabel.transcoders.transcoder import TranscoderSet

# (group index, its layers, training tokens already done) -> the group's on_step, or None
GroupStart = Callable[[int, list[int], int], Callable[[int, dict[int, dict[str, float]]], None] | None]


@dataclass
class GroupedTraining:
    groups: list[list[int]]  # the layers of each group, in training order
    finished: int  # groups finished, by this call or earlier ones
    trained_now: list[int]  # groups this call trained or continued
    quality: dict[int, LayerQuality]  # held-out, per layer of every finished group
    transcoders: TranscoderSet | None  # the merged set; None while groups are left


def layer_groups(layers: list[int], group_size: int | None) -> list[list[int]]:
    size = group_size or len(layers)
    return [layers[begin : begin + size] for begin in range(0, len(layers), size)]


def train_in_groups(
    train: list[Window],
    heldout: list[Window],
    subject: SubjectModel,
    config: TranscoderTrainConfig,
    check_tokens: int,
    out_dir: Path,
    max_groups: int | None = None,
    start_group: GroupStart | None = None,
) -> GroupedTraining:
    """Train config.layers in groups of config.group_size into out_dir, skipping finished groups and continuing an
    interrupted one from its checkpoint; at most max_groups groups in this call. Merges once all are done."""
    out_dir = Path(out_dir)
    beyond = [layer for layer in config.layers if layer >= subject.n_layers]
    if beyond:
        raise AutolabelError(
            f"transcoder.train.layers: {subject.model_id} has layers 0-{subject.n_layers - 1}, "
            f"not {', '.join(map(str, beyond))}"
        )
    groups = layer_groups(config.layers, config.group_size)
    _claim(out_dir, _plan(config, subject, check_tokens, train, heldout))
    if (out_dir / "config.yaml").is_file():
        _remove_scratch(out_dir)  # a merge killed after its last rename
        tset = load_transcoders(out_dir, "circuit_tracer")
        return GroupedTraining(groups, len(groups), [], _quality(tset.metadata), tset)
    trained_now = []
    for index, layers in enumerate(groups):
        if _group_dir(out_dir, index).is_dir():
            continue
        if max_groups is not None and len(trained_now) >= max_groups:
            break
        _train_group(index, layers, train, heldout, subject, config, check_tokens, out_dir, start_group)
        trained_now.append(index)
    finished = [_read_group(out_dir, index) for index in range(len(groups)) if _group_dir(out_dir, index).is_dir()]
    quality = {layer: q for tset in finished for layer, q in _quality(tset.metadata).items()}
    merged = _merge(finished, config, subject, out_dir) if len(finished) == len(groups) else None
    return GroupedTraining(groups, len(finished), trained_now, quality, merged)


def _plan(
    config: TranscoderTrainConfig, subject: SubjectModel, check_tokens: int, train: list[Window], heldout: list[Window]
) -> dict:
    """What the set depends on: a folder trained with anything else would mix two sets."""
    return {
        "model_id": subject.model_id,
        "model_dtype": subject.dtype,
        "check_tokens": check_tokens,
        "train": config.model_dump(mode="json", exclude={"checkpoint_every_steps"}),
        "train_windows": _digest(train),
        "heldout_windows": _digest(heldout),
    }


def _digest(windows: list[Window]) -> str:
    digest = hashlib.sha256()
    for window in windows:
        digest.update(f"{window.doc_id}:{window.start}:".encode())
        digest.update(window.token_ids.tobytes())
    return f"{len(windows)} windows, sha256 {digest.hexdigest()[:16]}"


def _claim(out_dir: Path, plan: dict) -> None:
    """Record the plan in a new folder, or check it against the one the folder was started with."""
    plan_path = out_dir / "plan.json"
    if plan_path.is_file():
        try:
            recorded = json.loads(plan_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise AutolabelError(f"cannot read {plan_path} ({err}); delete the folder to train from scratch") from err
        differences = _differences(recorded, plan)
        if differences:
            raise AutolabelError(
                f"{out_dir} holds a transcoder training with other settings ({'; '.join(differences)}); "
                "re-run with the same ones to continue it, or pick another --out"
            )
        return
    if out_dir.exists() and any(out_dir.iterdir()):
        raise AutolabelError(
            f"{out_dir} is not empty and has no plan.json, so it is not a folder that "
            "`autolabel transcoder train` started; pick a new or empty --out"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_atomically(plan_path, lambda path: path.write_text(json.dumps(plan, indent=2), encoding="utf-8"))


def _differences(recorded: dict, plan: dict, prefix: str = "") -> list[str]:
    found = []
    for key in sorted(set(recorded) | set(plan)):
        was, now = recorded.get(key), plan.get(key)
        if isinstance(was, dict) and isinstance(now, dict):
            found += _differences(was, now, f"{prefix}{key}.")
        elif was != now:
            found.append(f"{prefix}{key}: {json.dumps(was)} there, {json.dumps(now)} now")
    return found


def _train_group(
    index: int,
    layers: list[int],
    train: list[Window],
    heldout: list[Window],
    subject: SubjectModel,
    config: TranscoderTrainConfig,
    check_tokens: int,
    out_dir: Path,
    start_group: GroupStart | None,
) -> None:
    """Train (or continue) one group, measure it on held-out tokens, and rename its folder into place."""
    group_config = config.model_copy(update={"layers": layers})
    checkpoint = out_dir / "checkpoints" / f"group-{index:02d}.pt"
    # Our own file, written by torch.save; weights_only refuses anything but tensors and plain values.
    resume = torch.load(checkpoint, weights_only=True) if checkpoint.is_file() else None
    on_step = start_group(index, layers, resume["position"]["seen"] if resume else 0) if start_group else None

    def on_checkpoint(state: dict) -> None:
        checkpoint.parent.mkdir(exist_ok=True)
        _write_atomically(checkpoint, lambda path: torch.save(state, path))

    result = train_transcoders(subject, train, group_config, on_step, on_checkpoint, resume)
    quality = measure_quality(subject, result.transcoders, heldout, check_tokens)
    result.transcoders.metadata.update(
        {
            "model_id": subject.model_id,
            "group": index,
            "seconds": round(result.seconds, 1),
            "resampled_features": {str(k): n for k, n in result.resampled.items()},
            "heldout": {
                str(k): {"fvu": q.fvu, "l0": q.l0, "dead_fraction": q.dead_fraction, "n_tokens": q.n_tokens}
                for k, q in quality.items()
            },
        }
    )
    staging = out_dir / "groups" / f".group-{index:02d}.tmp"
    shutil.rmtree(staging, ignore_errors=True)  # left by a run killed while saving
    save_circuit_tracer(result.transcoders, staging, subject.model_id, getattr(torch, config.save_dtype))
    (staging / "history.json").write_text(
        json.dumps([{"group": index, **entry} for entry in result.history]), encoding="utf-8"
    )
    os.replace(staging, _group_dir(out_dir, index))
    checkpoint.unlink(missing_ok=True)


def _merge(
    finished: list[TranscoderSet], config: TranscoderTrainConfig, subject: SubjectModel, out_dir: Path
) -> TranscoderSet:
    """One set of every group's layers, written beside plan.json (config.yaml last); the scratch folders go."""
    groups = [tset.metadata for tset in finished]  # each group's autolabel.json
    merged = TranscoderSet(
        {layer: tc for tset in finished for layer, tc in tset.transcoders.items()},
        input_hook=finished[0].input_hook,
        output_hook=finished[0].output_hook,
        source_format="autolabel",
        model_name=subject.model_id,
        metadata={
            "train_config": config.model_dump(mode="json"),
            "model_id": subject.model_id,
            "tokens": groups[0]["tokens"],
            "steps": groups[0]["steps"],
            "seconds": round(sum(meta["seconds"] for meta in groups), 1),
            "groups": [{"layers": tset.layers, "seconds": tset.metadata["seconds"]} for tset in finished],
            "resampled_features": {k: n for meta in groups for k, n in meta["resampled_features"].items()},
            "heldout": {k: q for meta in groups for k, q in meta["heldout"].items()},
        },
    )
    staging = out_dir / ".merged.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    save_circuit_tracer(merged, staging, subject.model_id, getattr(torch, config.save_dtype))
    history = [
        entry
        for index in range(len(finished))
        for entry in json.loads((_group_dir(out_dir, index) / "history.json").read_text(encoding="utf-8"))
    ]
    (staging / "history.json").write_text(json.dumps(history), encoding="utf-8")
    for path in sorted(staging.iterdir(), key=lambda p: p.name == "config.yaml"):
        os.replace(path, out_dir / path.name)
    _remove_scratch(out_dir)
    return load_transcoders(out_dir, "circuit_tracer")


def _remove_scratch(out_dir: Path) -> None:
    for name in ("groups", "checkpoints", ".merged.tmp"):
        shutil.rmtree(out_dir / name, ignore_errors=True)


def _group_dir(out_dir: Path, index: int) -> Path:
    return out_dir / "groups" / f"group-{index:02d}"


def _read_group(out_dir: Path, index: int) -> TranscoderSet:
    return load_transcoders(_group_dir(out_dir, index), "circuit_tracer")


def _quality(metadata: dict) -> dict[int, LayerQuality]:
    return {
        int(layer): LayerQuality(int(layer), q["fvu"], q["l0"], q["dead_fraction"], q["n_tokens"])
        for layer, q in metadata.get("heldout", {}).items()
    }


def _write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    staging = path.with_name(f".{path.name}.tmp")
    write(staging)
    os.replace(staging, path)
