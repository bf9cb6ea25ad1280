"""Assistant turns written by the subject model itself, so that assistant-role
statistics describe the model's own speech.

Greedy decoding with a bounded length; every reply is cached in the store by
(model, prompt, parameters), so each is generated once across builds and runs.
"""

from __future__ import annotations

import hashlib

import torch

from autolabel.config import GenerationConfig
from autolabel.corpus.documents import Document, Message
from autolabel.corpus.roles import render_chat
from autolabel.models import SubjectModel
from autolabel.progress import progress_bar
from autolabel.store import Store, now, to_json


def prompt_hash(messages: list[Message], params: dict) -> str:
    payload = to_json({"messages": [[m.role, m.content] for m in messages], "params": params})
    return hashlib.sha256(payload.encode()).hexdigest()


@torch.inference_mode()
def _generate_batch(subject: SubjectModel, prompts: list[str], config: GenerationConfig) -> list[str]:
    tokenizer = subject.tokenizer
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    output = subject.model.generate(
        **encoded, max_new_tokens=config.max_new_tokens, repetition_penalty=config.repetition_penalty,
        do_sample=False, pad_token_id=pad_id,
        temperature=None, top_p=None, top_k=None,
    )  # [batch, prompt_len + new]
    new_tokens = output[:, encoded["input_ids"].shape[1]:]
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def add_assistant_replies(store: Store, subject: SubjectModel, documents: list[Document],
                          config: GenerationConfig, show_progress: bool = True) -> int:
    """Append a generated assistant turn to every chat that ends on a user turn.

    Returns how many replies were generated now (the rest came from the cache).
    """
    params = {"max_new_tokens": config.max_new_tokens, "repetition_penalty": config.repetition_penalty,
              "decoding": "greedy"}
    todo = [d for d in documents if d.needs_reply]
    hashes = {d.doc_id: prompt_hash(d.messages, params) for d in todo}
    cached = dict(store.rows(
        "SELECT prompt_hash, response FROM generations WHERE model_id = ? AND prompt_hash IN (SELECT UNNEST(?))",
        [subject.model_id, list(hashes.values())],
    )) if todo else {}
    missing = [d for d in todo if hashes[d.doc_id] not in cached]
    prompts = {d.doc_id: render_chat(subject.tokenizer, d.messages, d.doc_id, add_generation_prompt=True)
               for d in missing}
    # Similar lengths together, so left padding wastes little compute.
    missing.sort(key=lambda d: len(prompts[d.doc_id]))
    with progress_bar("replies", disable=not show_progress or not missing) as bar:
        task = bar.add_task("generating assistant turns", total=len(missing))
        for i in range(0, len(missing), config.batch_size):
            batch = missing[i:i + config.batch_size]
            replies = _generate_batch(subject, [prompts[d.doc_id] for d in batch], config)
            rows = [{"model_id": subject.model_id, "prompt_hash": hashes[d.doc_id], "params_json": to_json(params),
                     "prompt_json": to_json([[m.role, m.content] for m in d.messages]), "response": reply,
                     "created_at": now()} for d, reply in zip(batch, replies)]
            store.upsert("generations", rows)
            cached.update({hashes[d.doc_id]: reply for d, reply in zip(batch, replies)})
            bar.advance(task, len(batch))
    for document in todo:
        document.messages.append(Message("assistant", cached[hashes[document.doc_id]]))
    return len(missing)
