"""The LLM client against real HTTP servers on 127.0.0.1: a fault-injecting OpenAI-compatible
server for the failures a real one will not produce on demand, and llama.cpp (xllamacpp) serving
SmolLM2 for the wiring."""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from autolabel.config import LLMConfig, Price
from autolabel.llm import BudgetExhausted, InvalidOutput, LLMClient, labeler_id, local_server
from autolabel.store import Store

MESSAGES = [{"role": "user", "content": "name this feature in json"}]


class FaultServer:
    """/v1/chat/completions that plays a script of steps, one per request (then "ok"):
    ok, timeout, 429[:Retry-After value], 500, truncated (half a JSON body), wrong_schema (an answer
    that does not parse), and replies that are not an OpenAI completion at all: html and text (status
    200, another content type), null (the JSON body `null`), null_content (a completion whose message
    content is null), no_choices (JSON without `choices`), cut (the connection closes mid-body)."""

    NOT_COMPLETIONS = {
        "html": ("text/html", b"<html><body><h1>502 Bad Gateway</h1></body></html>"),
        "text": ("text/plain", b"upstream connect error or disconnect/reset before headers"),
        "null": ("application/json", b"null"),
        "no_choices": ("application/json", b'{"object": "error", "message": "model is loading"}'),
    }

    def __init__(
        self, script: list[str], answer: str = '{"label": "cats"}', judge: Callable[[str], float] | None = None
    ):
        """`judge(prompt) -> P(yes)` answers the scorers' yes/no questions, with log-probabilities where asked."""
        self.script, self.answer, self.judge = list(script), answer, judge
        self.requests, self.tokens_in, self.tokens_out, self.auth = 0, 0, 0, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests += 1
                server.auth.append(self.headers.get("Authorization"))
                step = server.script.pop(0) if server.script else "ok"
                if step == "timeout":
                    time.sleep(1.0)
                    return self._send(200, b"{}")
                if step.startswith("429"):
                    return self._send(429, b'{"error": {"message": "slow down"}}', {"Retry-After": step[4:] or "1"})
                if step == "500":
                    return self._send(500, b'{"error": {"message": "boom"}}')
                if step in server.NOT_COMPLETIONS:
                    content_type, payload = server.NOT_COMPLETIONS[step]
                    return self._send(200, payload, {"Content-Type": content_type})
                prompt = body["messages"][-1]["content"]
                p_yes = server.judge(prompt) if server.judge and prompt.endswith("Answer yes or no.") else None
                answer = server.answer if p_yes is None else "yes" if p_yes >= 0.5 else "no"
                content = {
                    "ok": answer,
                    "wrong_schema": '{"name": 3}',
                    "truncated": answer,
                    "cut": answer,
                    "null_content": None,
                }[step]
                tokens_in = sum(len(m["content"].split()) for m in body["messages"])
                tokens_out = len((content or "").split())
                reply = json.dumps(
                    {
                        "id": "x",
                        "object": "chat.completion",
                        "created": 0,
                        "model": body["model"],
                        "choices": [
                            {
                                "index": 0,
                                "finish_reason": "stop",
                                "message": {"role": "assistant", "content": content},
                                **(
                                    {"logprobs": graded(content, p_yes)}
                                    if body.get("logprobs") and p_yes is not None
                                    else {}
                                ),
                            }
                        ],
                        "usage": {
                            "prompt_tokens": tokens_in,
                            "completion_tokens": tokens_out,
                            "total_tokens": tokens_in + tokens_out,
                        },
                    }
                ).encode()
                if step == "truncated":
                    return self._send(200, reply[: len(reply) // 2])
                if step == "cut":  # promise the whole body, send half, hang up
                    self.close_connection = True
                    return self._send(200, reply, length=len(reply) // 2)
                if step in ("ok", "wrong_schema"):  # answers the client counts as delivered
                    server.tokens_in += tokens_in
                    server.tokens_out += tokens_out
                self._send(200, reply)

            def _send(self, code: int, body: bytes, headers: dict | None = None, length: int | None = None) -> None:
                headers = {"Content-Type": "application/json", **(headers or {})}
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body[:length])

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.http.server_address[1]}/v1"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.http.shutdown()


def graded(content: str, p_yes: float) -> dict:
    """The `logprobs` of a one-token yes/no answer, as OpenAI and llama.cpp send it."""
    top = [{"token": "yes", "logprob": math.log(p_yes)}, {"token": "no", "logprob": math.log(1 - p_yes)}]
    return {"content": [{"token": content, "logprob": max(t["logprob"] for t in top), "top_logprobs": top}]}


def parse_label(text: str) -> str:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise InvalidOutput(f"not JSON: {err}") from err
    if not isinstance(data, dict) or not isinstance(data.get("label"), str):
        raise InvalidOutput("no string field 'label'")
    return data["label"]


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "s.duckdb") as db:
        yield db


