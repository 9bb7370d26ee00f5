"""The run: checks every input before writing anything, then runs the grid's missing prompts (one
prefill and a greedy decode each) and writes the results as each finishes."""

from __future__ import annotations

import dataclasses
import pathlib
import time
from collections.abc import Sequence

from glm_jax import options
from glm_jax.evals.common import load_model, log, model_config
from glm_jax.evals.rundir import append_result
from glm_jax.evals.needle.haystack import FILLER_NAME, Haystack, load_haystack
from glm_jax.evals.needle.plan import CITIES, DEFAULT_DEPTHS, plan_cases
from glm_jax.evals.needle.prompt import INSTRUCTION, NEEDLE, QUESTION, build_prompt
from glm_jax.evals.needle.results import (RESULTS, check_out, is_correct, read_results, result_key,
                                          start_out, write_summary)

PREFILL_BAR_TOKENS = 65536   # prompts at least this long show the prefill progress bar


@dataclasses.dataclass(frozen=True)
class NeedleConfig:
    model: pathlib.Path
    out: pathlib.Path
    lengths: Sequence[int]
    depths: Sequence[float] = DEFAULT_DEPTHS
    haystack: pathlib.Path | None = None
    repeat_haystack: bool = False
    samples: int = 1
    seed: int = 0
    multi_needle: int = 1
    instruction: str = INSTRUCTION
    max_new_tokens: int = 32
    dtype: str | None = None
    mesh: str | None = None
    prefill_chunk: int = options.PREFILL_CHUNK
    kv_cache_dtype: str | None = None
    page_size: int = options.PAGE_SIZE
    kv_cache_tokens: int | None = None
    kv_cache_memory: float | None = None
    quantize: str | None = None       # options.Quantization's forms: the weights' quantization
    speculative: str | None = None
    num_speculative_tokens: int = options.NUM_SPECULATIVE_TOKENS
    ngram_max: int = options.NGRAM_MAX
    ngram_min: int = options.NGRAM_MIN
    force: bool = False
    progress: bool = True

    def check(self) -> None:
        for flag, value in (("--samples", self.samples), ("--multi-needle", self.multi_needle),
                            ("--max-new-tokens", self.max_new_tokens), ("--prefill-chunk", self.prefill_chunk)):
            if value < 1:
                raise ValueError(f"{flag} must be at least 1, got {value}")
        if self.multi_needle > len(CITIES):
            raise ValueError(f"--multi-needle: at most {len(CITIES)} needles (one per city), got {self.multi_needle}")
        if not self.lengths or min(self.lengths) < 1:
            raise ValueError("context lengths must be positive")
        bad = [d for d in self.depths if not 0 <= d <= 100]
        if bad:
            raise ValueError(f"depths are percentages in 0..100, got {bad[0]:g}")


def run_config(c: NeedleConfig, haystack: Haystack) -> dict:
    """What the results depend on (config.json): a rerun with the same resumes."""
    return {"model": str(pathlib.Path(c.model).resolve()),
            "haystack": haystack.description if haystack.name == FILLER_NAME else haystack.name,
            "haystack_sha256": haystack.sha256, "haystack_tokens": haystack.tokens,
            "repeat_haystack": haystack.repeat, "lengths": [int(n) for n in c.lengths],
            "depths": [float(d) for d in c.depths], "samples": c.samples, "seed": c.seed,
            "multi_needle": c.multi_needle, "instruction": c.instruction, "max_new_tokens": c.max_new_tokens,
            "dtype": c.dtype, "kv_cache_dtype": c.kv_cache_dtype, "needle": NEEDLE, "question": QUESTION,
            **({"quantize": c.quantize} if c.quantize else {})}         # runs before quantization resume


