"""The `glm-jax` command line."""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import sys
import threading
import time

DTYPES = ("bfloat16", "float32")
COMPILE_CACHE_ENV = "GLM_JAX_COMPILE_CACHE"
# Device nodes of the accelerators JAX finds on its own: TPU (accel driver, vfio driver), NVIDIA, AMD, WSL2 GPUs.
ACCELERATOR_NODES = ("accel*", "vfio", "nvidia*", "kfd", "dxg")
# `glm-jax serve`'s default context per request (at most the model's): the KV cache holds
# max_batch x this many slots, allocated at start (8 x 8,192 tokens of GLM-4-9B in bf16: 2.7 GB).
SERVE_MAX_MODEL_LEN = 8192
CHAT_MAX_MODEL_LEN = 32768


def default_platforms(dev: pathlib.Path = pathlib.Path("/dev")) -> str | None:
    """JAX_PLATFORMS for a machine whose user set none: None (JAX chooses) where an accelerator's
    device node exists, else "cpu", so that an installed libtpu (the [tpu] extra, for TPU compiles
    on any machine) is not started: off a TPU VM that costs start-up time and prints errors."""
    return None if any(next(dev.glob(node), None) for node in ACCELERATOR_NODES) else "cpu"


def _select_platforms() -> None:
    import jax

    if jax.config.jax_platforms is None and (platforms := default_platforms()):  # None: no JAX_PLATFORMS set
        jax.config.update("jax_platforms", platforms)


def compile_cache_dir(flag: str | None) -> pathlib.Path | None:
    """The persistent compilation cache folder: --compile-cache, else $GLM_JAX_COMPILE_CACHE, else
    $XDG_CACHE_HOME/glm-jax/jax (~/.cache/glm-jax/jax); None for "off"."""
    cache_home = pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache")
    folder = flag or os.environ.get(COMPILE_CACHE_ENV) or str(cache_home / "glm-jax" / "jax")
    return None if folder == "off" else pathlib.Path(folder).expanduser()


def _use_compile_cache(folder: pathlib.Path | None) -> None:
    """JAX's persistent compilation cache, for every program: the default threshold (1 s of
    compile time) would skip a small model's, so a second run would compile them again."""
    import jax

    if folder is not None:
        jax.config.update("jax_compilation_cache_dir", str(folder))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


def _convert(args) -> int:
    from glm_jax.convert.checkpoint import convert

    start = time.perf_counter()
    config = convert(args.src, args.dst, dtype=args.dtype, force=args.force, progress=not args.quiet)
    print(f"converted {args.src} -> {args.dst} ({config.num_params / 1e9:.2f}B parameters, "
          f"{args.dtype or config.dtype}) in {time.perf_counter() - start:.1f} s")
    return 0


def _export(args) -> int:
    from glm_jax.convert.checkpoint import export

    export(args.model, args.out, force=args.force, layout=args.layout, progress=not args.quiet)
    print(f"exported {args.model} -> {args.out}")
    return 0


def _parity(args) -> int:
    from glm_jax.parity import run_parity

    report = run_parity(args.hf_dir, model_dir=args.model, dtype=args.dtype, seq_len=args.seq_len,
                        batch=args.batch, seed=args.seed, tolerance=args.tolerance, grad=args.grad)
    print(report.to_json() if args.json else report.format())
    return 0 if report.ok else 1


def _load_for_generation(args):
    import glm_jax

    _use_compile_cache(compile_cache_dir(args.compile_cache))
    model = glm_jax.load(args.model, dtype=args.dtype, mesh=args.mesh, prefill_chunk=args.prefill_chunk,
                         kv_cache_dtype=args.kv_cache_dtype)
    if model.tokenizer is None:
        raise ValueError(f"{args.model}: no tokenizer.model in the model folder")
    return model


def _sampling(args, model) -> dict:
    """Sampling flags; those not given come from generation_config.json, as in `model.generate`."""
    return {**model.generation_defaults.sampling(args.temperature, args.top_p, args.top_k),
            "seed": args.seed, "max_new_tokens": args.max_new_tokens}


