"""Sampling defaults and stop ids of a model folder: its `generation_config.json`."""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

GENERATION_CONFIG = "generation_config.json"


@dataclass(frozen=True)
class GenerationDefaults:
    """Stop ids and sampling defaults: the one source `Model.generate` and the CLI take them from.
    The class defaults are glm-4-9b-chat-1m's published ones.

    `top_k` is absent from the published generation_config.json files; transformers then applies
    its own default of 50, which is what the original's sampling used.
    """

    stop_ids: tuple[int, ...] = (151329, 151336, 151338)  # <|endoftext|>, <|user|>, <|observation|>
    pad_id: int = 151329
    do_sample: bool = True
    temperature: float = 0.8
    top_p: float = 0.8
    top_k: int = 50

    def sampling(self, temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                 stop_ids: Sequence[int] | None = None) -> dict[str, Any]:
        """A generation's temperature, top_p, top_k and stop_ids: each one given, else these defaults.
        do_sample=False (transformers' switch for greedy search) makes the default temperature 0."""
        return {"temperature": (self.temperature if self.do_sample else 0.0) if temperature is None else temperature,
                "top_p": self.top_p if top_p is None else top_p,
                "top_k": self.top_k if top_k is None else top_k,
                "stop_ids": self.stop_ids if stop_ids is None else tuple(stop_ids)}

    @classmethod
    def from_folder(cls, folder: str | pathlib.Path) -> GenerationDefaults:
        """Reads `generation_config.json` in `folder`; the class defaults where it or a key is absent."""
        path = pathlib.Path(folder) / GENERATION_CONFIG
        if not path.is_file():
            return cls()
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: not a readable JSON file ({e})") from None
        if not isinstance(config, dict):
            raise ValueError(f"{path}: expected a JSON object")
        defaults = cls()

        def value(key: str, default: Any, kind: type) -> Any:  # null counts as absent
            raw = config.get(key)
            return default if raw is None else kind(raw)

        stop = config.get("eos_token_id")
        stop_ids = defaults.stop_ids if stop is None else tuple(stop) if isinstance(stop, list) else (stop,)
        if not stop_ids or not all(type(i) is int for i in stop_ids):
            raise ValueError(f"{path}: eos_token_id must be an int or a list of ints, got {stop!r}")
        try:
            return cls(
                stop_ids=stop_ids,
                pad_id=value("pad_token_id", defaults.pad_id, int),
                do_sample=value("do_sample", defaults.do_sample, bool),
                temperature=value("temperature", defaults.temperature, float),
                top_p=value("top_p", defaults.top_p, float),
                top_k=value("top_k", defaults.top_k, int),
            )
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: bad value ({e})") from None