def ask(store, server: FaultServer, **config) -> tuple[object, LLMClient]:
    settings = LLMConfig(
        **{"base_url": server.base_url, "timeout_s": 0.3, "backoff_s": 0.01, "max_retries": 4, **config}
    )

    async def go():
        client = LLMClient(store, settings, server.base_url, "run-1", "label")
        return await client.complete(MESSAGES, parse_label), client

    return asyncio.run(go())


def ledger(store) -> list[tuple]:
    return store.query("SELECT status, cached, tokens_in, tokens_out FROM llm_calls ORDER BY created_at")[1]


def test_retries_timeouts_429_5xx_and_truncated_json_then_succeeds(store):
    server = FaultServer(["timeout", "429:1", "500", "truncated", "ok"])
    started = time.monotonic()
    reply, client = ask(store, server)
    server.close()
    assert (reply.status, reply.value) == ("ok", "cats")
    assert time.monotonic() - started >= 1.0  # Retry-After: 1 was honoured
    assert [row[0] for row in ledger(store)] == ["timeout", "rate_limited", "http_error", "bad_response", "ok"]
    assert server.requests == client.calls == 5


def test_wrong_schema_is_retried_then_recorded_as_invalid_and_the_next_call_works(store):
    server = FaultServer(["wrong_schema", "wrong_schema", "wrong_schema"])
    reply, _ = ask(store, server, invalid_retries=2)
    assert reply.status == "invalid" and reply.value is None and "no string field" in reply.error
    second, _ = ask(store, server, invalid_retries=2, max_tokens=99)  # a different request: the script is spent
    server.close()
    assert second.status == "ok" and server.requests == 4


def test_a_request_that_keeps_failing_is_an_error_not_an_exception(store):
    server = FaultServer(["500"] * 3)
    reply, _ = ask(store, server, max_retries=2)
    server.close()
    assert reply.status == "error" and "HTTP 500" in reply.error and server.requests == 3


def test_second_run_is_served_from_the_cache_with_zero_requests(store):
    server = FaultServer(["wrong_schema", "ok"])
    first, _ = ask(store, server)
    assert first.status == "ok" and server.requests == 2
    again, client = ask(store, server)
    server.close()
    assert (again.status, again.value, again.cached) == ("ok", "cats", True)
    assert server.requests == 2 and client.calls == 0  # the invalid first attempt was replayed too


def test_ledger_totals_equal_the_server_counts_and_cost_follows_the_price_table(store):
    server = FaultServer(["429:0", "ok"])
    ask(store, server, prices={"smollm2-135m-instruct": Price(input_per_mtok=2.0, output_per_mtok=8.0)})
    server.close()
    ((requests, tokens_in, tokens_out, cost),) = store.query(
        "SELECT count(*), sum(tokens_in), sum(tokens_out), sum(cost_usd) FROM llm_calls WHERE NOT cached"
    )[1]
    assert (requests, tokens_in, tokens_out) == (server.requests, server.tokens_in, server.tokens_out)
    assert cost == pytest.approx((server.tokens_in * 2.0 + server.tokens_out * 8.0) / 1e6)