def _stream(model, prompt_ids: list[int], sampling: dict, engine=None) -> list[int]:
    """Generates for one prompt (on `engine` when given, else the model's own), printing text as
    it becomes complete UTF-8."""
    out = sys.stdout
    decoder = model.tokenizer.stream_decoder(skip_special_tokens=True)
    on_token = lambda row, token: (out.write(decoder.push(_text_ids(model, [token]))), out.flush())
    ids = (engine or model).generate([prompt_ids], on_token=on_token, **sampling)[0]
    out.write(decoder.flush())
    out.flush()
    return ids


def _generate(args) -> int:
    import json

    model = _load_for_generation(args)
    tok = model.tokenizer
    if args.chat or args.system:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
                   [{"role": "user", "content": args.prompt}]
        prompt = tok.apply_chat_template(messages, split_special_tokens=True)
    else:
        prompt = tok.encode(args.prompt, add_special_tokens=True)
    sampling = _sampling(args, model)
    if args.json:
        start = time.perf_counter()
        ids = model.generate([prompt], **sampling)[0]
        text = tok.decode(_text_ids(model, ids), skip_special_tokens=True)
        print(json.dumps({"prompt_tokens": len(prompt), "ids": ids, "text": text,
                          "stopped": bool(ids) and ids[-1] in sampling["stop_ids"],
                          "seconds": time.perf_counter() - start, **sampling}))
    else:
        _stream(model, prompt, sampling)
        print()
    return 0


def _chat(args) -> int:
    model = _load_for_generation(args)
    tok = model.tokenizer
    # one cache row kept across turns: each turn prefills only what follows the kept conversation
    engine = model.engine(max_batch=1, max_model_len=args.max_model_len or min(model.config.max_seq_len,
                                                                                CHAT_MAX_MODEL_LEN))
    messages = [{"role": "system", "content": args.system}] if args.system else []
    sampling = _sampling(args, model)
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
            messages = messages[:1] if args.system else []
            continue
        messages.append({"role": "user", "content": line})
        print("assistant> ", end="", flush=True)
        ids = _stream(model, tok.apply_chat_template(messages, split_special_tokens=True), sampling, engine)
        print()
        reply = tok.parse_response(tok.decode(_text_ids(model, ids), skip_special_tokens=True))
        messages.append({k: v for k, v in reply.items() if k in ("role", "content", "metadata")})
        sampling["seed"] += 1


