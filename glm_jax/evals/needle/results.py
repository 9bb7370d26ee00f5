"""OUT: scoring, config.json (what a rerun must match to resume), results.jsonl (appended, read back
after a kill), summary.json, heatmap.png and the printed table."""

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


def is_correct(answer: str, response: str) -> bool:
    """LWM's rule: the number appears in the response."""
    return str(answer) in response


def result_key(row: dict) -> tuple[int, float, int, int]:
    return int(row["context_length"]), float(row["depth_percent"]), int(row["sample"]), int(row.get("needle", 0))


def read_results(path: pathlib.Path, truncate: bool = False) -> list[dict]:
    """The finished lines of results.jsonl (see `rundir.read_results`)."""
    return rundir.read_results(path, result_key, truncate)


def check_out(out: pathlib.Path, config: dict, force: bool) -> None:
    """Refuses an OUT that holds another run unless forced. Writes nothing."""
    rundir.check_out(out, config, force, "needle")


def start_out(out: pathlib.Path, config: dict, force: bool) -> list[dict]:
    """Makes OUT ready (config.json; with force, this run's files removed first); the finished rows."""
    return rundir.start_out(out, config, force, OWN_FILES, result_key)


def summarize(rows: Sequence[dict], config: dict) -> dict[str, Any]:
    """Accuracy overall, per length, per depth, per cell (and per needle depth with several needles)."""
    lengths, depths = config["lengths"], config["depths"]
    total = len(lengths) * len(depths) * config["samples"] * config["multi_needle"]

    def mean(group):
        return float(np.mean([r["correct"] for r in group])) if group else None

    def by(key, values):
        return {f"{v:g}" if isinstance(v, float) else str(v): mean([r for r in rows if key(r) == v]) for v in values}

    cells = []
    for d in depths:
        for n in lengths:
            group = [r for r in rows if r["context_length"] == n and r["depth_percent"] == d]
            cells.append({"context_length": n, "depth_percent": d, "results": len(group), "accuracy": mean(group)})
    summary = {"model": config["model"], "haystack": config["haystack"], "lengths": lengths, "depths": depths,
               "samples": config["samples"], "multi_needle": config["multi_needle"],
               "prompts": total, "done": len(rows), "complete": len(rows) >= total,
               "accuracy": mean(rows), "by_length": by(lambda r: r["context_length"], lengths),
               "by_depth": by(lambda r: r["depth_percent"], depths), "cells": cells}
    if config["multi_needle"] > 1:
        needle_depths_ = sorted({r["needle_depth_percent"] for r in rows})
        summary["by_needle_depth"] = by(lambda r: r["needle_depth_percent"], needle_depths_)
    speeds = [r["prefill_tokens_per_s"] for r in rows if r.get("prefill_tokens_per_s")]
    summary["prefill_tokens_per_s_median"] = float(np.median(speeds)) if speeds else None
    return summary


def accuracy_grid(summary: dict) -> np.ndarray:
    """[depth, length] mean scores (NaN where a cell has no results yet)."""
    grid = np.full((len(summary["depths"]), len(summary["lengths"])), np.nan)
    for cell in summary["cells"]:
        if cell["accuracy"] is not None:
            grid[summary["depths"].index(cell["depth_percent"]),
                 summary["lengths"].index(cell["context_length"])] = cell["accuracy"]
    return grid


def plot_heatmap(summary: dict, png: pathlib.Path) -> str | None:
    """Depth (rows) x context length (columns), red (0) to green (1); None without matplotlib."""
    mean = summary["accuracy"]
    needles = f", {summary['multi_needle']} needles" if summary["multi_needle"] > 1 else ""
    return plot_grid(accuracy_grid(summary), [f"{d:g}" for d in summary["depths"]],
                     [f"{n:,}" for n in summary["lengths"]], xlabel="context length (tokens)", ylabel="depth (%)",
                     title=f"{pathlib.Path(summary['model']).name}: needle in a haystack{needles}\n"
                           f"mean {'-' if mean is None else f'{mean:.3f}'} ({summary['done']}/{summary['prompts']} "
                           f"prompts)", png=png)


def write_summary(out: pathlib.Path, rows: Sequence[dict], config: dict) -> dict:
    return rundir.write_summary(out, rows, config, summarize, plot_heatmap, HEATMAP)


def format_summary(summary: dict) -> str:
    lengths = summary["lengths"]
    width = max(7, *(len(f"{n:,}") + 1 for n in lengths))
    lines = [f"needle in a haystack: {summary['model']}",
             f"haystack: {summary['haystack']}",
             f"{'depth':>8}" + "".join(f"{n:>{width},}" for n in lengths)]
    grid = accuracy_grid(summary)
    for d, row in zip(summary["depths"], grid):
        lines.append(f"{d:>7g}%" + "".join(f"{'-' if np.isnan(x) else f'{x:.2f}':>{width}}" for x in row))
    lines.append(f"{'mean':>8}" + "".join(f"{'-' if v is None else f'{v:.2f}':>{width}}"
                                         for v in summary["by_length"].values()))
    mean = summary["accuracy"]
    lines.append(f"accuracy {'-' if mean is None else f'{mean:.3f}'} over {summary['done']}/{summary['prompts']} "
                 f"prompts" + ("" if summary["complete"] else " (incomplete: rerun the same command to finish)"))
    lines.append(f"results: {summary['results']}; heatmap: {summary['heatmap']}")
    return "\n".join(lines)
