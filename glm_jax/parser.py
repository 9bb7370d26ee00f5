"""The `glm-jax` argument parser: every command's flags, the shared ones declared once.

JAX-free: `glm-jax --help` imports nothing heavy. Choices and defaults come from `options`.
"""

from __future__ import annotations

import argparse
import pathlib

from glm_jax.options import (CHAT_MAX_MODEL_LEN, COMPILE_CACHE_ENV, DEFAULT_KERNEL, DEFAULT_REMAT, DTYPES,
                             HF_LAYOUTS, KERNELS, KV_CACHE_DTYPES, LOSS_CHUNK, MAX_BATCH, MAX_QUEUE, NGRAM_MAX,
                             NGRAM_MIN, NUM_SPECULATIVE_TOKENS, OPTIMIZERS, PAGE_SIZE, PREFILL_CHUNK, QUANTIZE_HELP,
                             REMAT_HELP, REMATS, RULER_BATCH, RULER_SAMPLES, SCHEDULES, SERVE_MAX_MODEL_LEN,
                             SERVE_STEPS_PER_CALL, SHUTDOWN_TIMEOUT, SPECULATIVE, STEPS_PER_CALL)

FENCE_HELP = ("let XLA schedule each block's weight gradients freely; by default they are computed with the "
              "block's input gradient (one optimization barrier): v5p-8 LoRA at 524,288 tokens fits only with the "
              "fence, v5e-8 LoRA at 131,072 only without it")


# -- flags shared by several commands ---------------------------------------------------------------

def _model_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=pathlib.Path, required=True,
                   help="glm-jax (or HF) model folder with tokenizer.model")


def _kv_cache_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default=None,
                   help="KV cache storage: int8 (per-token scales; half the bytes of bf16) "
                        "(default: the weights' dtype)")
    p.add_argument("--kv-cache-tokens", type=int, default=None, metavar="N",
                   help="size of the KV cache's page pool, in tokens, shared by every request (default: room for "
                        "--max-batch requests of --max-model-len tokens)")
    p.add_argument("--page-size", type=int, default=PAGE_SIZE,
                   help=f"KV-cache slots a page, a power of two (default {PAGE_SIZE})")


def _kv_memory_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kv-cache-memory", type=float, default=None, metavar="F",
                   help="size the KV cache's page pool as this fraction of the device memory left after the "
                        "weights, like vLLM's gpu_memory_utilization (GPU/TPU; instead of --kv-cache-tokens)")


def _quantize_flag(p: argparse.ArgumentParser, what: str = "") -> None:
    p.add_argument("--quantize", default=None, metavar="KIND[:G]", help=QUANTIZE_HELP + what)


def _compile_cache_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile-cache", default=None, metavar="DIR",
                   help="JAX's persistent compilation cache: a second run on the same model compiles nothing; "
                        f"'off' disables it; a folder yet to be made is written as a path (./DIR) "
                        f"(default: ${COMPILE_CACHE_ENV}, else ~/.cache/glm-jax/jax)")


def _runtime_flags(p: argparse.ArgumentParser) -> None:
    """How a generating command runs the model: mesh, dtype, prefill chunk, KV cache, compilation cache."""
    p.add_argument("--mesh", default=None, help="device mesh, e.g. 'sequence=8' or 'tensor=2,sequence=4'")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="compute dtype (default: the stored weights')")
    p.add_argument("--prefill-chunk", type=int, default=PREFILL_CHUNK,
                   help=f"prompt tokens per prefill step (default {PREFILL_CHUNK})")
    _kv_cache_flag(p)
    _kv_memory_flag(p)
    _quantize_flag(p, "; a folder stored quantized loads as stored")
    _compile_cache_flag(p)


def _speculative_flags(p: argparse.ArgumentParser, default_help: str = "off") -> None:
    g = p.add_argument_group("speculative decoding (the same output, fewer model steps when drafts match)")
    g.add_argument("--speculative", choices=SPECULATIVE, default=None,
                   help="draft tokens by looking the latest n-gram up in the prompt and output so far (ngram), "
                        f"verify them in one model step (default: {default_help})")
    g.add_argument("--num-speculative-tokens", type=int, default=NUM_SPECULATIVE_TOKENS, metavar="K",
                   help=f"drafts verified per step (default {NUM_SPECULATIVE_TOKENS})")
    g.add_argument("--ngram-max", type=int, default=NGRAM_MAX, help=f"longest n-gram looked up (default {NGRAM_MAX})")
    g.add_argument("--ngram-min", type=int, default=NGRAM_MIN,
                   help=f"shortest n-gram looked up (default {NGRAM_MIN})")


