"""The `glm-jax` command line: parses (`parser.py`) and dispatches, a thin call per command."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import signal
import sys
import threading
import time

from glm_jax import repl
from glm_jax.options import DEFAULT_REMAT
from glm_jax.parser import build_parser
from glm_jax.runtime import compile_cache_dir, install_command, select_platforms, use_compile_cache

def _fields(args, cls, **given) -> dict:
    """The keywords of dataclass `cls`: the parsed flags of the same names, then `given`."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)} | given


def _convert(args) -> int:
    from glm_jax.convert.checkpoint import convert

    start = time.perf_counter()
    config = convert(args.src, args.dst, dtype=args.dtype, quantize=args.quantize, force=args.force,
                     progress=args.progress)
    stored = args.dtype or config.dtype
    print(f"converted {args.src} -> {args.dst} ({config.num_params / 1e9:.2f}B parameters, "
          f"{f'{args.quantize} projections, the rest {stored}' if args.quantize else stored}) "
          f"in {time.perf_counter() - start:.1f} s")
    return 0


def _export(args) -> int:
    from glm_jax.convert.checkpoint import export

    export(args.model, args.out, force=args.force, layout=args.layout, progress=args.progress)
    print(f"exported {args.model} -> {args.out}")
    return 0


def _parity(args) -> int:
    from glm_jax.parity import run_parity

    report = run_parity(args.hf_dir, model_dir=args.model, dtype=args.dtype, seq_len=args.seq_len,
                        batch=args.batch, seed=args.seed, tolerance=args.tolerance, grad=args.grad,
                        progress=not args.json)
    print(report.to_json() if args.json else report.format())
    return 0 if report.ok else 1


def _load(args):
    """The model folder of a generating command, loaded with the runtime flags."""
    import glm_jax

    use_compile_cache(compile_cache_dir(args.compile_cache))
    model = glm_jax.load(args.model, dtype=args.dtype, mesh=args.mesh, prefill_chunk=args.prefill_chunk,
                         kv_cache_dtype=args.kv_cache_dtype, quantize=args.quantize, page_size=args.page_size,
                         kv_cache_tokens=args.kv_cache_tokens, kv_cache_memory=args.kv_cache_memory)
    if model.tokenizer is None:
        raise ValueError(f"{args.model}: no tokenizer.model in the model folder")
    return model


def _sampling(args, model) -> dict:
    return repl.sampling(model, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                         max_new_tokens=args.max_new_tokens)


def _speculation(args) -> dict:
    """The speculative-decoding keywords of `generate`, `Model.engine` and the server (checked
    before the model loads)."""
    from glm_jax.engine.speculative import make_drafter

    make_drafter(args.speculative, args.num_speculative_tokens, args.ngram_max, args.ngram_min)
    return {"speculative": args.speculative, "num_speculative_tokens": args.num_speculative_tokens,
            "ngram_max": args.ngram_max, "ngram_min": args.ngram_min}


def _generate(args) -> int:
    speculation = _speculation(args)
    model = _load(args)
    repl.generate(model, args.prompt, _sampling(args, model), system=args.system, chat=args.chat, as_json=args.json,
                  speculation=speculation)
    return 0


def _chat(args) -> int:
    speculation = _speculation(args)
    model = _load(args)
    return repl.chat(model, _sampling(args, model), system=args.system, max_model_len=args.max_model_len,
                     steps_per_call=args.steps_per_call, truncate_history=args.truncate_history,
                     speculation=speculation)


