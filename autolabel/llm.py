"""Every LLM call goes through here: the `openai` client over HTTP to any
OpenAI-compatible endpoint (OpenAI, vLLM, llama.cpp, Ollama), or to a llama.cpp
server that autolabel starts itself on 127.0.0.1 when no base_url is configured.

What a long unattended run needs from its calls:
- bounded concurrency, and retries with exponential backoff and full jitter on
  timeouts, lost connections, 429 (honouring Retry-After) and 5xx;
- a response cache in the store keyed by a hash of (model, messages, parameters,
  attempt), so a re-run replays every answer, valid or not, with zero requests;
- a ledger row in `llm_calls` per HTTP request (and per cache hit, marked cached):
  tokens in and out, latency, status, cost from the configured price table;
- budgets (`max_calls`, `max_cost_usd`) that stop the caller cleanly;
- output that does not parse is retried as a new attempt and finally reported
  as invalid, never returned as a value;
- a server that answers with something other than a chat completion (an HTML
  page with status 200, `null`, another API's JSON, a body cut short) or fails
  in a way nothing here foresaw costs that request, recorded in the ledger,
  never the run: the openai client fetches the body and this module checks its
  shape, and no exception of one request reaches the others.
The API key is read from the environment when the client is made and goes only
into the Authorization header: never into the store, logs or errors.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import json
import math
import os
import random
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timezone
from pathlib import Path
from typing import Any, Generic, TypeVar

import openai

from autolabel.config import LLMConfig
from autolabel.errors import AutolabelError
from autolabel.store import Store, now, to_json

T = TypeVar("T")


class BudgetExhausted(AutolabelError):
    """The run reached llm.max_calls or llm.max_cost_usd; what was done so far is kept."""


class InvalidOutput(ValueError):
    """Raised by a parse function when the model's text is not the expected answer."""


class MalformedResponse(ValueError):
    """A 2xx reply that is not an OpenAI chat completion."""


@dataclass
class Reply(Generic[T]):
    value: T | None  # the parsed answer; None unless status is "ok"
    status: str  # ok, invalid (never parsed), error (the request kept failing)
    text: str = ""
    error: str | None = None
    cached: bool = False
    # The first answer token's alternatives, token -> log-probability, where asked for and the server
    # returned them (llama.cpp and OpenAI do; some servers ignore the request).
    top_logprobs: dict[str, float] | None = None


@dataclass
class _Response:
    text: str
    tokens_in: int
    tokens_out: int
    top_logprobs: dict[str, float] | None = None


def _completion(body: bytes) -> _Response:
    """The answer and token counts of a chat completion's JSON body, checked field by field here:
    the openai client would hand a non-JSON body back as a str, `null` as None and another shape as
    a half-built object, each of which failed later with an AttributeError."""
    try:
        data = json.loads(body)
    except ValueError:
        raise MalformedResponse(f"the body is not JSON: {body[:60].decode(errors='replace')!r}") from None
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise MalformedResponse(f"no choices in {type(data).__name__} {str(data)[:60]!r}")
    message = choices[0].get("message")
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, str):
        raise MalformedResponse("the first choice has no message content")
    usage = data["usage"] if isinstance(data.get("usage"), dict) else {}
    return _Response(
        content,
        _token_count(usage.get("prompt_tokens")),
        _token_count(usage.get("completion_tokens")),
        _first_top_logprobs(choices[0].get("logprobs")),
    )


def _first_top_logprobs(logprobs: object) -> dict[str, float] | None:
    """token -> log-probability of the first generated token's alternatives; None where the reply has none.
    A token listed twice (servers differ in how they decode bytes) keeps its larger value."""
    content = logprobs.get("content") if isinstance(logprobs, dict) else None
    first = content[0] if isinstance(content, list) and content and isinstance(content[0], dict) else {}
    alternatives = first.get("top_logprobs")
    if not isinstance(alternatives, list):
        return None
    top: dict[str, float] = {}
    for entry in alternatives:
        token, value = (entry.get("token"), entry.get("logprob")) if isinstance(entry, dict) else (None, None)
        if isinstance(token, str) and isinstance(value, (int, float)) and math.isfinite(value):
            top[token] = max(float(value), top.get(token, -math.inf))
    return top or None


def _token_count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _retry_after(headers: Any) -> float | None:
    """Seconds a 429 asks to wait, from retry-after-ms or Retry-After (seconds or an HTTP date);
    None (the backoff decides) for a value that is neither, such as `soon` or NaN."""
    for name, seconds_per_unit in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) * seconds_per_unit
        except ValueError:
            seconds = _seconds_until(value) if name == "retry-after" else None
        if seconds is not None and math.isfinite(seconds):
            return max(seconds, 0.0)
    return None