def _compile_report(args) -> int:
    import dataclasses
    import json

    from glm_jax.compile_report import compile_report, train_report
    from glm_jax.config import GLMConfig

    over = {"auto": None, "yes": True, "no": False}[args.weights_over_sequence]
    config = GLMConfig.from_hf(args.config) if pathlib.Path(args.config).exists() else GLMConfig.preset(args.config)
    if not args.train and (args.lora_rank is not None or args.remat is not None or args.no_gradient_fence):
        raise ValueError("--lora-rank, --remat and --no-gradient-fence need --train")
    try:
        if args.train:
            reports = [train_report(config, topology=args.topology, seq_len=args.seq_len, batch=args.batch,
                                    mesh=args.mesh, lora_rank=args.lora_rank, remat=args.remat or "full",
                                    fence=not args.no_gradient_fence)]
        else:
            reports = compile_report(config, topology=args.topology, seq_len=args.seq_len,
                                     batch=args.batch, mesh=args.mesh, chunk=args.chunk, weights_over_sequence=over,
                                     kv_cache_dtype=args.kv_cache_dtype)
    except Exception as e:   # XLA refuses, at compile time, a program larger than the chip's memory
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        print(f"glm-jax compile-report: does not fit: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in reports], indent=2))
    else:
        print("\n\n".join(r.format() for r in reports))
    return 0 if all(r.fits is not False for r in reports) else 1


def _needle(args) -> int:
    from glm_jax.evals import needle

    config = needle.NeedleConfig(
        model=args.model, out=args.out,
        lengths=needle.parse_lengths(args.lengths, args.min_length, args.max_length, args.num_lengths),
        depths=needle.parse_depths(args.depths, args.num_depths), haystack=args.haystack,
        repeat_haystack=args.repeat_haystack, samples=args.samples, seed=args.seed, multi_needle=args.multi_needle,
        instruction=needle.INSTRUCTION if args.instruction is None else args.instruction,
        max_new_tokens=args.max_new_tokens, dtype=args.dtype, mesh=args.mesh, prefill_chunk=args.prefill_chunk,
        kv_cache_dtype=args.kv_cache_dtype, force=args.force, progress=not args.quiet)
    _use_compile_cache(compile_cache_dir(args.compile_cache))
    summary = needle.run(config)
    print(json.dumps(summary) if args.json else needle.format_summary(summary))
    return 0


def _serve(args) -> int:
    import logging
    import signal
    import socket

    try:
        import uvicorn

        from glm_jax.serve import create_app
    except ImportError as e:
        raise ValueError(f"needs the serve extra (pip install 'glm-jax[serve]'): {e}") from None
    for flag in ("max_batch", "max_queue", "steps_per_call", "max_model_len", "prefill_chunk"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.shutdown_timeout < 0:
        raise ValueError(f"--shutdown-timeout must be >= 0, got {args.shutdown_timeout}")
    if _distributed(args) > 0:  # not process 0: run the rounds process 0 plans, serve nothing
        model = _load_for_generation(args)
        engine = model.engine(max_batch=args.max_batch, max_model_len=_serve_length(args, model),
                              steps_per_call=args.steps_per_call)
        signal.signal(signal.SIGTERM, lambda signum, frame: None)   # process 0 decides when to stop
        engine.warm_up()
        engine.follow()
        return 0
    try:   # before loading the model, so that a taken port fails at once
        sock = socket.create_server((args.host, args.port), family=socket.AF_INET6 if ":" in args.host
                                    else socket.AF_INET)
    except OSError as e:
        raise ValueError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    model = _load_for_generation(args)
    max_model_len = _serve_length(args, model)
    engine = model.engine(max_batch=args.max_batch, max_model_len=max_model_len, steps_per_call=args.steps_per_call,
                          max_queue=args.max_queue)
    engine.warm_up()   # every program compiled before the first request
    name = args.served_model_name or args.model.resolve().name
    app = create_app(model, engine, served_model_name=name, max_model_len=max_model_len)
    log = logging.getLogger("glm_jax.serve")
    log.setLevel(logging.INFO)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.addHandler(handler)
    log.propagate = False
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                           timeout_graceful_shutdown=args.shutdown_timeout))
    # uvicorn handles SIGTERM (stops accepting, waits for the requests in flight), then raises it
    # again once it has shut down; this handler takes that second delivery, so the engine drains
    # and the command exits 0.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    host, port = sock.getsockname()[:2]
    engine.start()
    print(f"glm-jax serve: {name} on http://{host}:{port} (max_batch {args.max_batch}, "
          f"max_model_len {max_model_len})", file=sys.stderr, flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        engine.shutdown(timeout=args.shutdown_timeout)
    return 0


def _serve_length(args, model) -> int:
    context = model.config.max_seq_len
    max_model_len = args.max_model_len or min(context, SERVE_MAX_MODEL_LEN)
    if max_model_len > context:
        raise ValueError(f"--max-model-len {max_model_len} exceeds the model's context length {context}")
    return max_model_len


def _distributed(args) -> int:
    """Joins a multi-process JAX run when --coordinator (or --distributed) asks; this process's index."""
    if not (args.coordinator or args.distributed):
        return 0
    import jax

    if args.coordinator and (args.num_processes is None or args.process_id is None):
        raise ValueError("--coordinator needs --num-processes and --process-id")
    if args.mesh is None:
        raise ValueError("several processes need a --mesh over all their devices")
    if jax.config.jax_platforms == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if args.coordinator:
        jax.distributed.initialize(args.coordinator, num_processes=args.num_processes, process_id=args.process_id)
    else:
        jax.distributed.initialize()   # TPU pods and clusters: found from the environment
    return jax.process_index()


def _add_compile_cache_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile-cache", default=None, metavar="DIR",
                   help="JAX's persistent compilation cache: a second run on the same model compiles nothing; "
                        f"'off' disables it (default: ${COMPILE_CACHE_ENV}, else ~/.cache/glm-jax/jax)")


