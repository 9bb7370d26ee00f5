"""A minimal progress bar on stderr (no dependency): `with Progress("convert", total) as p: p.update(n)`."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, desc: str, total: float, *, unit: str = "GB", scale: float = 1e9, enabled: bool = True):
        self.desc, self.total, self.unit, self.scale, self.enabled = desc, total, unit, scale, enabled
        self.done, self.start, self._last = 0.0, time.perf_counter(), 0.0

    def __enter__(self) -> "Progress":
        return self

    def update(self, n: float) -> None:
        self.done += n
        now = time.perf_counter()
        if self.enabled and (now - self._last > 0.2 or self.done >= self.total):
            self._last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        frac = self.done / self.total if self.total else 1.0
        bar = "#" * int(30 * frac)
        rate = self.done / self.scale / max(now - self.start, 1e-9)
        sys.stderr.write(f"\r{self.desc} [{bar:<30}] {100 * frac:5.1f}% "
                         f"{self.done / self.scale:.2f}/{self.total / self.scale:.2f} {self.unit} "
                         f"{rate:.2f} {self.unit}/s")
        sys.stderr.flush()

    def __exit__(self, *exc) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()