def _generation_flags(p: argparse.ArgumentParser, system_help: str) -> None:
    """The model, the prompt's system turn and the sampling of `generate` and `chat`, then the runtime flags."""
    _model_flag(p)
    p.add_argument("--system", default=None, help=system_help)
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens to generate at most (default 256)")
    p.add_argument("--temperature", type=float, default=None,
                   help="0 = greedy (default: generation_config.json's, 0.8 for the chat models; 0 if its "
                        "do_sample is false)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus mass, (0, 1] (default: generation_config.json's)")
    p.add_argument("--top-k", type=int, default=None,
                   help="keep the k best tokens, 0 = off (default: generation_config.json's, else 50)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    _runtime_flags(p)
    _speculative_flags(p)


def _eval_out_and_lengths(p: argparse.ArgumentParser, counted: str, short: bool = False) -> None:
    """An evaluation's model, output folder and context lengths (listed, or evenly spaced);
    short: also the old --min / --max / --num spellings."""
    _model_flag(p)
    p.add_argument("--out", type=pathlib.Path, required=True,
                   help="output folder (new, or a run of the same arguments to resume)")
    p.add_argument("--lengths", default=None, metavar="N,N,...", help=f"context lengths in tokens, {counted}")
    alias = lambda name: (f"--{name}",) if short else ()
    p.add_argument("--min-length", *alias("min"), type=int, default=None,
                   help="with --max-length, --num-lengths: evenly spaced lengths from this")
    p.add_argument("--max-length", *alias("max"), type=int, default=None, help="the longest of the evenly spaced lengths")
    p.add_argument("--num-lengths", *alias("num"), type=int, default=None, help="how many evenly spaced lengths")


def _steps_per_call_flag(p: argparse.ArgumentParser, default: int) -> None:
    p.add_argument("--steps-per-call", type=int, default=default,
                   help=f"tokens per decode burst on the device between host round trips (default {default})")


def _output_flags(p: argparse.ArgumentParser, target: str) -> None:
    p.add_argument("--force", action="store_true", help=f"replace {target} if it exists")
    _quiet_flag(p)


def _quiet_flag(p: argparse.ArgumentParser, help: str = "no progress bar") -> None:
    p.add_argument("--quiet", dest="progress", action="store_false", help=help)


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
    _quantize_flag(p, "; stored quantized")
    _output_flags(p, "DST")

    p = sub.add_parser("export", help="glm-jax model folder -> HF folder",
                       description="Write a glm-jax model folder back as a Hugging Face folder. A folder made "
                                   "by `convert` comes back as its source (same layout, shards and bytes "
                                   "when the dtype was kept). A folder stored quantized (convert --quantize) is "
                                   "written dequantized, in its config's float dtype.")
    p.add_argument("model", type=pathlib.Path, help="glm-jax model folder")
    p.add_argument("out", type=pathlib.Path, help="Hugging Face folder to create")
    p.add_argument("--layout", choices=HF_LAYOUTS, default=None,
                   help="tensor layout (default: the source's, else chatglm)")
    _output_flags(p, "OUT")

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

    p = sub.add_parser("generate", help="generate text from a prompt (streaming)",
                       description="Generate a continuation of --prompt, streaming text as it is produced. "
                                   "With --chat (or --system) the prompt is a user turn in the chat format; "
                                   "special-token strings in it stay text.")
    _generation_flags(p, "a system message before the prompt (implies --chat)")
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user message of the chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object (ids, text, timing) instead of streaming")

    p = sub.add_parser("chat", help="interactive multi-turn chat",
                       description="An interactive chat using the model folder's chat template; sampling "
                                   "defaults come from generation_config.json. Empty line or Ctrl-D quits, "
                                   "/reset forgets the conversation. The conversation's KV cache is kept "
                                   "between turns: a turn prefills only its new tokens.")
    _generation_flags(p, "a system message that opens the conversation (and opens it again after /reset)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="the whole conversation's tokens at most, the KV cache's length (default: the model's "
                        f"context length, at most {CHAT_MAX_MODEL_LEN})")
    p.add_argument("--truncate-history", action="store_true",
                   help="drop the oldest turns when a message would pass --max-model-len (default: refuse it)")
    _steps_per_call_flag(p, STEPS_PER_CALL)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (chat completions, completions)",
                       description="Serve the model over HTTP with the OpenAI API: /v1/chat/completions, "
                                   "/v1/completions (streaming too), /v1/models, /health, /metrics "
                                   "(Prometheus). Requests share a continuous-batching engine. SIGTERM stops "
                                   "accepting, lets the requests in flight finish (up to --shutdown-timeout) "
                                   "and exits 0. Needs the serve extra.")
    _model_flag(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--served-model-name", default=None, help="the `model` requests name (default: the folder's name)")
    p.add_argument("--max-batch", type=int, default=MAX_BATCH,
                   help=f"requests decoded together: KV cache rows (default {MAX_BATCH})")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="prompt + generated tokens per request, the length of each cache row (default: the "
                        f"model's context length, at most {SERVE_MAX_MODEL_LEN})")
    p.add_argument("--max-queue", type=int, default=MAX_QUEUE,
                   help=f"requests that may wait for a row; more get HTTP 429 (default {MAX_QUEUE})")
    _steps_per_call_flag(p, SERVE_STEPS_PER_CALL)
    p.add_argument("--shutdown-timeout", type=float, default=SHUTDOWN_TIMEOUT,
                   help=f"seconds SIGTERM waits for the requests in flight before aborting them "
                        f"(default {SHUTDOWN_TIMEOUT:g})")
    _runtime_flags(p)
    _speculative_flags(p, "off; a request may ask for up to K drafts, or none, with the extra body field "
                          "num_speculative_tokens")
    dist = p.add_argument_group("several hosts (process 0 serves HTTP; the others run its engine rounds)")
    dist.add_argument("--distributed", action="store_true",
                      help="join a multi-host JAX run found from the environment (TPU pods: jax.distributed)")
    dist.add_argument("--coordinator", default=None, help="HOST:PORT of process 0's coordinator (with the next two)")
    dist.add_argument("--num-processes", type=int, default=None, help="processes in the run")
    dist.add_argument("--process-id", type=int, default=None, help="this process's index, 0 serves HTTP")

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
    p.add_argument("--seq-len", type=int, required=True,
                   help="tokens a request spans at most (e.g. 1048576); with --train, a sequence's")
    p.add_argument("--batch", type=int, default=1,
                   help="requests decoded at once, over a pool of --kv-cache-tokens (with --train: sequences) "
                        "(default 1)")
    p.add_argument("--mesh", default=None, help="mesh spec (default: chosen per topology, see README)")
    p.add_argument("--chunk", type=int, default=4096, help="prefill chunk in tokens (default 4096)")
    p.add_argument("--kernel", choices=KERNELS, default=DEFAULT_KERNEL,
                   help=f"attention kernel of the programs (default {DEFAULT_KERNEL}: the platform's, see README)")
    _kv_cache_flag(p)
    _quantize_flag(p, " (not with --train)")
    p.add_argument("--weights-over-sequence", choices=("auto", "yes", "no"), default="auto",
                   help="also shard weights over the sequence axis (default: per topology)")
    p.add_argument("--train", action="store_true",
                   help="compile one train step instead (AdamW; tokens and weights over every chip)")
    p.add_argument("--lora-rank", type=int, default=None, help="with --train: LoRA adapters of this rank")
    p.add_argument("--remat", choices=REMATS, default=None,
                   help=f"{REMAT_HELP} (with --train; default {DEFAULT_REMAT})")
    p.add_argument("--no-gradient-fence", dest="gradient_fence", action="store_false",
                   help="with --train: " + FENCE_HELP)
    p.add_argument("--json", action="store_true", help="a JSON list, one object per program")

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
    _eval_out_and_lengths(p, "the whole prompt counted, e.g. 1000,8000,128000", short=True)
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
    _runtime_flags(p)
    _speculative_flags(p)
    p.add_argument("--force", action="store_true", help="start afresh in an OUT that holds another run")
    _quiet_flag(p, "no progress lines")
    p.add_argument("--json", action="store_true", help="print the summary as JSON at the end")

    p = sub.add_parser("ruler", help="RULER's synthetic long-context tasks: score per task x context length, "
                                     "RULER's averages, heatmap",
                       description="RULER (NVIDIA/RULER) in the model's chat format: needle retrieval (single, "
                                   "multi-key, multi-value, multi-query; noise, essay or needle haystacks), "
                                   "variable tracking, common and frequent words, and QA on SQuAD / HotpotQA files "
                                   "the user gives. Each prompt plus the task's generation budget fits each "
                                   "length in the model's tokens (the most haystack that does); greedy answers, "
                                   "many samples per engine call; scored as RULER scores (string_match_all; QA "
                                   "string_match_part). OUT gets results.jsonl (a line per sample: a rerun of the "
                                   "same command skips finished ones), summary.json (task x length, the average "
                                   "per length, weighted averages, effective length) and heatmap.png.")
    _eval_out_and_lengths(p, "prompt and generation budget counted, e.g. 4096,8192,16384,32768,65536,131072")
    p.add_argument("--tasks", default=None, metavar="T,T,...",
                   help="niah_single_1, niah_single_2, niah_single_3, niah_multikey_1, niah_multikey_2, "
                        "niah_multikey_3, niah_multivalue, niah_multiquery, vt, cwe, fwe, qa_1, qa_2 (default: the "
                        "eleven synthetic ones, and qa_1 / qa_2 when --qa-data gives their files)")
    p.add_argument("--samples", type=int, default=RULER_SAMPLES,
                   help=f"samples per task and length (default {RULER_SAMPLES}; RULER reports 500)")
    p.add_argument("--seed", type=int, default=0, help="seed of every sample's keys, values, words and positions "
                                                       "(default 0)")
    p.add_argument("--haystack", type=pathlib.Path, default=None, metavar="FILE",
                   help="the essay tasks' text (niah_single_2/3, niah_multikey_1, niah_multivalue, niah_multiquery): "
                        "a text file, a .jsonl file with a 'text' field per line or a folder of .txt files, e.g. "
                        "Paul Graham's essays as RULER uses (default: the noise lines; nothing is downloaded)")
    p.add_argument("--qa-data", type=pathlib.Path, action="append", default=[], metavar="FILE",
                   help="a SQuAD v2 file (dev-v2.0.json: qa_1) or a HotpotQA one (hotpot_dev_distractor_v1.json: "
                        "qa_2); give it twice for both")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="generation budget of every task (default RULER's: 128 NIAH, 30 vt, 120 cwe, 50 fwe, 32 QA)")
    p.add_argument("--batch-size", type=int, default=RULER_BATCH,
                   help=f"samples run together per engine call (default {RULER_BATCH}; each holds a KV cache of "
                        f"its length: use 1 at 1M)")
    _runtime_flags(p)
    p.add_argument("--force", action="store_true", help="start afresh in an OUT that holds another run")
    _quiet_flag(p, "no progress lines")
    p.add_argument("--json", action="store_true", help="print the summary as JSON at the end")

    p = sub.add_parser("finetune", help="fine-tune a model folder on a JSONL file (full or LoRA)",
                       description="Fine-tune (every weight, or LoRA adapters) on JSONL data, one example a "
                                   "line: {\"messages\": [...]} (chat; loss "
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
    p.add_argument("--lr", dest="learning_rate", metavar="LR", type=float, default=1e-5,
                   help="peak learning rate (default 1e-5)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=OPTIMIZERS[0], help=f"default {OPTIMIZERS[0]}")
    p.add_argument("--schedule", choices=SCHEDULES, default=SCHEDULES[0],
                   help=f"after the warmup: cosine decay to 10%% of --lr, or constant (default {SCHEDULES[0]})")
    p.add_argument("--warmup-steps", type=int, default=None, help="linear warmup steps, step k of W at k/W x --lr (default 10%% of --steps)")
    p.add_argument("--weight-decay", type=float, default=0.0,
                   help="AdamW decoupled weight decay, never on norms and biases (default 0)")
    p.add_argument("--clip-norm", type=float, default=1.0, help="global gradient-norm clipping, 0 = off (default 1)")
    p.add_argument("--mesh", default=None,
                   help="device mesh, e.g. 'sequence=8' or 'fsdp=2,sequence=4' (default: one device)")
    p.add_argument("--remat", choices=REMATS, default=DEFAULT_REMAT, help=f"{REMAT_HELP} (default {DEFAULT_REMAT})")
    p.add_argument("--no-gradient-fence", dest="gradient_fence", action="store_false", help=FENCE_HELP)
    p.add_argument("--loss-chunk", type=int, default=LOSS_CHUNK,
                   help=f"tokens per cross-entropy chunk (default {LOSS_CHUNK})")
    p.add_argument("--lora-rank", type=int, default=None,
                   help="train LoRA adapters of this rank instead of every weight (base frozen; OUT gets the "
                        "merged model and adapters/)")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA scale numerator: scale = alpha / rank "
                                                                     "(default 2 x rank)")
    p.add_argument("--lora-targets", default=None, metavar="REGEX",
                   help="weights to adapt, matched against names like layers.3.attn.q_proj (default: every "
                        "attention and MLP projection; never the embedding, norms or output layer)")
    _quantize_flag(p, "; with --lora-rank only: the base is frozen quantized, the adapters train in float32 "
                      "and OUT gets the merged model in float")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (default: at the end only)")
    p.add_argument("--keep", type=int, default=2, help="checkpoints kept (default 2)")
    p.add_argument("--resume", action="store_true", help="continue OUT's run from its latest checkpoint (a larger --steps trains on, the learning-rate schedule recomputed for the new total)")
    p.add_argument("--seed", type=int, default=0, help="data order seed (default 0)")
    p.add_argument("--no-shuffle", dest="shuffle", action="store_false", help="keep the file's order")
    p.add_argument("--truncate", action="store_true", help="cut examples longer than --seq-len instead of failing")
    p.add_argument("--packing", action="store_true",
                   help="pack several examples into each sequence (attention kept within each example, "
                        "positions restarting)")
    _compile_cache_flag(p)
    p.add_argument("--json", action="store_true", help="print a JSON summary at the end")
    _quiet_flag(p)
    return parser
