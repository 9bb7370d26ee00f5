"""OUT: scoring, config.json (what a rerun must match to resume), results.jsonl (appended, read back
after a kill), summary.json, heatmap.png and the printed table."""

from __future__ import annotations

import itertools
import json
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

CONFIG, RESULTS, SUMMARY, HEATMAP = "config.json", "results.jsonl", "summary.json", "heatmap.png"
OWN_FILES = (CONFIG, RESULTS, SUMMARY, HEATMAP)


def is_correct(answer: str, response: str) -> bool:
    """LWM's rule: the number appears in the response."""
    return str(answer) in response


def result_key(row: dict) -> tuple[int, float, int, int]:
    return int(row["context_length"]), float(row["depth_percent"]), int(row["sample"]), int(row.get("needle", 0))


def read_results(path: pathlib.Path, truncate: bool = False) -> list[dict]:
    """The finished lines of results.jsonl (a last line cut short by a kill is dropped, and with
    `truncate` removed from the file); the first of duplicate keys."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    complete = data[:data.rfind(b"\n") + 1]
    if truncate and len(complete) != len(data):
        path.write_bytes(complete)
    rows, seen = [], set()
    for lineno, line in enumerate(complete.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            key = result_key(row)
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{lineno}: not a result line ({e}); --force starts afresh") from None
        if key not in seen:
            seen.add(key)
            rows.append(row)
    return rows


def check_out(out: pathlib.Path, config: dict, force: bool) -> None:
    """Refuses an OUT that holds another run (other arguments, or files that are not a needle run's)
    unless forced. Writes nothing."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    if force or not out.is_dir():
        return
    saved = out / CONFIG
    if saved.is_file():
        try:
            old = json.loads(saved.read_text())
        except ValueError:
            old = None
        if not isinstance(old, dict):
            raise ValueError(f"{saved} is not a needle run's config; --force starts afresh")
        if old != config:
            changed = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
            raise ValueError(f"{out} holds results of other arguments ({', '.join(changed)}); "
                             f"--force starts afresh")
    elif any(out.iterdir()):
        raise ValueError(f"{out} is not empty and holds no needle run ({CONFIG}); --force writes there anyway")


def start_out(out: pathlib.Path, config: dict, force: bool) -> list[dict]:
    """Makes OUT ready (config.json; with force, this run's files removed first); the finished rows."""
    out.mkdir(parents=True, exist_ok=True)
    saved = out / CONFIG
    if force or not saved.is_file():
        for name in OWN_FILES:
            (out / name).unlink(missing_ok=True)
        saved.write_text(json.dumps(config, indent=2) + "\n")
    return read_results(out / RESULTS, truncate=True)


def append_result(path: pathlib.Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


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
    try:
        import matplotlib
    except ModuleNotFoundError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LinearSegmentedColormap

    grid = accuracy_grid(summary)
    cmap = LinearSegmentedColormap.from_list("needle", ["#F0496E", "#EBB839", "#0CD79F"]).with_extremes(bad="#d9d9d9")
    rows, cols = grid.shape
    fig, ax = plt.subplots(figsize=(min(18, max(6, 0.7 * cols + 3)), min(12, max(3.5, 0.45 * rows + 2))))
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0, vmax=1, aspect="auto")
    if rows * cols <= 400:
        for i, j in itertools.product(range(rows), range(cols)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(cols), [f"{n:,}" for n in summary["lengths"]], rotation=45 if cols > 8 else 0, ha="right"
                  if cols > 8 else "center")
    ax.set_yticks(range(rows), [f"{d:g}" for d in summary["depths"]])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("depth (%)")
    mean = summary["accuracy"]
    needles = f", {summary['multi_needle']} needles" if summary["multi_needle"] > 1 else ""
    ax.set_title(f"{pathlib.Path(summary['model']).name}: needle in a haystack{needles}\n"
                 f"mean {'-' if mean is None else f'{mean:.3f}'} ({summary['done']}/{summary['prompts']} prompts)")
    fig.colorbar(image, ax=ax, label="score")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return str(png)


def write_summary(out: pathlib.Path, rows: Sequence[dict], config: dict) -> dict:
    summary = summarize(rows, config)
    summary["heatmap"] = plot_heatmap(summary, out / HEATMAP) if rows else None
    summary["results"] = str(out / RESULTS)
    (out / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


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
