"""An evaluation's OUT folder: config.json (what a rerun must match to resume), results.jsonl
(appended and fsynced line by line, read back after a kill) and files written atomically
(a temporary sibling, then a rename). Shared by the evaluations (`needle`, `ruler`)."""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

CONFIG, RESULTS, SUMMARY = "config.json", "results.jsonl", "summary.json"


def write_atomic(path: pathlib.Path, data: bytes | str) -> None:
    """Writes path whole or not at all: a temporary file beside it, then a rename."""
    path = pathlib.Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: pathlib.Path, value: Any) -> None:
    write_atomic(path, json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def read_results(path: pathlib.Path, key: Callable[[dict], tuple], truncate: bool = False) -> list[dict]:
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
            k = key(row)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{path}:{lineno}: not a result line ({e}); --force starts afresh") from None
        if k not in seen:
            seen.add(k)
            rows.append(row)
    return rows


def check_out(out: pathlib.Path, config: dict, force: bool, kind: str) -> None:
    """Refuses an OUT that holds another run (other arguments, or files that are not a `kind` run's)
    unless forced. Writes nothing."""
    out = pathlib.Path(out)
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
            raise ValueError(f"{saved} is not a {kind} run's config; --force starts afresh")
        if old != config:
            changed = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
            raise ValueError(f"{out} holds results of other arguments ({', '.join(changed)}); "
                             f"--force starts afresh")
    elif any(out.iterdir()):
        raise ValueError(f"{out} is not empty and holds no {kind} run ({CONFIG}); --force writes there anyway")


def start_out(out: pathlib.Path, config: dict, force: bool, own_files: Sequence[str],
              key: Callable[[dict], tuple]) -> list[dict]:
    """Makes OUT ready (config.json; with force, the run's own files removed first); the finished rows."""
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    saved = out / CONFIG
    if force or not saved.is_file():
        for name in own_files:
            (out / name).unlink(missing_ok=True)
        write_json(saved, config)
    return read_results(out / RESULTS, key, truncate=True)


def append_result(path: pathlib.Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_summary(out: pathlib.Path, rows: Sequence[dict], config: dict, summarize: Callable, plot: Callable,
                  heatmap: str = "heatmap.png") -> dict:
    """An evaluation's summary.json from its rows (`summarize(rows, config)`), with the heatmap
    `plot(summary, png)` draws when there are rows; returns the summary."""
    summary = summarize(rows, config)
    summary["heatmap"] = plot(summary, out / heatmap) if rows else None
    summary["results"] = str(out / RESULTS)
    write_json(out / SUMMARY, summary)
    return summary
