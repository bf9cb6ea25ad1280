"""Measure EleutherAI delphi's activation caching (eai-delphi's LatentCache) on CPU.

benchmarks/collect.py uses this script to compare autolabel's activation collection
against delphi's. It runs in its own venv (e.g. /work/venvs/delphi) because
eai-delphi pulls in vllm, so it must not import autolabel.

The transcoder of one layer (circuit-tracer transcoder-set layout: config.yaml
plus layer_{i}.safetensors) is hooked into LatentCache with transcode=True, so
delphi feeds the encoder the input of that layer's MLP. The model is loaded with
AutoModel (no LM head), the way delphi's own CLI loads it. A one-batch warm-up
run is excluded from the timing. Prints one line of JSON to stdout.
"""

import argparse
import importlib.metadata
import json
import re
import resource
import time
from pathlib import Path

import numpy as np
import torch
from delphi.latents import LatentCache
from safetensors.torch import load_file
from transformers import AutoModel


def load_topk_encoder(transcoder_dir: Path, layer: int):
    """Return the layer's encode fn: [..., d_model] -> dense TopK+ReLU [..., d_feat]."""
    config = (transcoder_dir / "config.yaml").read_text()
    k = int(re.search(r"^k:\s*(\d+)", config, re.M).group(1))
    weights = load_file(str(transcoder_dir / f"layer_{layer}.safetensors"))
    w_enc = weights["W_enc"].float()  # [d_feat, d_model]
    b_enc = weights["b_enc"].float()  # [d_feat]

    def encode(x: torch.Tensor) -> torch.Tensor:
        pre = x.float() @ w_enc.T + b_enc
        values, indices = pre.topk(k, dim=-1)
        return torch.zeros_like(pre).scatter_(-1, indices, values.relu())

    return encode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--transcoder-dir", type=Path, required=True)
    parser.add_argument("--layer", type=int, default=24)
    parser.add_argument("--tokens", type=Path, required=True)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = parser.parse_args()

    model = AutoModel.from_pretrained(args.model_dir, dtype=getattr(torch, args.dtype)).eval()
    hookpoint = next(name for name, _ in model.named_modules() if name.endswith(f"layers.{args.layer}.mlp"))
    hooks = {hookpoint: load_topk_encoder(args.transcoder_dir, args.layer)}
    tokens = torch.from_numpy(np.load(args.tokens).astype(np.int64))

    def cache_run(batch: torch.Tensor) -> LatentCache:
        cache = LatentCache(model, hooks, batch_size=args.batch_size, transcode=True)
        cache.run(n_tokens=batch.numel(), tokens=batch)
        return cache

    cache_run(tokens[: args.batch_size])  # warm-up, not timed
    start = time.perf_counter()
    cache = cache_run(tokens)
    seconds = time.perf_counter() - start

    n_tokens = cache.cache.tokens[hookpoint].numel()
    print(
        json.dumps(
            {
                "tool": "delphi",
                "version": importlib.metadata.version("eai-delphi"),
                "tokens": n_tokens,
                "seconds": seconds,
                "tok_per_s": n_tokens / seconds,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "n_nonzero": cache.cache.latent_activations[hookpoint].numel(),
            }
        )
    )


if __name__ == "__main__":
    main()
