"""Measure EleutherAI delphi's labeling cost per feature (eai-delphi's explainer and scorers).

benchmarks/label.py uses this script to put delphi's seconds per feature next to
autolabel's, both served by the same OpenAI-compatible endpoint. It runs in its own
venv (e.g. /work/venvs/delphi) because eai-delphi pulls in vllm, so it must not
import autolabel.

For each feature of the --examples JSON (exported by benchmarks/label.py) it builds a
delphi LatentRecord from the given train / test / negative examples, runs
DefaultExplainer on the train examples, then DetectionScorer and FuzzingScorer on the
test examples plus negatives with that explanation, all through delphi's OpenRouter
client pointed at --base-url. Like delphi's own pipeline, the two scorers run
concurrently, each sending its prompts one at a time. A feature's time covers the
explainer and both scorers; a failing feature is recorded and its time still counts.
A score is delphi's class-balanced accuracy over the answers that parsed (null when
none did). Prints one line of JSON to stdout; delphi logs to stderr.
"""

import argparse
import asyncio
import importlib.metadata
import json
import logging
import sys
import time

import torch
from delphi.clients import OpenRouter
from delphi.explainers import DefaultExplainer
from delphi.latents import ActivatingExample, Latent, LatentRecord, NonActivatingExample
from delphi.latents.samplers import normalize_activations
from delphi.scorers import DetectionScorer, FuzzingScorer

UNPARSED = "Explanation could not be parsed."  # what DefaultExplainer returns when the answer has no [EXPLANATION]:


class CountingClient(OpenRouter):
    """delphi's OpenAI-compatible client, counting generate calls (one HTTP request each: max_retries=1)."""

    requests = 0

    async def generate(self, prompt, **kwargs):
        self.requests += 1
        return await super().generate(prompt, **kwargs)


def build_record(feat: dict) -> LatentRecord:
    def tensors(ex):
        return torch.tensor(ex["tokens"]), torch.tensor(ex["acts"], dtype=torch.float32)

    def activating(ex):
        tokens, acts = tensors(ex)
        return ActivatingExample(tokens=tokens, activations=acts, str_tokens=ex["str_tokens"])

    train = [activating(ex) for ex in feat["train"]]
    test = [activating(ex) for ex in feat["test"]]
    examples = sorted(train + test, key=lambda e: -e.max_activation)
    # delphi's sampler scales both splits to 0..10 by the record's top activation.
    normalize_activations(examples, examples[0].max_activation)
    negatives = [
        NonActivatingExample(*tensors(ex), str_tokens=ex["str_tokens"], distance=-1.0) for ex in feat["negatives"]
    ]
    return LatentRecord(
        latent=Latent(f"layers.{feat['layer']}", feat["feature"]),
        examples=examples,
        train=train,
        test=test,
        not_active=negatives,
    )


def balanced_accuracy(outputs) -> float | None:
    """delphi's log metric (compute_classification_metrics' accuracy), over parsed answers only."""
    parsed = [o for o in outputs if o.prediction is not None]
    if not parsed:
        return None
    rates = []
    for cls in (True, False):
        group = [o for o in parsed if o.activating is cls]
        rates.append(sum(o.prediction is cls for o in group) / len(group) if group else 0.0)
    return sum(rates) / 2


async def label_feature(feat: dict, explainer, detection, fuzzing) -> dict:
    out = {
        "layer": feat["layer"],
        "feature": feat["feature"],
        "explanation": None,
        "error": None,
        "detection": None,
        "fuzzing": None,
    }
    errors = []
    try:
        record = build_record(feat)
        explained = await explainer(record)
        if explained.explanation == UNPARSED:
            errors.append("explanation could not be parsed")
        else:
            out["explanation"] = explained.explanation
        record.explanation = explained.explanation  # delphi scores whatever came back, parsed or not
        results = await asyncio.gather(detection(record), fuzzing(record))
        for name, result in zip(("detection", "fuzzing"), results, strict=True):
            out[name] = balanced_accuracy(result.score)
            unparsed = sum(o.prediction is None for o in result.score)
            if unparsed:  # delphi logs a failed or unparsable request and leaves its answers None
                errors.append(f"{name}: {unparsed} of {len(result.score)} answers missing")
    except Exception as err:  # noqa: BLE001 - a small labeler often breaks delphi's formats; record and go on
        errors.append(f"{type(err).__name__}: {err}")
    out["error"] = "; ".join(errors) or None
    return out


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", required=True, help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8080/v1")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--examples", required=True, help="JSON list of features exported by benchmarks/label.py")
    parser.add_argument("--features", type=int, default=None, help="label only the first N features")
    parser.add_argument(
        "--per-prompt",
        type=int,
        default=5,
        help="examples per scorer prompt (delphi's num_examples_per_scorer_prompt, default 5)",
    )
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=3000,
        help="completion cap per request (default 3000, delphi's OpenRouter default)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)  # stderr

    features = json.load(open(args.examples))[: args.features]
    client = CountingClient(
        args.model, api_key="none", base_url=args.base_url.rstrip("/") + "/chat/completions", max_tokens=args.max_tokens
    )
    explainer = DefaultExplainer(client, threshold=0.3)  # as delphi's CLI builds it
    detection = DetectionScorer(client, n_examples_shown=args.per_prompt)
    fuzzing = FuzzingScorer(client, n_examples_shown=args.per_prompt)

    per_feature = []
    for feat in features:
        before, start = client.requests, time.perf_counter()
        row = await label_feature(feat, explainer, detection, fuzzing)
        row["seconds"] = round(time.perf_counter() - start, 3)
        row["requests"] = client.requests - before
        per_feature.append(row)
        print(
            f"layer {row['layer']} feature {row['feature']}: {row['seconds']} s, {row['requests']} requests,"
            f" error={row['error']}",
            file=sys.stderr,
            flush=True,
        )
    await client.client.aclose()

    n = len(per_feature)
    print(
        json.dumps(
            {
                "tool": "delphi",
                "version": importlib.metadata.version("eai-delphi"),
                "features": n,
                "seconds_per_feature": sum(r["seconds"] for r in per_feature) / n if n else None,
                "requests_per_feature": client.requests / n if n else None,
                "failures": sum(r["error"] is not None for r in per_feature),
                "per_feature": per_feature,
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
