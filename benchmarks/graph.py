"""Attribution graphs side by side with circuit-tracer 0.5.0: the same graph, and what it costs.

    .venv/bin/python benchmarks/graph.py [--circuit-tracer-python /tmp/venvs/circuit-tracer/bin/python]

circuit-tracer pins transformers 4.57.3, so it runs in its own venv (python -m venv; torch==2.13.0 first,
then `pip install circuit-tracer==0.5.0 nnsight==0.6.3` with a constraint keeping that torch), as the
collection benchmark runs delphi. Both tools get, each in a fresh process (its peak RSS its own):

- the same model: the embedded SmolLM2-135M-Instruct, the float32 folder autolabel converts it to
  (circuit-tracer loads it with its nnsight backend);
- the same transcoders: the embedded TopK set (layers 6, 15, 24), exported with save_circuit_tracer into
  circuit-tracer's layout ($CIRCUIT_TRACER_CACHE_DIR/<name>/config.yaml + layer_<i>.safetensors). circuit-tracer
  needs a transcoder at every layer, so the other layers get one that never fires (its whole MLP output is an
  error node, as autolabel treats a layer without a transcoder); its loader knows ReLU and JumpReLU only, so
  the driver sets its own `TopK(k)` module, followed by a ReLU as autolabel's TopK, on the three real layers;
- the model folder as transformers 4.57 reads it (see transformers4_folder);
- the same token ids: circuit-tracer's BOS (<|im_start|>) first, whose features neither tool makes nodes;
- the same settings: targets the most likely tokens up to 0.95 probability (at most 10), every active
  feature a node; each tool's own batch size (circuit-tracer 512; autolabel each of --batch-sizes, 32 its
  default).

Compared per prompt: the Spearman rank correlation of node influence (influence on the targets, the same
formula in both) over the feature nodes both graphs have; the overlap of the 50 edges of largest |weight| in
the unpruned adjacency (edges named by circuit-tracer's node ids); seconds per graph (autolabel: the clean
pass, targets, every edge and the pruning, what `autolabel graph` does before storing; circuit-tracer:
`attribute()`, which does not prune), after one warm-up graph; each process's peak RSS. The top edges are also
compared with the sources at the BOS position left out: circuit-tracer zeroes the error nodes there, autolabel
keeps them (docs/graphs.md). Run-to-run noise on a shared machine is large: compare only within one run.

`--baseline TREE` also runs the autolabel side with the autolabel package of another checkout (e.g. a
`git worktree add --detach /tmp/base HEAD` before a change), in the same run: seconds, backward passes and peak
RSS of both, and whether the graphs are the same (feature nodes, largest |difference| of node influence and of
each node's summed incoming edges, top-edge overlap). Without circuit-tracer's venv only autolabel runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import peak_rss_mb

EMBEDDED_SET = Path(__file__).resolve().parent.parent / "autolabel" / "data" / "transcoders" / "smollm2-135m-instruct"
SET_NAME = "autolabel-smollm2-embedded"
TOP_EDGES = 50
PROMPTS = [
    "The capital of France is",
    "In the morning the baker opens her shop, and the first customer always asks for a loaf of fresh",
]
WARM_UP = "Hello there"

DRIVER = """
import json, resource, sys, time
import torch
from circuit_tracer import attribute
from circuit_tracer.graph import compute_node_influence
from circuit_tracer.replacement_model import ReplacementModel
from circuit_tracer.transcoder.activation_functions import TopK
from circuit_tracer.utils.caching import load_transcoders_from_cache

args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
cpu = torch.device("cpu")
transcoders, _ = load_transcoders_from_cache(args["set"], device=cpu, dtype=torch.float32)
for layer in args["topk_layers"]:  # autolabel's TopK: the k largest pre-activations, then ReLU
    transcoders[layer].activation_function = torch.nn.Sequential(TopK(args["k"]), torch.nn.ReLU())
model = ReplacementModel.from_pretrained_and_transcoders(args["model"], transcoders, backend="nnsight", device=cpu,
                                                         dtype=torch.float32)