def run(c: NeedleConfig) -> dict:
    """The whole test: checks every input before writing anything, then runs the missing prompts of
    the grid (one prefill and a greedy decode each), appending a result line as each finishes, and
    writes summary.json and heatmap.png. Returns the summary."""
    from glm_jax.tokenizer import Tokenizer

    c.check()
    out = pathlib.Path(c.out)
    config = model_config(c.model)
    longest = max(c.lengths)
    if longest + c.max_new_tokens > config.max_seq_len:
        raise ValueError(f"context length {longest:,} + --max-new-tokens {c.max_new_tokens} is above the "
                         f"model's context ({config.max_seq_len:,} tokens)")
    tokenizer = Tokenizer.from_file(c.model)
    haystack = load_haystack(c.haystack, tokenizer, c.repeat_haystack)
    cases = plan_cases(tokenizer, haystack, c.lengths, c.depths, c.samples, c.multi_needle, c.seed, c.instruction)
    settings = run_config(c, haystack)
    check_out(out, settings, c.force)
    done = set() if c.force else {result_key(r) for r in read_results(out / RESULTS)}
    total = len(cases) * c.multi_needle
    todo = [(case, j) for case in cases for j in range(c.multi_needle)
            if (case.context_length, case.depth_percent, case.sample, j) not in done]
    log(f"needle: {c.model}; haystack: {haystack.description}; {len(c.lengths)} lengths x {len(c.depths)} depths"
         f" x {c.samples} samples" + (f" x {c.multi_needle} needles" if c.multi_needle > 1 else "") +
         f" = {total} prompts, {total - len(todo)} done; results in {out / RESULTS}", c.progress)
    model = None
    if todo:   # the weights (and the mesh) load before OUT is written to
        model = load_model(c)
    rows = start_out(out, settings, c.force)
    try:
        if todo:
            _run_prompts(c, model, out, haystack, tokenizer, todo, rows, total)
    finally:
        summary = write_summary(out, rows, settings)
    return summary


def _run_prompts(c: NeedleConfig, model, out: pathlib.Path, haystack: Haystack, tokenizer, todo, rows: list,
                 total: int):
    for case, j in todo:
        needle = case.needles[j]
        question = needle.question(c.instruction)
        prompt = build_prompt(tokenizer, haystack, case.context_length, case.needles, question, case.offset)
        first: list[float] = []
        start = time.perf_counter()
        ids = model.generate([prompt.ids], max_new_tokens=c.max_new_tokens, temperature=0, speculative=c.speculative,
                             num_speculative_tokens=c.num_speculative_tokens, ngram_max=c.ngram_max,
                             ngram_min=c.ngram_min,
                             on_token=lambda row, token: first or first.append(time.perf_counter()),
                             progress=c.progress and len(prompt.ids) >= PREFILL_BAR_TOKENS)[0]
        seconds = time.perf_counter() - start
        response = tokenizer.decode(ids, skip_special_tokens=True)
        ttft = (first[0] if first else time.perf_counter()) - start
        row = {"context_length": case.context_length, "depth_percent": case.depth_percent, "sample": case.sample,
               "needle": j, "needles": len(case.needles), "needle_depth_percent": needle.depth,
               "city": needle.city, "question": question, "answer": needle.answer, "response": response,
               "correct": is_correct(needle.answer, response), "prompt_tokens": len(prompt.ids),
               "needle_token_index": prompt.needle_token_indices[j],
               "needle_token_indices": list(prompt.needle_token_indices),
               "haystack": haystack.name, "haystack_offset": case.offset,
               "haystack_sentences": prompt.haystack_sentences, "new_tokens": len(ids),
               "prefill_tokens_per_s": len(prompt.ids) / ttft if ttft > 0 else None, "seconds": seconds}
        append_result(out / RESULTS, row)
        rows.append(row)
        speed = row["prefill_tokens_per_s"]
        log(f"needle {len(rows)}/{total} | length {case.context_length:,} depth {case.depth_percent:g}% "
             f"sample {case.sample}" + (f" needle {j + 1}/{len(case.needles)}" if len(case.needles) > 1 else "") +
             f" | {len(prompt.ids):,} tokens, prefill {speed or 0:,.0f} tok/s, {seconds:.1f} s | "
             f"{'correct' if row['correct'] else 'wrong'}", c.progress)
