"""Generation on the command line: `glm-jax generate` (text streamed, or one JSON object) and the
`glm-jax chat` loop, on a loaded model with a tokenizer."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from glm_jax.options import CHAT_MAX_MODEL_LEN, STEPS_PER_CALL


def sampling(model, *, temperature: float | None, top_p: float | None, top_k: int | None, seed: int,
             max_new_tokens: int) -> dict[str, Any]:
    """A generation's keywords; the sampling values left as None come from generation_config.json,
    as in `model.generate`."""
    return {**model.generation_defaults.sampling(temperature, top_p, top_k),
            "seed": seed, "max_new_tokens": max_new_tokens}


def stream(model, prompt_ids: list[int], sampling: dict[str, Any], engine=None) -> list[int]:
    """Generates for one prompt (on `engine` when given, else the model's own), printing text as it
    becomes complete UTF-8; returns the new ids."""
    out = sys.stdout
    decoder = model.tokenizer.stream_decoder(skip_special_tokens=True)
    on_token = lambda row, token: (out.write(decoder.push(token)), out.flush())
    ids = (engine or model).generate([prompt_ids], on_token=on_token, **sampling)[0]
    out.write(decoder.flush())
    out.flush()
    return ids


def generate(model, prompt: str, sampling: dict[str, Any], *, system: str | None = None, chat: bool = False,
             as_json: bool = False, speculation: dict[str, Any] | None = None) -> None:
    """Generates a continuation of `prompt` (a user turn of the chat format with `chat` or `system`;
    special-token strings in it stay text), streamed to stdout, or printed as one JSON object (with
    the speculative drafts proposed and accepted). speculation: `Model.generate`'s keywords."""
    sampling = {**sampling, **(speculation or {})}
    tok = model.tokenizer
    if chat or system:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        prompt_ids = tok.apply_chat_template(messages, split_special_tokens=True)
    else:
        prompt_ids = tok.encode(prompt, add_special_tokens=True)
    if not as_json:
        stream(model, prompt_ids, sampling)
        print()
        return
    start = time.perf_counter()
    ids = model.generate([prompt_ids], **sampling)[0]
    print(json.dumps({"prompt_tokens": len(prompt_ids), "ids": ids,
                      "text": tok.decode(ids, skip_special_tokens=True),
                      "stopped": bool(ids) and ids[-1] in sampling["stop_ids"],
                      "seconds": time.perf_counter() - start, **sampling, "kv_cache": model.cache_stats(),
                      "speculative": {**model.speculative_stats(), "method": sampling.get("speculative")}}))


def chat(model, sampling: dict[str, Any], *, system: str | None = None, max_model_len: int | None = None,
         steps_per_call: int = STEPS_PER_CALL, truncate_history: bool = False,
         speculation: dict[str, Any] | None = None) -> int:
    """The interactive chat on stdin/stdout: an empty line or end of input quits, /reset forgets the
    conversation. One cache row is kept across turns, so each turn prefills only what follows the
    kept conversation. `max_model_len` (default: the model's context, at most CHAT_MAX_MODEL_LEN)
    bounds the whole conversation: a message that does not fit is refused (the conversation is
    kept), or with `truncate_history` the oldest turns are dropped until it fits; a reply stops
    where the conversation fills it. speculation: `Model.engine`'s speculative keywords."""
    tok = model.tokenizer
    context = model.config.max_seq_len
    if max_model_len is not None and not 1 <= max_model_len <= context:
        raise ValueError(f"--max-model-len must be in 1-{context} (the model's context length), got {max_model_len}")
    limit = max_model_len or min(context, CHAT_MAX_MODEL_LEN)
    engine = model.engine(max_batch=1, steps_per_call=steps_per_call, max_model_len=limit, **(speculation or {}))
    start = [{"role": "system", "content": system}] if system else []
    messages, sampling = list(start), dict(sampling)
    print("glm-jax chat: empty line or Ctrl-D to quit, /reset to start over", file=sys.stderr)
    while True:
        try:
            line = input("user> ")
        except EOFError:
            print()
            return 0
        if not line.strip():
            return 0
        if line.strip() == "/reset":
            messages = list(start)
            continue
        asked = messages + [{"role": "user", "content": line}]
        prompt_ids, dropped = tok.apply_chat_template(asked, split_special_tokens=True), 0
        while truncate_history and len(prompt_ids) >= limit and len(asked) > len(start) + 1:
            del asked[len(start)]                                   # the oldest turn: a user message,
            while asked[len(start)]["role"] != "user":              # and what answered it
                del asked[len(start)]
            prompt_ids, dropped = tok.apply_chat_template(asked, split_special_tokens=True), dropped + 1
        if len(prompt_ids) >= limit:
            kept = "" if truncate_history else " (the conversation is kept; /reset starts over, --truncate-history" \
                                                " drops the oldest turns)"
            what = "this message" if truncate_history or len(asked) == len(start) + 1 else "the conversation"
            print(f"glm-jax chat: not sent: {what} takes {len(prompt_ids)} tokens, --max-model-len is {limit}{kept}",
                  file=sys.stderr)
            continue
        if dropped:
            print(f"glm-jax chat: dropped the {dropped} oldest turn{'s' * (dropped > 1)} to fit --max-model-len {limit}",
                  file=sys.stderr)
        room = limit - len(prompt_ids)
        print("assistant> ", end="", flush=True)
        ids = stream(model, prompt_ids, {**sampling, "max_new_tokens": min(sampling["max_new_tokens"], room)}, engine)
        print()
        if len(ids) == room < sampling["max_new_tokens"] and ids[-1] not in sampling["stop_ids"]:
            print(f"glm-jax chat: the reply stopped at --max-model-len {limit}", file=sys.stderr)
        reply = tok.parse_response(tok.decode(ids, skip_special_tokens=True))
        messages = asked + [{k: v for k, v in reply.items() if k in ("role", "content", "metadata")}]
        sampling["seed"] += 1
