"""The run: checks every input before writing anything, then runs the grid's missing samples through
the engine in batches (many rows per `generate` call, greedy) and appends each result as its batch
finishes."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import itertools
import pathlib
import time
from collections.abc import Sequence

from glm_jax import options
from glm_jax.evals.common import load_model, log, model_config
from glm_jax.evals.ruler import niah
from glm_jax.evals.ruler.plan import Inputs, grid, make_sample, new_tokens
from glm_jax.evals.ruler.qa import load_qa
from glm_jax.evals.ruler.results import RESULTS, check_out, read_results, result_key, start_out, write_summary
from glm_jax.evals.ruler.scoring import score
from glm_jax.evals.ruler.tasks import TASKS, parse_tasks
from glm_jax.evals.rundir import append_result
from glm_jax.evals.text import read_haystack

NOISE_ESSAY = "built-in noise (no --haystack; RULER uses Paul Graham's essays)"


@dataclasses.dataclass(frozen=True)
class RulerConfig:
    model: pathlib.Path
    out: pathlib.Path
    lengths: Sequence[int]
    tasks: str | None = None               # --tasks a,b (default: every synthetic one, and QA with --qa-data)
    samples: int = options.RULER_SAMPLES
    seed: int = 0
    haystack: pathlib.Path | None = None   # the essay tasks' text
    qa_data: Sequence[pathlib.Path] = ()
    max_new_tokens: int | None = None      # default: RULER's per task
    batch_size: int = options.RULER_BATCH
    dtype: str | None = None
    mesh: str | None = None
    prefill_chunk: int = options.PREFILL_CHUNK
    kv_cache_dtype: str | None = None
    quantize: str | None = None       # options.Quantization's forms: the weights' quantization
    page_size: int = options.PAGE_SIZE
    kv_cache_tokens: int | None = None
    kv_cache_memory: float | None = None
    force: bool = False
    progress: bool = True

    def check(self) -> None:
        for flag, value in (("--samples", self.samples), ("--batch-size", self.batch_size),
                            ("--prefill-chunk", self.prefill_chunk),
                            ("--max-new-tokens", 1 if self.max_new_tokens is None else self.max_new_tokens)):
            if value < 1:
                raise ValueError(f"{flag} must be at least 1, got {value}")
        if not self.lengths or min(self.lengths) < 1:
            raise ValueError("context lengths must be positive")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def load_qa_files(paths: Sequence[pathlib.Path]) -> dict:
    """--qa-data's files by dataset ("squad", "hotpotqa"), one of each at most."""
    qa = {}
    for path in paths:
        data = load_qa(path)
        if data.dataset in qa:
            raise ValueError(f"--qa-data: two {data.dataset} files ({qa[data.dataset].path} and {path})")
        qa[data.dataset] = data
    return qa


def load_inputs(c: RulerConfig, names: Sequence[str], qa: dict) -> tuple[Inputs, dict]:
    """The essay words the tasks need (--haystack, else the noise lines); and what of the inputs the
    results depend on."""
    essay = ()
    about = {"haystack": None, "haystack_sha256": None,
             "qa_data": {k: {"path": d.path, "sha256": d.sha256} for k, d in sorted(qa.items())}}
    if any(TASKS[n].needs_essay for n in names):
        if c.haystack is None:
            essay, about["haystack"] = niah.essay_words(niah.NOISE), NOISE_ESSAY
        else:
            text = read_haystack(c.haystack)
            essay = niah.essay_words(text)
            if not any(essay):
                raise ValueError(f"haystack {c.haystack} is empty (no text)")
            about["haystack"] = str(c.haystack)
            about["haystack_sha256"] = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return Inputs(essay, qa), about


def run_config(c: RulerConfig, names: Sequence[str], about: dict) -> dict:
    """What the results depend on (config.json): a rerun with the same resumes."""
    return {"model": str(pathlib.Path(c.model).resolve()), "tasks": list(names), "lengths": [int(n) for n in c.lengths],
            "samples": c.samples, "seed": c.seed, "max_new_tokens": c.max_new_tokens, "dtype": c.dtype,
            "kv_cache_dtype": c.kv_cache_dtype, **about, "wonderwords": _version("wonderwords"),
            **({"quantize": c.quantize} if c.quantize else {})}