def _seconds_until(http_date: str) -> float | None:
    """A date with the zone `-0000` (or none) is read as UTC, as RFC 5322 has it."""
    try:
        when = email.utils.parsedate_to_datetime(http_date)
    except (ValueError, TypeError, OverflowError):
        return None
    when = when if when.tzinfo else when.replace(tzinfo=timezone.utc)
    return (when - now()).total_seconds()


def labeler_id(config: LLMConfig) -> str:
    """Who answers: the endpoint's model, or NAME@SHA12 of the local server's GGUF. Labels, scores, the
    response cache and label shards are keyed by it, so two labelers never share or overwrite answers."""
    if config.base_url:
        return config.model
    from autolabel.label.labelers import gguf_identity, resolve_gguf

    return gguf_identity(resolve_gguf(config.gguf))


class LLMClient:
    """Chat completions with cache, ledger, retries and budgets, for one (run, stage)."""

    def __init__(self, store: Store, config: LLMConfig, base_url: str, run_id: str, stage: str):
        self.store, self.config, self.run_id, self.stage = store, config, run_id, stage
        self.model_id = labeler_id(config)
        self.openai = openai.AsyncOpenAI(
            base_url=base_url, api_key=_api_key(config), max_retries=0, timeout=config.timeout_s
        )
        self.semaphore = asyncio.Semaphore(config.concurrency)
        self.calls, self.cost_usd = 0, 0.0  # HTTP requests and spend of this client

    async def complete(
        self,
        messages: list[dict[str, str]],
        parse: Callable[[str], T],
        response_format: dict[str, Any] | None = None,
        max_tokens: int | None = None,
        refresh: bool = False,
        top_logprobs: int = 0,
    ) -> Reply[T]:
        """Ask, parse, and ask again (as a new attempt) while the answer does not parse.
        `refresh` asks the server even where the cache holds an answer, and caches the new one.
        `top_logprobs` > 0 asks for that many alternatives of the first answer token (Reply.top_logprobs)."""
        reply: Reply[T] = Reply(None, "error")
        for attempt in range(self.config.invalid_retries + 1):
            params = {
                "temperature": self.config.temperature if attempt == 0 else max(self.config.temperature, 0.7),
                "max_tokens": max_tokens or self.config.max_tokens,
                "response_format": response_format,
                "attempt": attempt,
                **({"top_logprobs": top_logprobs} if top_logprobs else {}),
            }
            key = hashlib.sha256(to_json({"model": self.model_id, "messages": messages, **params}).encode()).hexdigest()
            response, cached = None if refresh else self._cached(key), True
            if response is None:
                cached = False
                response, error = await self._request(messages, params, key)
                if response is None:
                    return Reply(None, "error", error=error)
            try:
                return Reply(
                    parse(response.text), "ok", response.text, cached=cached, top_logprobs=response.top_logprobs
                )
            except InvalidOutput as err:
                reply = Reply(
                    None, "invalid", response.text, f"attempt {attempt + 1}: {err}", cached, response.top_logprobs
                )
        return reply

    def _cached(self, key: str) -> _Response | None:
        row = self.store.one("SELECT response_json FROM llm_cache WHERE cache_key = ?", [key])
        if row is None:
            return None
        response = _Response(**json.loads(row[0]))
        self._ledger(key, response, 0.0, "ok", None, cached=True)
        return response

    async def _request(
        self, messages: list[dict[str, str]], params: dict[str, Any], key: str
    ) -> tuple[_Response | None, str | None]:
        """One logical request: HTTP attempts with backoff; (response, None) or (None, last error).
        Only a chat completion is cached: a failure is recorded in the ledger and asked again next run."""
        error = None
        for retry in range(self.config.max_retries + 1):
            self._check_budget()
            self.calls += 1
            started = time.monotonic()
            wait = None
            try:
                async with self.semaphore:
                    raw = await self.openai.chat.completions.with_raw_response.create(
                        model=self.config.model,
                        messages=messages,
                        temperature=params["temperature"],
                        max_tokens=params["max_tokens"],
                        **({"response_format": params["response_format"]} if params["response_format"] else {}),
                        **(
                            {"logprobs": True, "top_logprobs": params["top_logprobs"]}
                            if "top_logprobs" in params
                            else {}
                        ),
                    )
                response = _completion(raw.content)
            except openai.RateLimitError as err:
                status, error, wait = "rate_limited", "429 rate limited", _retry_after(err.response.headers)
            except openai.APITimeoutError:
                status, error = "timeout", f"no answer within {self.config.timeout_s} s"
            except openai.APIConnectionError as err:
                status, error = "connection_error", f"connection failed: {type(err.__cause__ or err).__name__}"
            except openai.APIStatusError as err:
                status, error = "http_error", f"HTTP {err.status_code}"
                if err.status_code < 500:  # a request the server will never accept: no retry
                    self._ledger(key, None, time.monotonic() - started, status, error)
                    return None, error
            except MalformedResponse as err:
                status, error = "bad_response", f"malformed response: {err}"
            except Exception as err:  # nothing above foresaw it, so asking again may not help either
                error = f"{type(err).__name__}: {err}"
                self._ledger(key, None, time.monotonic() - started, "error", error)
                return None, error
            else:
                self._ledger(key, response, time.monotonic() - started, "ok", None)
                self.store.upsert(
                    "llm_cache",
                    [
                        {
                            "cache_key": key,
                            "model": self.model_id,
                            "request_json": to_json({"messages": messages, **params}),
                            "response_json": to_json(response.__dict__),
                            "created_at": now(),
                        }
                    ],
                )
                return response, None
            self._ledger(key, None, time.monotonic() - started, status, error)
            if retry < self.config.max_retries:
                backoff = random.uniform(0, min(self.config.backoff_max_s, self.config.backoff_s * 2**retry))
                await asyncio.sleep(min(wait, self.config.backoff_max_s) if wait is not None else backoff)
        return None, f"{error} (after {self.config.max_retries + 1} attempts)"

    def _check_budget(self) -> None:
        if self.config.max_calls is not None and self.calls >= self.config.max_calls:
            raise BudgetExhausted(f"llm.max_calls ({self.config.max_calls}) reached; raise it to go on")
        if self.config.max_cost_usd is not None and self.cost_usd >= self.config.max_cost_usd:
            raise BudgetExhausted(
                f"llm.max_cost_usd (${self.config.max_cost_usd}) reached "
                f"(${self.cost_usd:.4f} spent); raise it to go on"
            )

    def _ledger(
        self, key: str, response: _Response | None, latency: float, status: str, error: str | None, cached: bool = False
    ) -> None:
        price = self.config.prices.get(self.config.model)
        cost = 0.0
        if response is not None and price is not None and not cached:
            cost = (response.tokens_in * price.input_per_mtok + response.tokens_out * price.output_per_mtok) / 1e6
        self.cost_usd += cost
        self.store.upsert(
            "llm_calls",
            [
                {
                    "call_id": uuid.uuid4().hex,
                    "run_id": self.run_id,
                    "stage": self.stage,
                    "model": self.model_id,
                    "prompt_hash": key,
                    "tokens_in": response.tokens_in if response else 0,
                    "tokens_out": response.tokens_out if response else 0,
                    "cost_usd": cost,
                    "latency_s": latency,
                    "status": status,
                    "error": error,
                    "cached": cached,
                    "created_at": now(),
                }
            ],
        )