def test_budget_stops_cleanly_before_the_request(store):
    server = FaultServer(["500", "500"])
    with pytest.raises(BudgetExhausted, match="max_calls"):
        ask(store, server, max_calls=2)
    server.close()
    assert server.requests == 2


def test_api_key_reaches_the_header_and_nothing_else(store, monkeypatch, caplog):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-secret-4242")
    server = FaultServer(["500", "ok"])
    reply, _ = ask(store, server)
    server.close()
    assert reply.status == "ok" and server.auth == ["Bearer sk-test-secret-4242"] * 2
    dumped = json.dumps([store.query(f"SELECT * FROM {t}")[1] for t in ("llm_calls", "llm_cache", "runs")], default=str)
    assert "sk-test-secret" not in dumped and "sk-test-secret" not in caplog.text


def test_local_llama_cpp_server_wiring_and_its_token_counts(store):
    """xllamacpp serves the embedded SmolLM2 over HTTP; the ledger matches the server's own metrics."""
    config = LLMConfig(max_tokens=48, concurrency=2)
    with local_server(config) as base_url:

        async def go():
            client = LLMClient(store, config, base_url, "run-1", "label")
            schema = {
                "type": "json_schema",
                "json_schema": {
                    "name": "label",
                    "schema": {"type": "object", "properties": {"label": {"type": "string"}}, "required": ["label"]},
                },
            }
            return await asyncio.gather(
                *(
                    client.complete(
                        [{"role": "user", "content": f"Give a short label for the word {w!r} as JSON."}],
                        parse_label,
                        response_format=schema,
                    )
                    for w in ("cat", "dog", "rain")
                )
            )

        replies = asyncio.run(go())
        metrics = urllib.request.urlopen(base_url.removesuffix("/v1") + "/metrics").read().decode()
    assert all(r.status == "ok" and isinstance(r.value, str) for r in replies)  # the grammar forces the schema
    counters = {
        line.split()[0]: float(line.split()[1]) for line in metrics.splitlines() if line and not line.startswith("#")
    }
    ((tokens_in, tokens_out),) = store.query("SELECT sum(tokens_in), sum(tokens_out) FROM llm_calls WHERE NOT cached")[
        1
    ]
    assert tokens_out == counters["llamacpp:tokens_predicted_total"]
    # llama.cpp counts prompt tokens it evaluated and those it reused from its prompt cache apart.
    assert tokens_in == counters["llamacpp:prompt_tokens_total"] + counters["llamacpp:prompt_tokens_cached_total"]


NOT_A_COMPLETION = ["html", "text", "null", "null_content", "no_choices", "cut"]


@pytest.mark.parametrize("step", NOT_A_COMPLETION)
def test_a_reply_that_is_not_a_completion_is_a_recorded_failure_then_retried(store, step):
    server = FaultServer([step])
    reply, client = ask(store, server)
    server.close()
    assert (reply.status, reply.value) == ("ok", "cats")
    (status, error), ok = store.query("SELECT status, error FROM llm_calls ORDER BY created_at")[1]
    assert status == ("connection_error" if step == "cut" else "bad_response") and error
    assert ok == ("ok", None) and server.requests == client.calls == 2


def test_a_server_that_only_answers_garbage_gives_an_error_reply_and_caches_nothing(store):
    server = FaultServer(NOT_A_COMPLETION[:5])
    reply, _ = ask(store, server, max_retries=4)
    assert reply.status == "error" and reply.value is None and "malformed response" in reply.error
    assert [row[0] for row in ledger(store)] == ["bad_response"] * 5
    assert store.one("SELECT count(*) FROM llm_cache")[0] == 0
    again, client = ask(store, server)  # nothing was cached as an answer: the next run asks again
    server.close()
    assert again.status == "ok" and not again.cached and client.calls == 1