def _serve(args) -> int:
    for flag in ("max_batch", "max_queue", "steps_per_call", "max_model_len", "prefill_chunk"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.shutdown_timeout < 0:
        raise ValueError(f"--shutdown-timeout must be >= 0, got {args.shutdown_timeout}")
    try:
        from glm_jax.serve import server
    except ImportError as e:
        raise ValueError(f"needs the serve extra ({e}); install it with: {install_command('serve')}") from None
    engine = {"max_batch": args.max_batch, "max_model_len": args.max_model_len, "steps_per_call": args.steps_per_call,
              "speculation": _speculation(args)}
    if (args.coordinator or args.distributed) and server.join_distributed(
            coordinator=args.coordinator, num_processes=args.num_processes, process_id=args.process_id,
            mesh=args.mesh) > 0:
        return server.follow(lambda: _load(args), **engine)   # not process 0: serves nothing
    return server.serve(lambda: _load(args), host=args.host, port=args.port, served_model_name=args.served_model_name,
                        max_queue=args.max_queue, shutdown_timeout=args.shutdown_timeout, **engine)


def _compile_report(args) -> int:
    from glm_jax.compile_report import compile_report, train_report
    from glm_jax.config import GLMConfig

    over = {"auto": None, "yes": True, "no": False}[args.weights_over_sequence]
    config = GLMConfig.from_hf(args.config) if pathlib.Path(args.config).exists() else GLMConfig.preset(args.config)
    if not args.train and (args.lora_rank is not None or args.remat is not None or not args.gradient_fence):
        raise ValueError("--lora-rank, --remat and --no-gradient-fence need --train")
    if args.train and args.quantize:
        raise ValueError("--quantize compiles the serving programs; it does not go with --train")
    try:
        if args.train:
            reports = [train_report(config, topology=args.topology, seq_len=args.seq_len, batch=args.batch,
                                    mesh=args.mesh, lora_rank=args.lora_rank, remat=args.remat or DEFAULT_REMAT,
                                    fence=args.gradient_fence)]
        else:
            reports = compile_report(config, topology=args.topology, seq_len=args.seq_len,
                                     batch=args.batch, mesh=args.mesh, chunk=args.chunk, weights_over_sequence=over,
                                     kv_cache_dtype=args.kv_cache_dtype, kv_cache_tokens=args.kv_cache_tokens,
                                     page_size=args.page_size, kernel=args.kernel, quantize=args.quantize)
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

    _speculation(args)
    config = needle.NeedleConfig(**_fields(
        args, needle.NeedleConfig,
        lengths=needle.parse_lengths(args.lengths, args.min_length, args.max_length, args.num_lengths),
        depths=needle.parse_depths(args.depths, args.num_depths),
        instruction=needle.INSTRUCTION if args.instruction is None else args.instruction))
    use_compile_cache(compile_cache_dir(args.compile_cache))
    summary = needle.run(config)
    print(json.dumps(summary) if args.json else needle.format_summary(summary))
    return 0


def _ruler(args) -> int:
    from glm_jax.evals import ruler
    from glm_jax.evals.common import parse_lengths

    config = ruler.RulerConfig(**_fields(
        args, ruler.RulerConfig, lengths=parse_lengths(args.lengths, args.min_length, args.max_length,
                                                       args.num_lengths)))
    use_compile_cache(compile_cache_dir(args.compile_cache))
    summary = ruler.run(config)
    print(json.dumps(summary) if args.json else ruler.format_summary(summary))
    return 0


def _finetune(args) -> int:
    from glm_jax.train.run import FinetuneConfig, finetune

    use_compile_cache(compile_cache_dir(args.compile_cache))
    summary = finetune(FinetuneConfig(**_fields(args, FinetuneConfig)))
    if args.json:
        print(json.dumps(summary))
    elif summary["first_step"] >= summary["steps"]:     # a --resume with nothing left to train
        print(f"{summary['out']} already finished its {summary['steps']} steps; raise --steps to train more")
    else:
        print(f"trained steps {summary['first_step'] + 1}-{summary['steps']} in {summary['seconds']:.1f} s, "
              f"last loss {summary.get('loss', float('nan')):.4f}; model folder {summary['out']}")
    return 0


COMMANDS = {"convert": _convert, "export": _export, "parity": _parity, "generate": _generate, "chat": _chat,
            "serve": _serve, "compile-report": _compile_report, "needle": _needle, "ruler": _ruler,
            "finetune": _finetune}


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt, so that cleanups run."""


def _terminate(signum, frame):
    raise Terminated


WRITES_FOLDER = ("convert", "export")   # their unfinished output is removed when interrupted


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0, 1 (a check failed), 2 (bad input), 130 (Ctrl-C / SIGINT), 141 (stdout's reader
    went away, as `| head` does: quietly, as for SIGPIPE), 143 (SIGTERM)."""
    args = build_parser().parse_args(argv)
    select_platforms()
    handle_term = args.command in WRITES_FOLDER and threading.current_thread() is threading.main_thread()
    if handle_term:
        previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        if hasattr(args, "compile_cache"):
            compile_cache_dir(args.compile_cache)           # a bad folder stops here, before any work
        status = COMMANDS[args.command](args)
        sys.stdout.flush()                  # a closed pipe shows here, not in the interpreter's exit
        return status
    except BrokenPipeError:
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # the exit's flush then writes nowhere
        except (AttributeError, OSError, ValueError):   # a stdout without a file (a test's capture)
            pass
        return 141
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
