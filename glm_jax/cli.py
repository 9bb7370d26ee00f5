"""The `glm-jax` command line."""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

DTYPES = ("bfloat16", "float32")


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
                        batch=args.batch, seed=args.seed, tolerance=args.tolerance)
    print(report.to_json() if args.json else report.format())
    return 0 if report.ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glm-jax", description="GLM-4-9B in JAX: convert, check parity, run.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("convert", help="HF folder -> glm-jax model folder (Orbax)",
                       description="Convert an untouched Hugging Face GLM-4 folder (original `chatglm` or "
                                   "transformers-native `glm` layout, single file or sharded) into a "
                                   "self-contained glm-jax model folder. Streams one tensor at a time; "
                                   "writes to a temporary sibling and renames at the end.")
    p.add_argument("src", type=pathlib.Path, help="Hugging Face model folder")
    p.add_argument("dst", type=pathlib.Path, help="glm-jax model folder to create")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="stored weight dtype (default: the source's)")
    p.add_argument("--force", action="store_true", help="replace DST if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_convert)

    p = sub.add_parser("export", help="glm-jax model folder -> HF folder",
                       description="Write a glm-jax model folder back as a Hugging Face folder. A folder made "
                                   "by `convert` comes back as its source (same layout, shards and bytes "
                                   "when the dtype was kept).")
    p.add_argument("model", type=pathlib.Path, help="glm-jax model folder")
    p.add_argument("out", type=pathlib.Path, help="Hugging Face folder to create")
    p.add_argument("--layout", choices=("chatglm", "glm"), default=None,
                   help="tensor layout (default: the source's, else chatglm)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
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
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(run=_parity)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, NotImplementedError) as e:
        print(f"glm-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"glm-jax {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