def _add_kv_cache_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kv-cache-dtype", choices=("int8",), default=None,
                   help="KV cache storage: int8 (per-token scales; half the bytes of bf16) "
                        "(default: the weights' dtype)")


def _add_output_flags(p: argparse.ArgumentParser, target: str) -> None:
    p.add_argument("--force", action="store_true", help=f"replace {target} if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _text_ids(model, ids) -> list[int]:
    """Ids that have text: the embedding is padded past the tokenizer's vocabulary (151,552 vs
    151,343 ids) and a model can, in principle, sample a padding id; it has no text to print."""
    return [i for i in ids if i < model.tokenizer.vocab_size]


def _add_generation_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=pathlib.Path, required=True, help="glm-jax (or HF) model folder with tokenizer.model")
    p.add_argument("--system", default=None, help="system prompt (implies the chat format)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens to generate at most (default 256)")
    p.add_argument("--temperature", type=float, default=None,
                   help="0 = greedy (default: generation_config.json's, 0.8 for the chat models; 0 if its "
                        "do_sample is false)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus mass, (0, 1] (default: generation_config.json's)")
    p.add_argument("--top-k", type=int, default=None,
                   help="keep the k best tokens, 0 = off (default: generation_config.json's, else 50)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--mesh", default=None, help="device mesh, e.g. 'sequence=8' or 'tensor=2,sequence=4'")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="compute dtype (default: the stored weights')")
    p.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens per prefill step (default 512)")
    _add_kv_cache_flag(p)
    _add_compile_cache_flag(p)


def _finetune(args) -> int:
    from glm_jax.train.run import FinetuneConfig, finetune

    _use_compile_cache(compile_cache_dir(args.compile_cache))
    config = FinetuneConfig(
        model=args.model, data=args.data, out=args.out, steps=args.steps, batch_size=args.batch_size,
        seq_len=args.seq_len, grad_accum=args.grad_accum, learning_rate=args.lr, optimizer=args.optimizer,
        schedule=args.schedule, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
        clip_norm=args.clip_norm, mesh=args.mesh, remat=args.remat, gradient_fence=not args.no_gradient_fence,
        loss_chunk=args.loss_chunk,
        lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, lora_targets=args.lora_targets,
        save_every=args.save_every, keep=args.keep, resume=args.resume, seed=args.seed, shuffle=not args.no_shuffle,
        truncate=args.truncate, packing=args.packing, progress=not args.quiet)
    summary = finetune(config)
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"trained steps {summary['first_step'] + 1}-{summary['steps']} in {summary['seconds']:.1f} s, "
              f"last loss {summary.get('loss', float('nan')):.4f}; model folder {summary['out']}")
    return 0


REMAT_CHOICES = ("full", "dots", "none", "segments")   # model.REMATS, listed here so --help imports no jax
REMAT_HELP = ("what a block keeps for the backward pass: only its input (full), its matmul outputs (dots), "
              "everything (none), or full with only every ceil(sqrt(layers))-th block input kept through the "
              "forward pass (segments: one more forward, a fraction of the block inputs)")
