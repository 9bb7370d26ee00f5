#!/usr/bin/env python3
"""`glm-jax serve` under load, against the same requests one by one and against `transformers serve`.

  python scripts/bench_serve.py [--requests 32 --new 32 --concurrency 1,4,16 --history 1024,8192,32768]
                                [--skip-transformers] [--out FILE]

Model: a random GLM-4 in Hugging Face's layout (GlmForCausalLM), 2 layers, hidden 512, 8 query / 2
KV heads of dim 128, ffn 1408, the real 151,552-token vocabulary and tokenizer, float32. Both
servers load the same folder (glm-jax converts it in memory; transformers reads it as is, with a
tokenizer.json built from the same tiktoken ranks and checked to encode alike).

Sections (each server is a subprocess started the way a user starts it; requests are streamed
completions over plain HTTP (see `one`), temperature 0, max_tokens --new, on random English-word prompts of
48-400 tokens, the same for every server and concurrency):
- throughput: the --requests requests, `c` at a time for each c in --concurrency; output tokens
  per second over the whole run and time to first token (p50/p99). c=1 is "one by one"; the
  ratio at the highest c against c=1 is the continuous-batching gain (target >= 8x at 16).
- bound (glm-jax only, in this process, no server running): the engine's decode step at one row
  and at the highest c, and every prompt's prefill: the most continuous batching can gain here
  (see `bound`).
- kv_reuse (glm-jax only): a conversation of H tokens (H in --history) is answered once, then a
  follow-up turn (the history, the answer, 32 new tokens) is sent; the follow-up's time to first
  token against the first turn's. With KV reuse the follow-up prefills only its new tokens, so
  its time should stay flat as H grows.
- transformers: `transformers serve` (its continuous batching on) on the same folder and load,
  where it runs here (it needs `pip install accelerate` beside the test extra; without it the
  section records the server's error).
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import concurrent.futures  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import shlex  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402

import numpy as np  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
WORDS = ("time year people way day man thing woman life child world school state family student group country "
         "problem hand part place case week company system program question work government number night point "
         "home water room mother area money story fact month lot right study book eye job word business issue "
         "side kind head house service friend father power hour game line end member law car city community name "
         "president team minute idea kid body information back parent face others level office door health person "
         "art war history party result change morning reason research girl guy moment air teacher force education").split()


def make_model(folder: pathlib.Path) -> pathlib.Path:
    """The random HF-layout checkpoint with the GLM-4 tokenizer (ours and a transformers one)."""
    from glm_jax.convert.layout import GLM
    from glm_jax.testing import random_config, write_random_checkpoint

    config = random_config(hidden_size=512, intermediate_size=1408, num_layers=2, num_heads=8, num_kv_heads=2,
                           head_dim=128)
    model = write_random_checkpoint(folder / "model", config, layout=GLM, reference=DATA)
    hf_tokenizer(model)
    return model


def hf_tokenizer(folder: pathlib.Path) -> None:
    """tokenizer.json + tokenizer_config.json for transformers, from the tiktoken ranks; checked to
    encode a few strings exactly as glm-jax's tokenizer does."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from glm_jax.tokenizer import SPLIT_PATTERN, Tokenizer

    ours = Tokenizer.from_file(folder)
    fast = TikTokenConverter(vocab_file=str(folder / "tokenizer.model"), pattern=SPLIT_PATTERN,
                             extra_special_tokens=list(ours.special_tokens)).converted()
    hf = PreTrainedTokenizerFast(tokenizer_object=fast, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    hf.chat_template = json.loads((DATA / "models" / "glm-4-9b-chat-1m" / "tokenizer_config.json").read_text())[
        "chat_template"]
    hf.save_pretrained(folder)
    again = AutoTokenizer.from_pretrained(folder)
    for text in ("Hello world, 你好！ 123456", "<|user|>\nhi there", " ".join(WORDS[:50])):
        assert again.encode(text, add_special_tokens=False) == ours.encode(text), text


def prompts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(48, 400)))) for _ in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server subprocess; `url` once it answers /v1/models."""

    def __init__(self, cmd: list[str], port: int, log: pathlib.Path, env: dict | None = None):
        self.cmd, self.url = cmd, f"http://127.0.0.1:{port}"
        self.log = open(log, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}); see {log}")
            try:
                with urllib.request.urlopen(self.url + "/v1/models", timeout=5) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                pass
            time.sleep(1)
        raise RuntimeError(f"server did not start in 600 s; see {log}")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def one(url: str, model: str, prompt, new: int) -> dict:
    """One streamed completion over plain HTTP: time to first token, output tokens, seconds.
    (Not the `openai` client: it spends 0.12 s preparing a request of 8,192 token ids and 0.5-0.66 s
    for 32,768, before sending anything, which the follow-up turns would count as server time.)"""
    body = {"model": model, "prompt": prompt, "max_tokens": new, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    request = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    first, text, tokens, cached = None, "", None, None
    with urllib.request.urlopen(request, timeout=3600) as reply:
        for line in reply:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[len(b"data: "):])
            piece = chunk["choices"][0].get("text") or "" if chunk.get("choices") else ""
            if piece and first is None:
                first = time.perf_counter() - start
            text += piece
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
                cached = (chunk["usage"].get("prompt_tokens_details") or {}).get("cached_tokens")
    return {"ttft": first, "tokens": tokens, "seconds": time.perf_counter() - start, "text": text, "cached": cached}


def load(url: str, model: str, texts: list[str], new: int, concurrency: int) -> dict:
    one(url, model, texts[0], 2)                                          # warm-up: compiles
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda t: one(url, model, t, new), texts))
    wall = time.perf_counter() - start
    ttft = [r["ttft"] for r in results if r["ttft"] is not None]
    tokens = sum(r["tokens"] or 0 for r in results)
    return {"concurrency": concurrency, "requests": len(texts), "output_tokens": tokens, "wall_s": wall,
            "output_tokens_per_s": tokens / wall, "ttft_p50_s": float(np.percentile(ttft, 50)),
            "ttft_p99_s": float(np.percentile(ttft, 99)), "texts": [r["text"] for r in results]}


def kv_reuse(url: str, model: str, histories: list[int], new: int) -> list[dict]:
    """Per history length H: the first turn's and the follow-up's time to first token."""
    rng = np.random.default_rng(1)
    out = []
    for h, timed in [(min(histories), False)] + [(h, True) for h in histories]:   # a first, untimed round compiles
        history = rng.integers(1000, 150000, size=h).tolist()             # token ids: exactly H tokens
        first = one(url, model, history, new)
        follow_up = history + tokenize(first["text"]) + rng.integers(1000, 150000, size=32).tolist()
        again = one(url, model, follow_up, new)
        if not timed:
            continue
        out.append({"history_tokens": h, "first_turn_ttft_s": first["ttft"], "follow_up_ttft_s": again["ttft"],
                    "follow_up_prompt_tokens": len(follow_up), "follow_up_cached_tokens": again["cached"]})
        print(f"  history {h}: first turn {first['ttft']:.2f} s to the first token, follow-up {again['ttft']:.3f} s",
              file=sys.stderr)
    return out


def bound(folder: pathlib.Path, texts: list[str], new: int, batch: int) -> dict:
    """What continuous batching can gain at most on this machine, from the engine in this process
    (no server running): each prompt's prefill and first step alone (P, summed), a decode step at
    one row (t1) and at `batch` rows (tb), each as the difference of runs of `new` + 1 and 1
    tokens. One by one costs P + N t1 for the N tokens after each first one; `batch` at a time
    at least P + N / batch * tb."""
    import glm_jax

    model = glm_jax.load(folder)
    prompts = [model.tokenizer.encode(t, add_special_tokens=True) for t in texts]
    engine = model.engine(max_batch=batch, max_model_len=1024, steps_per_call=4)
    engine.warm_up()

    def timed(rows: list[list[int]], tokens: int) -> float:
        start = time.perf_counter()
        engine.generate(rows, max_new_tokens=tokens, temperature=0, reuse=False)
        return time.perf_counter() - start

    prefill = sum(timed([p], 1) for p in prompts)
    step = {}
    for rows in (1, batch):
        runs = [timed(prompts[:rows], new + 1) - timed(prompts[:rows], 1) for _ in range(3)]
        step[rows] = float(np.median(runs)) / new
    n = len(prompts) * (new - 1)
    one_by_one, batched = prefill + n * step[1], prefill + n / batch * step[batch]
    return {"prefill_s": prefill, "step_1_s": step[1], f"step_{batch}_s": step[batch],
            "decode_only_gain": batch * step[1] / step[batch], "gain": one_by_one / batched}


def tokenize(text: str) -> list[int]:
    from glm_jax.tokenizer import Tokenizer

    return Tokenizer.from_file(DATA).encode(text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=32, help="requests per concurrency level (default 32)")
    parser.add_argument("--new", type=int, default=32, help="max_tokens of each request (default 32)")
    parser.add_argument("--concurrency", default="1,4,16", help="concurrency levels (default 1,4,16)")
    parser.add_argument("--history", default="1024,8192,32768",
                        help="conversation lengths of the KV-reuse section (default 1024,8192,32768; '' skips it)")
    parser.add_argument("--skip-transformers", action="store_true", help="glm-jax only")
    parser.add_argument("--out", type=pathlib.Path, default=None, help="write the JSON results here too")
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    histories = [int(h) for h in args.history.split(",") if h]
    texts = prompts(args.requests)
    results = {"command": shlex.join([sys.executable, *sys.argv]), "date": datetime.date.today().isoformat(),
               "cpu_count": os.cpu_count(), "requests": args.requests, "max_tokens": args.new}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        model = make_model(tmp)
        def glm(max_batch: int, max_model_len: int, log: str) -> Server:
            port = free_port()
            return Server([sys.executable, "-m", "glm_jax.cli", "serve", "--model", str(model), "--served-model-name",
                           "bench", "--max-batch", str(max_batch), "--max-model-len", str(max_model_len),
                           "--steps-per-call", "4", "--prefill-chunk", "512", "--port", str(port)], port, tmp / log)

        server = glm(max(levels), 1024, "glm.log")
        try:
            results["glm_jax"] = [load(server.url, "bench", texts, args.new, c) for c in levels]
        finally:
            server.stop()
        for r in results["glm_jax"]:
            print(f"glm-jax      c={r['concurrency']:>2}: {r['output_tokens_per_s']:7.1f} tok/s, "
                  f"ttft p50 {r['ttft_p50_s']:.2f} s p99 {r['ttft_p99_s']:.2f} s", file=sys.stderr)
        base = results["glm_jax"][0]["output_tokens_per_s"]
        results["glm_jax_gain_over_one_by_one"] = {r["concurrency"]: r["output_tokens_per_s"] / base
                                                   for r in results["glm_jax"]}
        results["bound"] = bound(model, texts, args.new, max(levels))
        print(f"bound at c={max(levels)}: decode step {results['bound']['step_1_s'] * 1e3:.1f} ms at one row, "
              f"{results['bound'][f'step_{max(levels)}_s'] * 1e3:.1f} ms at {max(levels)}; prefill "
              f"{results['bound']['prefill_s']:.2f} s in all: at most {results['bound']['gain']:.1f}x one by one "
              f"({results['bound']['decode_only_gain']:.1f}x without the prefill)", file=sys.stderr)
        if histories:
            server = glm(1, max(histories) + 96, "glm-reuse.log")
            try:
                results["kv_reuse"] = kv_reuse(server.url, "bench", histories, 8)
            finally:
                server.stop()
        if not args.skip_transformers:
            port = free_port()
            cmd = [str(pathlib.Path(sys.executable).with_name("transformers")), "serve", str(model), "--port",
                   str(port), "--continuous-batching", "--dtype", "float32"]
            try:
                server = Server(cmd, port, tmp / "transformers.log")
            except RuntimeError as e:
                results["transformers"] = {"error": str(e), "log": (tmp / "transformers.log").read_text()[-3000:]}
            else:
                try:
                    name = str(model)
                    results["transformers"] = [load(server.url, name, texts, args.new, c) for c in levels]
                finally:
                    server.stop()
                for ours, theirs in zip(results["glm_jax"], results["transformers"]):
                    print(f"transformers c={theirs['concurrency']:>2}: {theirs['output_tokens_per_s']:7.1f} tok/s, "
                          f"ttft p50 {theirs['ttft_p50_s']:.2f} s; glm-jax is "
                          f"{ours['output_tokens_per_s'] / theirs['output_tokens_per_s']:.2f}x", file=sys.stderr)
                    ours["same_texts_as_transformers"] = sum(a == b for a, b in zip(ours["texts"], theirs["texts"]))
    for section in ("glm_jax", "transformers"):
        for r in results.get(section, []) if isinstance(results.get(section), list) else []:
            r.pop("texts")
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
