"""Assistant turns written by the subject model itself, so that assistant-role
statistics describe the model's own speech.

Greedy decoding with a bounded length and a mild repetition penalty over prompt
and reply. Two backends write them: transformers `generate` in left-padded
batches (any model; the default), or llama.cpp serving the model's own GGUF with
parallel slots (as fast on this project's CPU, in a third of the memory;
docs/corpus.md). llama.cpp multiplies 8-bit-rounded activations by the
quantised weights where transformers uses their float32 dequantisation, so a
reply can part ways after a few dozen tokens; each reply is therefore cached in
the store by (model, prompt, parameters) where the parameters name the backend
and the GGUF, and the corpus id names them too, so replies of two backends never
mix. Every reply is generated once across builds and runs.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
from collections.abc import Callable
from pathlib import Path

import torch

from autolabel.config import GenerationConfig
from autolabel.corpus.documents import Document, Message
from autolabel.corpus.roles import render_chat
from autolabel.errors import AutolabelError
from autolabel.hashing import hash_path
from autolabel.models import SubjectModel
from autolabel.progress import progress_bar
from autolabel.store import Store, now, to_json

Done = Callable[[list[int], list[str]], None]  # (indices into the prompts, their replies), as they are written
PADDED_TOKENS_PER_ROW = 256  # a transformers batch's prompt tokens with padding, per row of batch_size


def prompt_hash(messages: list[Message], params: dict) -> str:
    payload = to_json({"messages": [[m.role, m.content] for m in messages], "params": params})
    return hashlib.sha256(payload.encode()).hexdigest()


@functools.lru_cache(maxsize=8)
def _gguf_digest(path: Path, size: int, mtime_ns: int) -> str:
    return hash_path(path)[:12]


def gguf_digest(path: Path) -> str:
    """Content hash of a GGUF (hashed once per process and file version: ~100 MB takes a second)."""
    stat = path.stat()
    return _gguf_digest(path.resolve(), stat.st_size, stat.st_mtime_ns)


def backend_for(subject: SubjectModel, config: GenerationConfig) -> str:
    if config.backend == "auto":
        return "llama.cpp" if subject.gguf is not None else "transformers"
    if config.backend == "llama.cpp" and subject.gguf is None:
        raise AutolabelError(
            f"corpus.generation.backend is llama.cpp, but {subject.model_id} was not loaded from a "
            f"GGUF file, which is what llama.cpp serves; set corpus.generation.backend: transformers "
            f"(or auto), or load the model from a .gguf file"
        )
    return config.backend


def reply_params(subject: SubjectModel, config: GenerationConfig) -> dict:
    """What a reply depends on besides its prompt. transformers' replies keep the keys they always had, so
    stores built before llama.cpp wrote replies still hit their cache."""
    params = {
        "max_new_tokens": config.max_new_tokens,
        "repetition_penalty": config.repetition_penalty,
        "decoding": "greedy",
    }
    if backend_for(subject, config) == "llama.cpp":
        params |= {"backend": "llama.cpp", "gguf": gguf_digest(subject.gguf)}
    return params


@torch.inference_mode()
def _generate_batch(subject: SubjectModel, prompts: list[str], config: GenerationConfig) -> list[str]:
    tokenizer = subject.tokenizer
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    output = subject.model.generate(
        **encoded,
        max_new_tokens=config.max_new_tokens,
        repetition_penalty=config.repetition_penalty,
        do_sample=False,
        pad_token_id=subject.pad_id,
        temperature=None,
        top_p=None,
        top_k=None,
    )  # [batch, prompt_len + new]
    new_tokens = output[:, encoded["input_ids"].shape[1] :]
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def transformers_replies(
    subject: SubjectModel, prompts: list[str], config: GenerationConfig, done: Done, padded_tokens: int | None = None
) -> None:
    """Left-padded batches of similar lengths, each at most config.batch_size prompts and `padded_tokens`
    prompt tokens with padding (default: 256 a row). Without that bound, the default corpus's three long
    injection documents (774 to 1158 tokens) padded a whole batch of 32 to 1158 tokens: half of all the
    prompt tokens computed, and 4.5 GB of RSS."""
    budget = padded_tokens or config.batch_size * PADDED_TOKENS_PER_ROW
    lengths = [len(ids) for ids in subject.tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    batch: list[int] = []
    for i in sorted(range(len(prompts)), key=lambda i: lengths[i]):
        if batch and (len(batch) == config.batch_size or (len(batch) + 1) * lengths[i] > budget):
            done(batch, _generate_batch(subject, [prompts[j] for j in batch], config))
            batch = []
        batch.append(i)
    if batch:
        done(batch, _generate_batch(subject, [prompts[j] for j in batch], config))


def llama_cpp_replies(
    gguf: Path, prompt_ids: list[list[int]], config: GenerationConfig, done: Done, n_threads: int | None = None
) -> None:
    """Greedy replies from llama.cpp's server with one slot per concurrent request (continuous batching).

    Prompts go as token ids, so llama.cpp reads exactly what transformers would. The slots share one KV
    cache sized for the longest prompts that could run at once, so no request can find it full.
    n_threads: llama.cpp's threads (default: as many as torch uses).
    """
    import openai

    from autolabel.llm import serve_gguf

    slots = max(1, min(config.batch_size, len(prompt_ids)))
    longest = sorted((len(ids) + config.max_new_tokens for ids in prompt_ids), reverse=True)[:slots]
    n_ctx = -(-sum(longest) // 256) * 256
    threads = n_threads or torch.get_num_threads()

    async def ask(client: openai.AsyncOpenAI, gate: asyncio.Semaphore, i: int) -> tuple[int, str]:
        async with gate:
            try:
                answer = await client.completions.create(
                    model="subject",
                    prompt=prompt_ids[i],
                    max_tokens=config.max_new_tokens,
                    temperature=0.0,
                    extra_body={
                        "repeat_penalty": config.repetition_penalty,
                        # the penalty sees prompt and reply, as transformers' does
                        "repeat_last_n": len(prompt_ids[i]) + config.max_new_tokens,
                    },
                )
            except openai.OpenAIError as err:
                raise AutolabelError(
                    f"llama.cpp did not write a reply ({type(err).__name__}: {err}); set "
                    f"corpus.generation.backend: transformers to write them with transformers"
                ) from err
            return i, answer.choices[0].text.strip()

    async def write_all(base_url: str) -> None:
        gate = asyncio.Semaphore(slots)
        async with openai.AsyncOpenAI(base_url=base_url, api_key="no-key", max_retries=0, timeout=600.0) as client:
            pending = [ask(client, gate, i) for i in range(len(prompt_ids))]
            indices, replies = [], []
            for finished in asyncio.as_completed(pending):
                i, reply = await finished
                indices.append(i)
                replies.append(reply)
                if len(indices) >= slots:
                    done(indices, replies)
                    indices, replies = [], []
            if indices:
                done(indices, replies)

    with serve_gguf(gguf, slots, n_ctx, threads, kv_unified=True) as base_url:
        asyncio.run(write_all(base_url))


def write_replies(subject: SubjectModel, prompts: list[str], config: GenerationConfig, done: Done) -> None:
    """Replies to rendered chat prompts (each ending on the assistant's opening marker), by config.backend."""
    if backend_for(subject, config) == "llama.cpp":
        ids = [subject.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        llama_cpp_replies(subject.gguf, ids, config, done)
    else:
        transformers_replies(subject, prompts, config, done)


def add_assistant_replies(
    store: Store, subject: SubjectModel, documents: list[Document], config: GenerationConfig, show_progress: bool = True
) -> int:
    """Append a generated assistant turn to every chat that ends on a user turn.

    Returns how many replies were generated now (the rest came from the cache).
    """
    params = reply_params(subject, config)
    todo = [d for d in documents if d.needs_reply]
    hashes = {d.doc_id: prompt_hash(d.messages, params) for d in todo}
    cached = (
        dict(
            store.rows(
                "SELECT prompt_hash, response FROM generations WHERE model_id = ? "
                "AND prompt_hash IN (SELECT UNNEST(?))",
                [subject.model_id, list(hashes.values())],
            )
        )
        if todo
        else {}
    )
    missing = [d for d in todo if hashes[d.doc_id] not in cached]
    prompts = [render_chat(subject.tokenizer, d.messages, d.doc_id, add_generation_prompt=True) for d in missing]
    with progress_bar("replies", disable=not show_progress or not missing) as bar:
        task = bar.add_task(f"generating assistant turns ({backend_for(subject, config)})", total=len(missing))

        def keep(indices: list[int], replies: list[str]) -> None:
            batch = [missing[i] for i in indices]
            store.upsert(
                "generations",
                [
                    {
                        "model_id": subject.model_id,
                        "prompt_hash": hashes[d.doc_id],
                        "params_json": to_json(params),
                        "prompt_json": to_json([[m.role, m.content] for m in d.messages]),
                        "response": reply,
                        "created_at": now(),
                    }
                    for d, reply in zip(batch, replies, strict=False)
                ],
            )
            cached.update({hashes[d.doc_id]: reply for d, reply in zip(batch, replies, strict=False)})
            bar.advance(task, len(batch))

        if missing:
            write_replies(subject, prompts, config, keep)
    for document in todo:
        document.messages.append(Message("assistant", cached[hashes[document.doc_id]]))
    return len(missing)
