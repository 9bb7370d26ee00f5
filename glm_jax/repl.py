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
             as_json: bool = False) -> None:
    """Generates a continuation of `prompt` (a user turn of the chat format with `chat` or `system`;
    special-token strings in it stay text), streamed to stdout, or printed as one JSON object."""
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
                      "seconds": time.perf_counter() - start, **sampling}))


def chat(model, sampling: dict[str, Any], *, system: str | None = None, max_model_len: int | None = None,
         steps_per_call: int = STEPS_PER_CALL) -> int:
    """The interactive chat on stdin/stdout: an empty line or end of input quits, /reset forgets the
    conversation. One cache row is kept across turns, so each turn prefills only what follows the
    kept conversation. `max_model_len` (default: the model's context, at most CHAT_MAX_MODEL_LEN)
    bounds the whole conversation."""
    tok = model.tokenizer
    engine = model.engine(max_batch=1, steps_per_call=steps_per_call,
                          max_model_len=max_model_len or min(model.config.max_seq_len, CHAT_MAX_MODEL_LEN))
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
        messages.append({"role": "user", "content": line})
        print("assistant> ", end="", flush=True)
        ids = stream(model, tok.apply_chat_template(messages, split_special_tokens=True), sampling, engine)
        print()
        reply = tok.parse_response(tok.decode(ids, skip_special_tokens=True))
        messages.append({k: v for k, v in reply.items() if k in ("role", "content", "metadata")})
        sampling["seed"] += 1