FENCE_HELP = ("let XLA schedule each block's weight gradients freely; by default they are computed with the "
              "block's input gradient (one optimization barrier): v5p-8 LoRA at 524,288 tokens fits only with the "
              "fence, v5e-8 LoRA at 131,072 only without it")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glm-jax", description="GLM-4-9B in JAX: convert, check parity, run.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("convert", help="HF folder -> glm-jax model folder (Orbax)",
                       description="Convert an untouched Hugging Face GLM-4 folder (original `chatglm` or "
                                   "transformers-native `glm` layout, single file or sharded) into a "
                                   "self-contained glm-jax model folder. Streams one tensor at a time; "
                                   "writes to a temporary sibling and renames at the end. Ctrl-C (exit 130) "
                                   "or SIGTERM (exit 143) removes the temporary folder; one a killed run "
                                   "left is removed by the next.")
    p.add_argument("src", type=pathlib.Path, help="Hugging Face model folder")
    p.add_argument("dst", type=pathlib.Path, help="glm-jax model folder to create")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="stored weight dtype (default: the source's)")
    _add_output_flags(p, "DST")
    p.set_defaults(run=_convert)

    p = sub.add_parser("export", help="glm-jax model folder -> HF folder",
                       description="Write a glm-jax model folder back as a Hugging Face folder. A folder made "
                                   "by `convert` comes back as its source (same layout, shards and bytes "
                                   "when the dtype was kept).")
    p.add_argument("model", type=pathlib.Path, help="glm-jax model folder")
    p.add_argument("out", type=pathlib.Path, help="Hugging Face folder to create")
    p.add_argument("--layout", choices=("chatglm", "glm"), default=None,
                   help="tensor layout (default: the source's, else chatglm)")
    _add_output_flags(p, "OUT")
    p.set_defaults(run=_export)

    p = sub.add_parser("parity", help="compare glm-jax with the PyTorch original",
                       description="Run the PyTorch reference (transformers GlmForCausalLM, or the folder's "
                                   "own modeling code) and glm-jax on the same random ids; print per-layer "
                                   "hidden-state and logits relative error and top-1 agreement. Exits 1 "
                                   "when the logits error exceeds the tolerance. Needs torch and transformers.")
    p.add_argument("hf_dir", type=pathlib.Path, help="Hugging Face model folder (the reference weights)")
    p.add_argument("--model", type=pathlib.Path, default=None,
                   help="converted glm-jax folder to test (default: convert HF_DIR in memory)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of both runs (default float32)")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per sequence (default 64)")
    p.add_argument("--batch", type=int, default=2, help="sequences (default 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random token ids")
    p.add_argument("--tolerance", type=float, default=None,
                   help="max logits ‖Δ‖/‖ref‖ (default 1e-4 float32, 5e-2 bfloat16)")
    p.add_argument("--grad", action="store_true",
                   help="also compare the loss and every parameter's gradient (glm-jax's train step against "
                        "PyTorch's backward on the same ids)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(run=_parity)

    p = sub.add_parser("generate", help="generate text from a prompt (streaming)",
                       description="Generate a continuation of --prompt, streaming text as it is produced. "
                                   "With --chat (or --system) the prompt is a user turn in the chat format; "
                                   "special-token strings in it stay text.")
    _add_generation_flags(p)
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user message of the chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object (ids, text, timing) instead of streaming")
    p.set_defaults(run=_generate)

    p = sub.add_parser("chat", help="interactive multi-turn chat",
                       description="An interactive chat using the model folder's chat template; sampling "
                                   "defaults come from generation_config.json. Empty line or Ctrl-D quits, "
                                   "/reset forgets the conversation. The conversation's KV cache is kept "
                                   "between turns: a turn prefills only its new tokens.")
    _add_generation_flags(p)
    p.add_argument("--max-model-len", type=int, default=None,
                   help="the whole conversation's tokens at most, the KV cache's length (default: the model's "
                        f"context length, at most {CHAT_MAX_MODEL_LEN})")
    p.set_defaults(run=_chat)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (chat completions, completions)",
                       description="Serve the model over HTTP with the OpenAI API: /v1/chat/completions, "
                                   "/v1/completions (streaming too), /v1/models, /health, /metrics "
                                   "(Prometheus). Requests share a continuous-batching engine. SIGTERM stops "
                                   "accepting, lets the requests in flight finish (up to --shutdown-timeout) "
                                   "and exits 0. Needs the serve extra.")
    p.add_argument("--model", type=pathlib.Path, required=True, help="glm-jax (or HF) model folder with tokenizer.model")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--served-model-name", default=None, help="the `model` requests name (default: the folder's name)")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together: KV cache rows (default 8)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="prompt + generated tokens per request, the length of each cache row (default: the "
                        f"model's context length, at most {SERVE_MAX_MODEL_LEN})")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests that may wait for a row; more get HTTP 429 (default 64)")
    p.add_argument("--steps-per-call", type=int, default=4,
                   help="tokens per decode burst on the device between host round trips (default 4)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds SIGTERM waits for the requests in flight before aborting them (default 30)")
    p.add_argument("--mesh", default=None, help="device mesh, e.g. 'tensor=2' or 'sequence=8'")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="compute dtype (default: the stored weights')")
    p.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens per prefill step (default 512)")
    _add_kv_cache_flag(p)
    _add_compile_cache_flag(p)
    dist = p.add_argument_group("several hosts (process 0 serves HTTP; the others run its engine rounds)")
    dist.add_argument("--distributed", action="store_true",
                      help="join a multi-host JAX run found from the environment (TPU pods: jax.distributed)")
    dist.add_argument("--coordinator", default=None, help="HOST:PORT of process 0's coordinator (with the next two)")
    dist.add_argument("--num-processes", type=int, default=None, help="processes in the run")
    dist.add_argument("--process-id", type=int, default=None, help="this process's index, 0 serves HTTP")
    p.set_defaults(run=_serve)

    p = sub.add_parser("compile-report", help="compile prefill and decode (or a train step) for a TPU topology; "
                                              "report memory",
                       description="Compile the prefill-chunk and decode programs of a preset at real size "
                                   "(abstract weights, nothing allocated) for a TPU topology on this machine "
                                   "(needs the [tpu] extra: libtpu), or for this process's devices with "
                                   "--topology local. Prints per-device argument, output, alias, temporary "
                                   "and peak bytes, KV-cache bytes, the chip's HBM and whether it fits, and "
                                   "FLOPs. Exits 1 when a program does not fit.")
    p.add_argument("--config", required=True,
                   help="preset (glm-4-9b-chat-1m, glm-4-9b-chat, glm-4-9b) or a model folder / config.json")
    p.add_argument("--topology", required=True, help="TPU topology such as v5e:2x4, v5p:2x2x2, v6e:2x4; or local")
    p.add_argument("--seq-len", type=int, required=True, help="KV-cache length in tokens (e.g. 1048576)")
    p.add_argument("--batch", type=int, default=1, help="sequences (default 1)")
    p.add_argument("--mesh", default=None, help="mesh spec (default: chosen per topology, see README)")
    p.add_argument("--chunk", type=int, default=4096, help="prefill chunk in tokens (default 4096)")
    _add_kv_cache_flag(p)
    p.add_argument("--weights-over-sequence", choices=("auto", "yes", "no"), default="auto",
                   help="also shard weights over the sequence axis (default: per topology)")
    p.add_argument("--train", action="store_true",
                   help="compile one train step instead (AdamW; tokens and weights over every chip)")
    p.add_argument("--lora-rank", type=int, default=None, help="with --train: LoRA adapters of this rank")
    p.add_argument("--remat", choices=REMAT_CHOICES, default=None, help=REMAT_HELP + " (with --train; default full)")
    p.add_argument("--no-gradient-fence", action="store_true", help="with --train: " + FENCE_HELP)
    p.add_argument("--json", action="store_true", help="a JSON list, one object per program")
    p.set_defaults(run=_compile_report)

    p = sub.add_parser("needle", help="needle in a haystack: retrieval accuracy over context length x depth, "
                                      "with its heatmap",
                       description="The needle-in-a-haystack test (LWM's protocol, in the model's chat format): "
                                   "`The special magic {city} number is: {7-digit number}.` inserted at a "
                                   "sentence boundary at each depth of a haystack cut so that the whole prompt "
                                   "(template, haystack, needle, question) is each context length in the model's "
                                   "tokens, never over; then `What is the special magic {city} number?` and a "
                                   "greedy answer, correct when it contains the number. OUT gets results.jsonl "
                                   "(a line per cell as it finishes: a rerun of the same command skips finished "
                                   "cells), summary.json and heatmap.png.")
    p.add_argument("--model", type=pathlib.Path, required=True,
                   help="glm-jax (or HF) model folder with tokenizer.model")
    p.add_argument("--out", type=pathlib.Path, required=True,
                   help="output folder (new, or a run of the same arguments to resume)")
    p.add_argument("--lengths", default=None, metavar="N,N,...",
                   help="context lengths in tokens, the whole prompt counted, e.g. 1000,8000,128000")
    p.add_argument("--min-length", "--min", type=int, default=None, help="with --max-length, --num-lengths: "
                                                                         "evenly spaced lengths from this")
    p.add_argument("--max-length", "--max", type=int, default=None, help="the longest of the evenly spaced lengths")
    p.add_argument("--num-lengths", "--num", type=int, default=None, help="how many evenly spaced lengths")
    p.add_argument("--depths", default=None, metavar="D,D,...",
                   help="needle depths in percent of the haystack, 0 (start) to 100 (end) (default 0,25,50,75,100)")
    p.add_argument("--num-depths", type=int, default=None, help="this many depths spread from 0 to 100 instead")
    p.add_argument("--haystack", type=pathlib.Path, default=None, metavar="FILE",
                   help="haystack text: a plain text file, a .jsonl file with a 'text' field per line (e.g. PG-19), "
                        "or a folder of .txt files (e.g. Paul Graham's essays) (default: the built-in filler "
                        "'The grass is green. The sky is blue. ...', no download)")
    p.add_argument("--repeat-haystack", action="store_true",
                   help="repeat the haystack when it is shorter than the longest length")
    p.add_argument("--samples", type=int, default=1,
                   help="prompts per cell, each with other cities, numbers and haystack offsets (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the cities, numbers and offsets (default 0)")
    p.add_argument("--multi-needle", type=int, default=1, metavar="K",
                   help="K needles (different cities) spread over the haystack, one at the cell's depth; each "
                        "asked in turn and scored separately (default 1)")
    p.add_argument("--instruction", default=None,
                   help="text after the question (default LWM's: \"Don't give information outside the document "
                        "or repeat your findings. Keep your response short and direct.\"; a model trained by "
                        "scripts/bench_finetune.py expects \"Answer with the number only.\")")
    p.add_argument("--max-new-tokens", type=int, default=32, help="answer budget in tokens (default 32)")
    p.add_argument("--mesh", default=None, help="device mesh, e.g. 'sequence=8' or 'tensor=2,sequence=4'")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="compute dtype (default: the stored weights')")
    p.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens per prefill step (default 512)")
    _add_kv_cache_flag(p)
    _add_compile_cache_flag(p)
    p.add_argument("--force", action="store_true", help="start afresh in an OUT that holds another run")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--json", action="store_true", help="print the summary as JSON at the end")
    p.set_defaults(run=_needle)

    p = sub.add_parser("finetune", help="fine-tune a model folder on a JSONL file (full or LoRA)",
                       description="Fine-tune (every weight, or LoRA adapters) on JSONL data, one example a line: {\"messages\": [...]} (chat; loss "
                                   "on assistant turns; tool use in GLM-4's format: a system message with \"tools\", "
                                   "assistant \"metadata\" naming the tool, role \"observation\"; or OpenAI's: a "
                                   "top-level \"tools\" beside \"messages\", assistant \"tool_calls\", role \"tool\"), "
                                   "{\"text\": ...} (loss on every token) or "
                                   "{\"input_ids\": [...], \"labels\": [...]} (labels aligned with the ids, -100 "
                                   "ignored). Tokens are laid out over the mesh's sequence axis (ring attention), "
                                   "the loss is computed in chunks without [T, vocab] logits. OUT gets "
                                   "checkpoints/, metrics.jsonl, loss.png and, at the end, the model folder.")
    p.add_argument("--model", type=pathlib.Path, required=True, help="source: a glm-jax or Hugging Face model folder")
    p.add_argument("--data", type=pathlib.Path, required=True, help="JSONL training data")
    p.add_argument("--out", type=pathlib.Path, required=True, help="output folder (new or empty; or --resume)")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps (default 100)")
    p.add_argument("--batch-size", type=int, default=1, help="sequences per micro-batch (default 1)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence (default 2048)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--lr", type=float, default=1e-5, help="peak learning rate (default 1e-5)")
    p.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw", help="default adamw")
    p.add_argument("--schedule", choices=("cosine", "constant"), default="cosine",
                   help="after the warmup: cosine decay to 10%% of --lr, or constant (default cosine)")
    p.add_argument("--warmup-steps", type=int, default=None, help="linear warmup steps (default 10%% of --steps)")
    p.add_argument("--weight-decay", type=float, default=0.0,
                   help="AdamW decoupled weight decay, never on norms and biases (default 0)")
    p.add_argument("--clip-norm", type=float, default=1.0, help="global gradient-norm clipping, 0 = off (default 1)")
    p.add_argument("--mesh", default=None, help="device mesh, e.g. 'sequence=8' or 'fsdp=2,sequence=4' (default: one device)")
    p.add_argument("--remat", choices=REMAT_CHOICES, default="full", help=REMAT_HELP + " (default full)")
    p.add_argument("--no-gradient-fence", action="store_true", help=FENCE_HELP)
    p.add_argument("--loss-chunk", type=int, default=1024, help="tokens per cross-entropy chunk (default 1024)")
    p.add_argument("--lora-rank", type=int, default=None,
                   help="train LoRA adapters of this rank instead of every weight (base frozen; OUT gets the "
                        "merged model and adapters/)")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA scale numerator: scale = alpha / rank "
                                                                     "(default 2 x rank)")
    p.add_argument("--lora-targets", default=None, metavar="REGEX",
                   help="weights to adapt, matched against names like layers.3.attn.q_proj (default: every "
                        "attention and MLP projection; never the embedding, norms or output layer)")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (default: at the end only)")
    p.add_argument("--keep", type=int, default=2, help="checkpoints kept (default 2)")
    p.add_argument("--resume", action="store_true", help="continue OUT's run from its latest checkpoint")
    p.add_argument("--seed", type=int, default=0, help="data order seed (default 0)")
    p.add_argument("--no-shuffle", action="store_true", help="keep the file's order")
    p.add_argument("--truncate", action="store_true", help="cut examples longer than --seq-len instead of failing")
    p.add_argument("--packing", action="store_true",
                   help="pack several examples into each sequence (attention kept within each example, "
                        "positions restarting)")
    _add_compile_cache_flag(p)
    p.add_argument("--json", action="store_true", help="print a JSON summary at the end")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_finetune)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt, so that cleanups run."""


def _terminate(signum, frame):
    raise Terminated


WRITES_FOLDER = ("convert", "export")   # their unfinished output is removed when interrupted


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0, 1 (a check failed), 2 (bad input), 130 (Ctrl-C / SIGINT), 143 (SIGTERM)."""
    args = build_parser().parse_args(argv)
    _select_platforms()
    handle_term = args.command in WRITES_FOLDER and threading.current_thread() is threading.main_thread()
    if handle_term:
        previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, NotImplementedError) as e:
        print(f"glm-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        removed = "; the unfinished output was removed" if args.command in WRITES_FOLDER else ""
        name = "SIGTERM" if isinstance(e, Terminated) else "SIGINT"
        print(f"glm-jax {args.command}: interrupted ({name}){removed}", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    finally:
        if handle_term:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
