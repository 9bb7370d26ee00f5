"""OUT: config.json, results.jsonl (a line per (task, length, sample)), summary.json (task x length
scores, the average per length, RULER's weighted averages and effective length), heatmap.png and the
printed table. Scores are RULER's: 0-100, the mean of the samples' metric."""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from glm_jax.evals import rundir
from glm_jax.evals.picture import plot_grid
from glm_jax.evals.rundir import CONFIG, RESULTS, SUMMARY

HEATMAP = "heatmap.png"
OWN_FILES = (CONFIG, RESULTS, SUMMARY, HEATMAP)
# RULER's bar for the effective length: Llama-2-7B's score at 4K (the paper's Table 3).
THRESHOLD = 85.6


def result_key(row: dict) -> tuple[str, int, int]:
    return str(row["task"]), int(row["length"]), int(row["sample"])


def read_results(path: pathlib.Path, truncate: bool = False) -> list[dict]:
    return rundir.read_results(path, result_key, truncate)


def check_out(out: pathlib.Path, config: dict, force: bool) -> None:
    rundir.check_out(out, config, force, "ruler")


def start_out(out: pathlib.Path, config: dict, force: bool) -> list[dict]:
    return rundir.start_out(out, config, force, OWN_FILES, result_key)


def weighted_averages(scores: Sequence[float]) -> tuple[float, float]:
    """RULER's wAvg (inc) and wAvg (dec): weights 1..L rising with the length, and L..1 falling."""
    x = np.asarray(scores, np.float64)
    inc = np.arange(1, len(x) + 1, dtype=np.float64)
    return float(x @ inc / inc.sum()), float(x @ inc[::-1] / inc.sum())


def effective_length(lengths: Sequence[int], scores: Sequence[float | None], threshold: float = THRESHOLD):
    """The longest length up to which every average exceeds the threshold (None: not even the first)."""
    best = None
    for n, s in zip(lengths, scores):
        if s is None or s <= threshold:
            break
        best = n
    return best


def summarize(rows: Sequence[dict], config: dict) -> dict[str, Any]:
    tasks, lengths = config["tasks"], config["lengths"]
    total = len(tasks) * len(lengths) * config["samples"]

    def mean(group):
        return round(100 * float(np.mean([r["score"] for r in group])), 2) if group else None

    cells = {t: {str(n): mean([r for r in rows if r["task"] == t and r["length"] == n]) for n in lengths}
             for t in tasks}
    counts = {t: {str(n): sum(1 for r in rows if r["task"] == t and r["length"] == n) for n in lengths} for t in tasks}
    # A length's average counts only tasks whose cell is complete, so a partial run never mixes tasks.
    per_length = {}
    for n in lengths:
        done = [cells[t][str(n)] for t in tasks if counts[t][str(n)] >= config["samples"]]
        per_length[str(n)] = round(float(np.mean(done)), 2) if len(done) == len(tasks) else None
    averages = [per_length[str(n)] for n in lengths]
    complete = all(a is not None for a in averages)
    summary = {"model": config["model"], "tasks": tasks, "lengths": lengths, "samples": config["samples"],
               "haystack": config["haystack"], "prompts": total, "done": len(rows), "complete": len(rows) >= total,
               "scores": cells, "average_by_length": per_length,
               "average": round(float(np.mean(averages)), 2) if complete else None,
               "weighted_average_inc": None, "weighted_average_dec": None,
               "effective_length": effective_length(lengths, averages), "threshold": THRESHOLD}
    if complete:
        inc, dec = weighted_averages(averages)
        summary["weighted_average_inc"], summary["weighted_average_dec"] = round(inc, 2), round(dec, 2)
    seconds = [r["seconds"] for r in rows if r.get("seconds") is not None]
    summary["seconds"] = round(float(np.sum(seconds)), 3) if seconds else None
    return summary


def score_grid(summary: dict) -> np.ndarray:
    """[task + the average, length] scores (NaN where there are none yet)."""
    rows = [[summary["scores"][t][str(n)] for n in summary["lengths"]] for t in summary["tasks"]]
    rows.append([summary["average_by_length"][str(n)] for n in summary["lengths"]])
    return np.array([[np.nan if v is None else v for v in row] for row in rows], np.float64)


def plot_heatmap(summary: dict, png: pathlib.Path) -> str | None:
    mean = summary["average"]
    return plot_grid(score_grid(summary), list(summary["tasks"]) + ["average"],
                     [f"{n:,}" for n in summary["lengths"]], xlabel="context length (tokens)", ylabel="task",
                     title=f"{pathlib.Path(summary['model']).name}: RULER\n"
                           f"average {'-' if mean is None else f'{mean:.1f}'} ({summary['done']}/{summary['prompts']} "
                           f"samples)", png=png, scale=100)


def write_summary(out: pathlib.Path, rows: Sequence[dict], config: dict) -> dict:
    return rundir.write_summary(out, rows, config, summarize, plot_heatmap, HEATMAP)


def format_summary(summary: dict) -> str:
    lengths = summary["lengths"]
    width = max(8, *(len(f"{n:,}") + 2 for n in lengths))
    name = max(16, *(len(t) + 1 for t in summary["tasks"]))
    lines = [f"RULER: {summary['model']}", f"essay haystack: {summary['haystack'] or 'none (no essay task)'}",
             f"{'task':<{name}}" + "".join(f"{n:>{width},}" for n in lengths)]
    for task, row in zip(list(summary["tasks"]) + ["average"], score_grid(summary)):
        lines.append(f"{task:<{name}}" + "".join(f"{'-' if np.isnan(x) else f'{x:.1f}':>{width}}" for x in row))
    if summary["average"] is not None:
        lines.append(f"average {summary['average']:.1f}, wAvg (inc) {summary['weighted_average_inc']:.1f}, "
                     f"wAvg (dec) {summary['weighted_average_dec']:.1f}")
    effective = summary["effective_length"]
    lines.append(f"effective length (average > {summary['threshold']}): "
                 f"{'none' if effective is None else f'{effective:,}'}; {summary['done']}/{summary['prompts']} "
                 f"samples" + ("" if summary["complete"] else " (incomplete: rerun the same command to finish)"))
    lines.append(f"results: {summary['results']}; heatmap: {summary['heatmap']}")
    return "\n".join(lines)