def _api_key(config: LLMConfig) -> str:
    # Local servers ignore the key; the openai client insists on one.
    return os.environ.get(config.api_key_env) or "no-key"


@contextmanager
def local_server(config: LLMConfig) -> Iterator[str]:
    """Serve the labeler GGUF with llama.cpp's own OpenAI-compatible server, in-process; yields its base_url."""
    from autolabel.label.labelers import resolve_gguf

    with serve_gguf(resolve_gguf(config.gguf), config.concurrency, config.server_ctx, config.threads) as base_url:
        yield base_url


@contextmanager
def serve_gguf(
    gguf: Path, n_parallel: int, n_ctx: int, n_threads: int | None = None, kv_unified: bool = False
) -> Iterator[str]:
    """llama.cpp's server for one GGUF on 127.0.0.1, in-process, with n_parallel slots sharing n_ctx tokens
    (each slot gets n_ctx / n_parallel, or all of it with kv_unified); yields its base_url. The one place
    that starts llama.cpp: the labeler and the corpus's reply writer both go through it."""
    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = str(gguf)
    params.hostnames = ["127.0.0.1"]
    params.port = 0  # a free port
    params.n_parallel = n_parallel
    params.n_ctx = n_ctx
    params.kv_unified = kv_unified
    if n_threads is not None:  # llama.cpp's default is every core, which stalls on a busy machine
        params.cpuparams.n_threads = params.cpuparams_batch.n_threads = n_threads
    params.endpoint_metrics = True
    params.verbosity = -1
    try:
        server = xllamacpp.Server(params)
    except Exception as err:
        raise AutolabelError(f"llama.cpp could not serve {gguf}: {err}; is it a valid GGUF model?") from err
    try:
        yield f"{server.listening_address}/v1"
    finally:
        del server


@contextmanager
def open_client(store: Store, config: LLMConfig, run_id: str, stage: str) -> Iterator[LLMClient]:
    """A client for the configured endpoint, starting (and stopping) the local server when there is none."""
    if config.base_url:
        yield LLMClient(store, config, config.base_url, run_id, stage)
        return
    with local_server(config) as base_url:
        yield LLMClient(store, config, base_url, run_id, stage)