def run(c: RulerConfig) -> dict:
    """The whole benchmark; returns the summary (also in OUT/summary.json)."""
    from glm_jax.tokenizer import Tokenizer

    c.check()
    out = pathlib.Path(c.out)
    config = model_config(c.model)
    if max(c.lengths) > config.max_seq_len:
        raise ValueError(f"context length {max(c.lengths):,} is above the model's context ({config.max_seq_len:,} "
                         f"tokens)")
    qa = load_qa_files(c.qa_data)
    names = parse_tasks(c.tasks, qa)
    tokenizer = Tokenizer.from_file(c.model)
    inputs, about = load_inputs(c, names, qa)
    for name in names:     # a length too short for a template shows now, before OUT is touched
        make_sample(tokenizer, name, min(c.lengths), 0, inputs, c.seed, c.max_new_tokens)
    settings = run_config(c, names, about)
    check_out(out, settings, c.force)
    done = set() if c.force else {result_key(r) for r in read_results(out / RESULTS)}
    cells = grid(names, c.lengths, c.samples)
    todo = [cell for cell in cells if cell not in done]
    log(f"ruler: {c.model}; {len(names)} tasks x {len(c.lengths)} lengths x {c.samples} samples = {len(cells)}, "
        f"{len(cells) - len(todo)} done; batches of {c.batch_size}; results in {out / RESULTS}", c.progress)
    if about["haystack"] == NOISE_ESSAY:
        log(f"ruler: essay tasks use the {NOISE_ESSAY}", c.progress)
    model = None
    if todo:
        model = load_model(c)
    rows = start_out(out, settings, c.force)
    try:
        for batch in batches(todo, c):
            run_batch(c, model, tokenizer, inputs, batch, out, rows, len(cells))
    finally:
        summary = write_summary(out, rows, settings)
    return summary


def batches(todo: Sequence[tuple[str, int, int]], c: RulerConfig):
    """Rows run together: the same length and generation budget, at most --batch-size of them."""
    def group(cell):
        return cell[1], new_tokens(TASKS[cell[0]], c.max_new_tokens)

    for _, cells in itertools.groupby(sorted(todo, key=lambda cell: (*group(cell), cell)), key=group):
        cells = list(cells)
        for i in range(0, len(cells), c.batch_size):
            yield cells[i:i + c.batch_size]


def run_batch(c: RulerConfig, model, tokenizer, inputs: Inputs, batch, out: pathlib.Path, rows: list, total: int):
    samples = [make_sample(tokenizer, t, n, s, inputs, c.seed, c.max_new_tokens) for t, n, s in batch]
    budget = new_tokens(TASKS[batch[0][0]], c.max_new_tokens)
    start = time.perf_counter()
    outputs = model.generate([s.ids for s in samples], max_new_tokens=budget, temperature=0,
                             progress=c.progress and max(len(s.ids) for s in samples) >= 65536)
    seconds = time.perf_counter() - start
    for (task, length, sample), s, ids in zip(batch, samples, outputs):
        response = tokenizer.decode(ids, skip_special_tokens=True)
        row = {"task": task, "length": length, "sample": sample, "prompt_tokens": len(s.ids),
               "answers": list(s.rendered.answers), "response": response,
               "score": score(TASKS[task].metric, response, s.rendered.answers),
               "depths": [round(d, 2) for d in s.rendered.depths], "haystack_units": s.units,
               "max_new_tokens": budget, "new_tokens": len(ids), "batch_rows": len(batch),
               "batch_seconds": round(seconds, 4), "seconds": round(seconds / len(batch), 4)}
        append_result(out / RESULTS, row)
        rows.append(row)
    mean = sum(r["score"] for r in rows[-len(batch):]) / len(batch)
    log(f"ruler {len(rows)}/{total} | length {batch[0][1]:,} | {len(batch)} rows "
        f"({', '.join(sorted({t for t, _, _ in batch}))}) | {seconds:.1f} s | mean score {mean:.2f}", c.progress)
