"""Writing the default corpus's assistant replies: today's transformers batches against llama.cpp slots.

    .venv/bin/python benchmarks/corpus_generate.py [--replies 544] [--rounds 2] [--slots 16,32] [--threads 1]
        [--unbatched 8]

The chats are the default corpus's (544 end on a user turn; --replies N takes a fixed pseudo-random N of
them). They are cut into --rounds slices, and every backend writes every slice, in an order reversed each
round, so the load of a shared machine falls on all of them alike. Each (backend, slice) runs in its own
process: its peak RSS is its own, and its seconds exclude loading the model but include starting llama.cpp's
server (a build pays that once). Rows:

  transformers b32   the path before this benchmark: `generate`, greedy, left-padded batches of 32 sorted
                     by prompt length (the baseline);
  transformers b32 cap  the same with at most 32 x 256 prompt tokens (padding included) a batch: the three
                     long prompts no longer pad a whole batch to 1158 tokens;
  transformers b1    one chat at a time, on the first --unbatched chats only: how many replies the batching
                     itself changes (padding shifts float32 sums);
  llama.cpp sS tT    the GGUF served by llama.cpp with S parallel slots (continuous batching) on T threads.

`same` counts replies identical to the baseline's on the chats both wrote. llama.cpp's threads spin while they
wait for each other: on a machine whose cores other jobs share, more threads than idle cores is far slower.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time

from common import peak_rss_mb

from autolabel.config import CorpusConfig, RunConfig
from autolabel.corpus.build import load_documents
from autolabel.corpus.generate import llama_cpp_replies, transformers_replies
from autolabel.corpus.roles import render_chat
from autolabel.models import load_subject_model

BASELINE = "transformers b32"
UNBOUNDED = 1 << 40  # padded tokens a batch may hold: no bound, as before


def chat_prompts(subject, n: int | None) -> list[str]:
    chats = [d for d in load_documents(CorpusConfig()) if d.needs_reply]
    if n is not None and n < len(chats):
        chats = random.Random(0).sample(chats, n)
    return [render_chat(subject.tokenizer, d.messages, d.doc_id, add_generation_prompt=True) for d in chats]


def worker(spec: dict) -> dict:
    """Write the replies to the chats spec names with one backend; seconds exclude loading the model."""
    import torch

    torch.set_num_threads(spec["threads"])
    config = RunConfig()
    subject = load_subject_model(config.model.source, config.cache_dir)
    prompts = chat_prompts(subject, spec["replies"])[spec["start"] : spec["stop"]]
    generation = config.corpus.generation.model_copy(update={"batch_size": spec["batch"]})
    replies: dict[int, str] = {}

    def done(indices: list[int], texts: list[str]) -> None:
        replies.update(zip(indices, texts, strict=True))

    started = time.perf_counter()
    if spec["backend"] == "llama.cpp":
        ids = [subject.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        llama_cpp_replies(subject.gguf, ids, generation, done, spec["threads"])
    else:
        transformers_replies(subject, prompts, generation, done, spec.get("padded_tokens"))
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "replies": [replies[i] for i in range(len(prompts))], "rss_mb": peak_rss_mb()}


def run(spec: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{spec} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--replies", type=int, default=None, help="chats to answer (default: all 544)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--slots", default="16,32", help="llama.cpp parallel slots, comma-separated")
    parser.add_argument("--threads", default="1", help="llama.cpp threads, comma-separated (transformers: the first)")
    parser.add_argument("--unbatched", type=int, default=8, help="chats written one at a time (0: none)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    config = RunConfig()
    n = len(chat_prompts(load_subject_model(config.model.source, config.cache_dir), args.replies))
    threads = [int(t) for t in args.threads.split(",")]
    rows = {
        BASELINE: {"backend": "transformers", "batch": 32, "threads": threads[0], "padded_tokens": UNBOUNDED},
        "transformers b32 cap": {"backend": "transformers", "batch": 32, "threads": threads[0]},
    }
    for t in threads:
        for s in (int(s) for s in args.slots.split(",")):
            rows[f"llama.cpp s{s} t{t}"] = {"backend": "llama.cpp", "batch": s, "threads": t}
    edges = [round(n * r / args.rounds) for r in range(args.rounds + 1)]
    results = {name: {"seconds": 0.0, "replies": [], "rss_mb": 0.0} for name in rows}
    load_before = os.getloadavg()
    for r in range(args.rounds):
        for name in list(rows) if r % 2 == 0 else list(reversed(rows)):
            got = run({**rows[name], "replies": args.replies, "start": edges[r], "stop": edges[r + 1]})
            results[name]["seconds"] += got["seconds"]
            results[name]["replies"] += got["replies"]
            results[name]["rss_mb"] = max(results[name]["rss_mb"], got["rss_mb"])
            print(f"  round {r + 1}/{args.rounds} {name}: {got['seconds']:.1f} s", file=sys.stderr, flush=True)
    if args.unbatched:
        got = run(
            {
                "backend": "transformers",
                "batch": 1,
                "threads": threads[0],
                "replies": args.replies,
                "start": 0,
                "stop": min(args.unbatched, n),
            }
        )
        results["transformers b1"] = got
    load_after = os.getloadavg()

    base = results[BASELINE]
    print(
        f"\n{n} chats, {args.rounds} rounds; load average {load_before[0]:.1f} at start, {load_after[0]:.1f} at end "
        f"({os.cpu_count()} cores)\n"
    )
    print(f"{'backend':<20} {'replies':>7} {'seconds':>8} {'replies/s':>9} {'x base':>8} {'same':>9} {'peak RSS':>9}")
    for name, got in results.items():
        k = len(got["replies"])
        same = sum(a == b for a, b in zip(got["replies"], base["replies"], strict=False))
        # b1 wrote the first chats of slice 1 only: its rate is compared with the baseline's over the same share
        ratio = (base["seconds"] * k / n) / got["seconds"]
        print(
            f"{name:<20} {k:>7} {got['seconds']:>8.1f} {k / got['seconds']:>9.2f} {ratio:>7.1f}x "
            f"{same:>4}/{k:<4} {got['rss_mb']:>6.0f} MB"
        )


if __name__ == "__main__":
    main()