n_layers = model.cfg.n_layers
graphs = []
for ids in [args["warm_up"]] + args["prompts"]:
    started = time.perf_counter()
    graph = attribute(torch.tensor(ids), model, max_n_logits=10, desired_logit_prob=0.95, max_feature_nodes=None)
    seconds = time.perf_counter() - started
    n_pos, logits = graph.n_pos, graph.logit_token_ids.tolist()
    chosen = graph.active_features[graph.selected_features].tolist()  # [n_f, 3] layer, position, feature
    node_ids = ([f"{l}_{f}_{p}" for l, p, f in chosen] + [f"{l}_-1_{p}" for l in range(n_layers) for p in range(n_pos)]
                + [f"E_{t}_{p}" for p, t in enumerate(graph.input_tokens.tolist())]
                + [f"{n_layers + 1}_{t}_{n_pos - 1}" for t in logits])
    adjacency = graph.adjacency_matrix.float()
    weights = torch.zeros(len(node_ids))
    weights[-len(logits):] = graph.logit_probabilities
    def top_edges(matrix):
        top = matrix.abs().flatten().topk(args["top_edges"]).indices
        rows, columns = (top // matrix.shape[1]).tolist(), (top % matrix.shape[1]).tolist()
        return [[node_ids[r], node_ids[c]] for r, c in zip(rows, columns, strict=True)]
    first = torch.tensor([node.rsplit("_", 1)[1] == "0" for node in node_ids])  # sources at the BOS position
    graphs.append({"seconds": seconds, "features": node_ids[: len(chosen)], "targets": logits,
                   "edges": top_edges(adjacency), "edges_after_bos": top_edges(adjacency * ~first),
                   "influence": compute_node_influence(adjacency, weights)[: len(chosen)].tolist()})
json.dump({"graphs": graphs[1:], "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024},
          open(args["out"], "w"))
"""


def token_ids(tokenizer, text: str) -> list[int]:
    """circuit-tracer's tokenization: a special token first (the BOS, <|im_start|> for SmolLM2)."""
    return [tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]]


def graph_record(
    seconds: float,
    ids: list[str],
    n_features: int,
    targets: list[int],
    adjacency: torch.Tensor,
    influence: torch.Tensor,
    backward_passes: int,
) -> dict:
    """What the comparison reads of one graph (the driver writes the same for circuit-tracer's): the feature
    nodes with their influence, the TOP_EDGES largest |edges| as (target, source) node ids, also with the
    sources at the BOS position left out (circuit-tracer zeroes their error nodes, autolabel keeps them)."""

    def top_edges(matrix: torch.Tensor) -> list[list[str]]:  # [N, N], row target
        top = matrix.abs().flatten().topk(TOP_EDGES).indices
        rows, columns = (top // matrix.shape[1]).tolist(), (top % matrix.shape[1]).tolist()
        return [[ids[r], ids[c]] for r, c in zip(rows, columns, strict=True)]

    first = torch.tensor([node.rsplit("_", 1)[1] == "0" for node in ids])  # sources at the BOS position
    return {
        "seconds": seconds,
        "features": ids[:n_features],
        "targets": targets,
        "edges": top_edges(adjacency),
        "edges_after_bos": top_edges(adjacency * ~first),
        "influence": influence[:n_features].tolist(),
        "row_sums": adjacency.sum(1).tolist(),
        "backward_passes": backward_passes,
    }


def autolabel_side(prompts: list[list[int]], threads: int, batch_size: int, out: Path) -> None:
    """One process: autolabel's graphs of every prompt, written to `out` as the driver writes circuit-tracer's."""
    from autolabel.config import GraphConfig, RunConfig
    from autolabel.graph.attribute import attribute, salient_logits
    from autolabel.graph.prune import prune
    from autolabel.graph.replacement import layout, record
    from autolabel.graph.stage import node_ids
    from autolabel.models import load_subject_model
    from autolabel.transcoders.formats import load_transcoders

    torch.set_num_threads(threads)
    grad, passes = torch.autograd.grad, [0]

    def counted(*args, **kwargs):  # every backward pass autolabel's attribution makes goes through here
        passes[0] += 1
        return grad(*args, **kwargs)

    torch.autograd.grad = counted
    config, settings = RunConfig(), GraphConfig(batch_size=batch_size)
    subject = load_subject_model(config.model.source, config.cache_dir, "float32")
    tset = load_transcoders(EMBEDDED_SET, "circuit_tracer")
    where = layout(subject, tset)
    graphs = []
    for ids in prompts:
        started, passes[0] = time.perf_counter(), 0
        recorded = record(subject, tset, where, torch.tensor(ids), first_features=False)  # BOS first
        targets = salient_logits(subject, recorded.logits, settings.max_logits, settings.logit_mass)
        attribution = attribute(
            subject, tset, where, recorded, targets, settings.max_feature_nodes, settings.batch_size
        )
        pruned = prune(
            attribution.adjacency,
            len(attribution.features),
            attribution.n_pos + len(targets.token_ids),
            targets.probabilities,
            settings.node_threshold,
            settings.edge_threshold,
        )
        graphs.append(
            graph_record(
                time.perf_counter() - started,
                node_ids(attribution, ids),
                len(attribution.features),
                targets.token_ids.tolist(),
                attribution.adjacency,
                pruned.influence,
                passes[0],
            )
        )
    out.write_text(json.dumps({"graphs": graphs[1:], "peak_rss_mb": peak_rss_mb()}))


def export_set(cache: Path, n_layers: int) -> tuple[list[int], int]:
    """The embedded set in circuit-tracer's cache layout, every uncovered layer a transcoder that never fires."""
    from autolabel.transcoders.formats import load_transcoders, save_circuit_tracer
    from autolabel.transcoders.transcoder import Transcoder, TranscoderSet

    tset = load_transcoders(EMBEDDED_SET, "circuit_tracer")
    first = tset[tset.layers[0]]
    d_in, d_feat, d_out = first.W_enc.shape[0], first.W_enc.shape[1], first.W_dec.shape[1]
    k = int(first.k)
    silent = {
        layer: Transcoder(
            layer,
            torch.zeros(d_in, d_feat),
            -torch.ones(d_feat),
            torch.zeros(d_feat, d_out),
            torch.zeros(d_out),
            activation="topk",
            k=k,
        )
        for layer in range(n_layers)
        if layer not in tset.transcoders
    }
    every = TranscoderSet({**tset.transcoders, **silent}, tset.input_hook, tset.output_hook)
    save_circuit_tracer(every, cache / SET_NAME, "SmolLM2-135M-Instruct", dtype=torch.float16)
    return tset.layers, k


def transformers4_folder(folder: Path, out: Path) -> Path:
    """The converted model folder as circuit-tracer's transformers 4.57 reads it: the same weights (linked), the
    RoPE base also under its old key (4.57 reads `rope_theta`, not `rope_parameters`, and would silently fall
    back to 10000), and the fast tokenizer under a class 4.57 knows."""
    out.mkdir(parents=True)
    for name in ("model.safetensors", "tokenizer.json", "generation_config.json"):
        (out / name).symlink_to(folder / name)
    config = json.loads((folder / "config.json").read_text())
    config["rope_theta"] = config.get("rope_parameters", {}).get("rope_theta", config.get("rope_theta"))
    (out / "config.json").write_text(json.dumps(config))
    tokenizer = json.loads((folder / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer | {"tokenizer_class": "PreTrainedTokenizerFast"}))
    return out


def compare(ours: dict, theirs: dict) -> dict:
    """Spearman of feature-node influence over the nodes both graphs have, and the top-|edge| overlap."""
    from scipy.stats import spearmanr

    a, b = (dict(zip(graph["features"], graph["influence"], strict=True)) for graph in (ours, theirs))
    shared = sorted(a.keys() & b.keys())
    rho = spearmanr([a[n] for n in shared], [b[n] for n in shared]).statistic if len(shared) > 2 else float("nan")

    def overlap(key: str) -> float:
        edges = [{tuple(edge) for edge in graph[key]} for graph in (ours, theirs)]
        return len(edges[0] & edges[1]) / TOP_EDGES

    return {
        "rho": rho,
        "shared": len(shared),
        "ours": len(a),
        "theirs": len(b),
        "overlap": overlap("edges"),
        "after_bos": overlap("edges_after_bos"),
        "same_targets": ours["targets"] == theirs["targets"],
    }


def run_autolabel(prompts: list[list[int]], threads: int, batch: int, out: Path, env: dict, tree: str | None) -> dict:
    """autolabel's graphs in a fresh process, with the autolabel package of `tree` when given (its peak RSS its own)."""
    env = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [tree, env.get("PYTHONPATH")]))} if tree else env
    started = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            __file__,
            "--side",
            "autolabel",
            "--args",
            json.dumps({"prompts": prompts, "threads": threads, "batch_size": batch, "out": str(out)}),
        ],
        check=True,
        env=env,
    )
    return json.loads(out.read_text()) | {"wall": time.perf_counter() - started}