def test_garbage_for_one_request_leaves_the_others_in_flight_untouched(store):
    server = FaultServer(["null", "html", "null_content"])
    settings = LLMConfig(base_url=server.base_url, timeout_s=2, backoff_s=0.01, max_retries=0, concurrency=4)

    async def go():
        client = LLMClient(store, settings, server.base_url, "run-1", "label")
        return await asyncio.gather(
            *(client.complete([{"role": "user", "content": f"feature {i}"}], parse_label) for i in range(6))
        )

    replies = asyncio.run(go())
    server.close()
    assert sorted(r.status for r in replies) == ["error"] * 3 + ["ok"] * 3
    assert sorted(row[0] for row in ledger(store)) == ["bad_response"] * 3 + ["ok"] * 3


@pytest.mark.parametrize("retry_after", ["soon", "Wed, 21 Oct 2015 07:28:00 -0000", "nan", "-5", "inf"])
def test_a_retry_after_that_is_no_delay_falls_back_to_the_backoff(store, retry_after):
    server = FaultServer([f"429:{retry_after}"])
    started = time.monotonic()
    reply, _ = ask(store, server)
    server.close()
    assert reply.status == "ok" and time.monotonic() - started < 1.0
    assert [row[0] for row in ledger(store)] == ["rate_limited", "ok"]


def test_a_failure_nothing_foresaw_is_recorded_with_its_type_and_not_retried(store, monkeypatch):
    from autolabel import llm

    def reads_the_body_and_falls_over(body: bytes):
        raise KeyError("choices")

    monkeypatch.setattr(llm, "_completion", reads_the_body_and_falls_over)
    server = FaultServer([])
    reply, client = ask(store, server)
    server.close()
    assert (reply.status, reply.error) == ("error", "KeyError: 'choices'")
    assert ledger(store) == [("error", False, 0, 0)] and server.requests == client.calls == 1


def test_top_logprobs_of_the_first_token_come_back_and_are_cached_with_the_answer(store):
    """The local llama.cpp server returns the answer token's alternatives; a re-ask is served from the cache,
    alternatives included, and the ledger names the labeler by its GGUF's content."""
    config = LLMConfig(concurrency=1)
    messages = [{"role": "user", "content": "Is a cat an animal? Answer yes or no."}]
    with local_server(config) as base_url:

        async def go():
            client = LLMClient(store, config, base_url, "run-1", "label")
            return [await client.complete(messages, str, max_tokens=1, top_logprobs=5) for _ in range(2)]

        fresh, cached = asyncio.run(go())
    assert fresh.status == "ok" and not fresh.cached and cached.cached
    assert 2 <= len(fresh.top_logprobs) <= 5 and all(v <= 0 for v in fresh.top_logprobs.values())
    assert cached.top_logprobs == fresh.top_logprobs and cached.text == fresh.text
    models = {row[0] for row in store.query("SELECT DISTINCT model FROM llm_calls")[1]}
    assert models == {labeler_id(config)} and labeler_id(config).startswith("smollm2-135m@")


def test_the_labeler_is_named_by_what_answers(tmp_path):
    """An endpoint by its model; a local GGUF by its content, so a copy under another name is the same
    labeler and a changed file is another."""
    from autolabel.label.labelers import resolve_gguf

    gguf = resolve_gguf(None)
    copy = tmp_path / "renamed.gguf"
    copy.write_bytes(gguf.read_bytes())
    assert labeler_id(LLMConfig(base_url="http://127.0.0.1:1/v1", model="gpt-x")) == "gpt-x"
    assert labeler_id(LLMConfig(gguf=str(copy))) == labeler_id(LLMConfig())
    with copy.open("r+b") as handle:
        handle.seek(-1, 2)
        handle.write(b"\x00" if gguf.read_bytes()[-1:] != b"\x00" else b"\x01")
    changed = labeler_id(LLMConfig(gguf=str(copy)))
    assert changed.startswith("renamed@") and changed != labeler_id(LLMConfig())