def run_circuit_tracer(
    python: str, prompts: list[list[int]], threads: int, model_folder: str, n_layers: int, work: Path, env: dict
) -> dict | None:
    """circuit-tracer's graphs in its own venv, or None (with the reason printed) when it is missing or fails."""
    if not Path(python).exists():
        print(f"circuit-tracer: no {python} (see this script's docstring); only autolabel runs")
        return None
    real_layers, k = export_set(work / "circuit-tracer", n_layers)
    (work / "driver.py").write_text(DRIVER)
    started = time.perf_counter()
    ran = subprocess.run(
        [
            python,
            str(work / "driver.py"),
            json.dumps(
                {
                    "set": SET_NAME,
                    "top_edges": TOP_EDGES,
                    "topk_layers": real_layers,
                    "k": k,
                    "model": str(transformers4_folder(Path(model_folder), work / "model")),
                    "threads": threads,
                    "warm_up": prompts[0],
                    "prompts": prompts[1:],
                    "out": str(work / "circuit-tracer.json"),
                }
            ),
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    if ran.returncode != 0:
        print(f"circuit-tracer failed (exit {ran.returncode}):\n{ran.stderr[-4000:]}")
        return None
    return json.loads((work / "circuit-tracer.json").read_text()) | {"wall": time.perf_counter() - started}


def print_against_circuit_tracer(ours: dict, theirs: dict, prompts: list[list[int]]) -> None:
    print(
        f"| prompt tokens | autolabel batch | feature nodes a / ct (shared) | same targets | Spearman influence | "
        f"top-{TOP_EDGES} edge overlap | without BOS-position sources | autolabel s | circuit-tracer s | ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for batch, mine_all in ours.items():
        for index, ids in enumerate(prompts):
            mine, other = mine_all["graphs"][index], theirs["graphs"][index]
            c = compare(mine, other)
            print(
                f"| {len(ids)} | {batch} | {c['ours']} / {c['theirs']} ({c['shared']}) | {c['same_targets']} | "
                f"{c['rho']:.3f} | {c['overlap']:.2f} | {c['after_bos']:.2f} | {mine['seconds']:.1f} | "
                f"{other['seconds']:.1f} | {mine['seconds'] / other['seconds']:.2f}x |"
            )


def print_against_baseline(ours: dict, base: dict, prompts: list[list[int]]) -> None:
    """Seconds and backward passes before and after, and how far apart the two graphs are."""
    print(
        f"| prompt tokens | batch | baseline s | autolabel s | speed-up | backward passes (baseline / now) | "
        f"same feature nodes | max abs diff influence | max abs diff row sum | top-{TOP_EDGES} edge overlap |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for batch, mine_all in ours.items():
        for index, ids in enumerate(prompts):
            mine, old = mine_all["graphs"][index], base[batch]["graphs"][index]
            same = mine["features"] == old["features"] and mine["targets"] == old["targets"]
            influence = (torch.tensor(mine["influence"]) - torch.tensor(old["influence"])).abs().max() if same else None
            row_sums = (torch.tensor(mine["row_sums"]) - torch.tensor(old["row_sums"])).abs().max() if same else None
            print(
                f"| {len(ids)} | {batch} | {old['seconds']:.1f} | {mine['seconds']:.1f} | "
                f"{old['seconds'] / mine['seconds']:.2f}x | {old['backward_passes']} / {mine['backward_passes']} | "
                f"{same} | {influence if influence is None else f'{influence:.1e}'} | "
                f"{row_sums if row_sums is None else f'{row_sums:.1e}'} | {compare(mine, old)['overlap']:.2f} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--circuit-tracer-python", default="/tmp/venvs/circuit-tracer/bin/python")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--batch-sizes",
        default="32,128",
        help="autolabel's graph.batch_size values to run (32 is the default; each in its own process)",
    )
    parser.add_argument(
        "--baseline",
        metavar="TREE",
        help="also run the autolabel package of this checkout (e.g. a git worktree of the commit before a change)",
    )
    parser.add_argument("--side", choices=["autolabel"], help=argparse.SUPPRESS)
    parser.add_argument("--args", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side == "autolabel":
        inner = json.loads(args.args)
        autolabel_side(inner["prompts"], inner["threads"], inner["batch_size"], Path(inner["out"]))
        return
    if args.baseline and not (Path(args.baseline) / "autolabel" / "__init__.py").exists():
        print(f"--baseline {args.baseline}: no autolabel package there", file=sys.stderr)
        sys.exit(2)

    from autolabel.config import RunConfig
    from autolabel.models import convert_gguf, embedded_gguf, load_subject_model

    config = RunConfig()
    model_folder = str(convert_gguf(embedded_gguf(config.model.source.split(":", 1)[1]), Path(config.cache_dir)))
    subject = load_subject_model(config.model.source, config.cache_dir, "float32")
    prompts = [token_ids(subject.tokenizer, text) for text in [WARM_UP, *PROMPTS]]
    n_layers = subject.n_layers
    del subject
    load_before = os.getloadavg()[0]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        env["CIRCUIT_TRACER_CACHE_DIR"] = str(work / "circuit-tracer")
        ours, base = {}, {}
        for batch in [int(b) for b in args.batch_sizes.split(",")]:  # baseline and now alternate: same load
            if args.baseline:
                base[batch] = run_autolabel(prompts, args.threads, batch, work / "baseline.json", env, args.baseline)
            ours[batch] = run_autolabel(prompts, args.threads, batch, work / "autolabel.json", env, None)
        theirs = run_circuit_tracer(
            args.circuit_tracer_python, prompts, args.threads, model_folder, n_layers, work, env
        )

    walls = ", ".join(
        [f"autolabel (batch {b}) {o['wall']:.0f} s" for b, o in ours.items()]
        + [f"baseline (batch {b}) {o['wall']:.0f} s" for b, o in base.items()]
        + ([f"circuit-tracer {theirs['wall']:.0f} s"] if theirs else [])
    )
    print(
        f"load average {os.getloadavg()[0]:.1f} (start {load_before:.1f}), {args.threads} thread(s) per tool; "
        f"process wall time, model loading included: {walls}"
    )
    if theirs:
        print_against_circuit_tracer(ours, theirs, prompts[1:])
    if base:
        print_against_baseline(ours, base, prompts[1:])
    if not theirs and not base:
        for batch, mine_all in ours.items():
            for ids, mine in zip(prompts[1:], mine_all["graphs"], strict=True):
                print(
                    f"{len(ids)} tokens, batch {batch}: {len(mine['features'])} feature nodes, "
                    f"{mine['seconds']:.1f} s, {mine['backward_passes']} backward passes"
                )
    rss = ", ".join(
        [f"autolabel (batch {b}) {o['peak_rss_mb']:.0f} MB" for b, o in ours.items()]
        + [f"baseline (batch {b}) {o['peak_rss_mb']:.0f} MB" for b, o in base.items()]
        + ([f"circuit-tracer {theirs['peak_rss_mb']:.0f} MB"] if theirs else [])
    )
    print(f"peak RSS: {rss}")


if __name__ == "__main__":
    main()
