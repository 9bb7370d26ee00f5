"""Reading and writing Hugging Face safetensors folders, one tensor at a time."""

from __future__ import annotations

import json
import os
import pathlib
import struct
from typing import Callable, Iterator, Mapping

import ml_dtypes
import numpy as np

from glm_jax.config import GLMConfig

from .layout import CHATGLM, GLM, IGNORED, HFTensor, hf_config, hf_tensors

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
DTYPES = {"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32, "F64": np.float64}


class ConversionError(ValueError):
    """Bad input to the converter: the message names the file or tensor at fault."""


def layout_of(folder: pathlib.Path) -> str:
    config = folder / "config.json"
    if not config.is_file():
        raise ConversionError(f"{folder}: no config.json")
    model_type = json.loads(config.read_text()).get("model_type")
    if model_type not in (CHATGLM, GLM):
        raise ConversionError(f"{config}: unknown model_type {model_type!r} (expected 'chatglm' or 'glm')")
    return model_type


def _header(path: pathlib.Path) -> tuple[int, dict]:
    """Parses and checks a safetensors header: every tensor's bytes must lie inside the file.
    Returns (offset of the data section, header)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(n))
        end = 8 + n + max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path}: corrupt safetensors file ({e})") from None
    if end > size:
        raise ConversionError(f"{path}: truncated safetensors file ({size} bytes, header needs {end})")
    return 8 + n, header


class HFCheckpoint:
    """The tensors of an HF folder (single file or sharded with an index); reads slices lazily."""

    def __init__(self, folder: str | pathlib.Path):
        self.folder = pathlib.Path(folder)
        index = self.folder / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ConversionError(f"{index}: invalid index ({e})") from None
        elif (self.folder / SINGLE).is_file():
            weight_map = None
        else:
            raise ConversionError(f"{self.folder}: neither {INDEX} nor {SINGLE} found")
        files = sorted(set(weight_map.values())) if weight_map else [SINGLE]
        for name in files:
            if not (self.folder / name).is_file():
                raise ConversionError(f"{index}: names missing file {name}")
        parsed = {name: _header(self.folder / name) for name in files}
        self.data_start = {name: start for name, (start, _) in parsed.items()}
        self.metadata = {name: h.get("__metadata__") for name, (_, h) in parsed.items()}
        self.entries: dict[str, tuple[str, dict]] = {}
        for file, (_, header) in parsed.items():
            for tensor, entry in header.items():
                if tensor != "__metadata__":
                    self.entries[tensor] = (file, entry)
        if weight_map:
            for tensor, file in weight_map.items():
                if self.entries.get(tensor, (file,))[0] != file:
                    raise ConversionError(f"{index}: {tensor} is not in {file}")
                if tensor not in self.entries:
                    raise ConversionError(f"{index}: {tensor} is missing from {file}")
        self.weight_map = {t: f for t, (f, _) in self.entries.items()}

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name][1]["shape"])

    def dtype(self, name: str):
        code = self.entries[name][1]["dtype"]
        if code not in DTYPES:
            raise ConversionError(f"{name}: unsupported dtype {code}")
        return np.dtype(DTYPES[code])

    def read(self, name: str, start: int | None = None, stop: int | None = None) -> np.ndarray:
        """The tensor, or rows [start, stop) of it, as numpy: one positioned read of just those
        bytes (rows are contiguous), into memory this process owns. No mmap, so resident memory
        stays one tensor, not the files touched so far."""
        file, entry = self.entries[name]
        shape, dtype = tuple(entry["shape"]), self.dtype(name)
        begin, end = entry["data_offsets"]
        if int(np.prod(shape)) * dtype.itemsize != end - begin:
            raise ConversionError(f"{self.folder / file}: {name} has {end - begin} bytes for shape {list(shape)}")
        start, stop = (0, shape[0]) if start is None else (start, stop)
        row = int(np.prod(shape[1:])) * dtype.itemsize
        out = np.empty((stop - start, *shape[1:]), dtype)
        with open(self.folder / file, "rb") as f:
            f.seek(self.data_start[file] + begin + start * row)
            got = f.readinto(out.reshape(-1).view(np.uint8))
        if got != out.nbytes:
            raise ConversionError(f"{self.folder / file}: cannot read {name} (file ended early)")
        return out

    def check(self, config: GLMConfig, layout: str) -> list[HFTensor]:
        """Every expected tensor present with the shape the config implies, nothing unexpected."""
        plan = hf_tensors(config, layout)
        expected = {t.name for t in plan}
        for t in plan:
            if t.name not in self.entries:
                raise ConversionError(f"{self.folder}: missing tensor {t.name}")
            if self.shape(t.name) != t.shape:
                raise ConversionError(
                    f"{t.name}: shape {list(self.shape(t.name))} in the weights contradicts "
                    f"config.json, which implies {list(t.shape)}")
            self.dtype(t.name)
        unexpected = sorted(set(self.entries) - expected - set(IGNORED[layout]))
        if unexpected:
            raise ConversionError(f"{self.folder}: unexpected tensor {unexpected[0]}"
                                  + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
        return plan

    def ignored(self, layout: str) -> list[str]:
        return [name for name in IGNORED[layout] if name in self.entries]


def iter_params(ckpt: HFCheckpoint, plan: list[HFTensor], dtype) -> Iterator[tuple[str, np.ndarray]]:
    """(glm-jax name, array in dtype), one parameter at a time, in checkpoint order."""
    dtype = np.dtype(dtype)
    for tensor in plan:
        row = 0
        for part in tensor.parts:
            if len(tensor.parts) == 1:
                block = ckpt.read(tensor.name)
            else:
                block = ckpt.read(tensor.name, row, row + part.rows)
            row += part.rows
            yield part.param, part.to_param(block).astype(dtype, copy=False)


def hf_tensor_from(tensor: HFTensor, param: Callable[[str], np.ndarray]) -> np.ndarray:
    """Assembles one HF tensor from glm-jax parameters."""
    blocks = [np.asarray(part.to_hf(param(part.param))) for part in tensor.parts]
    return blocks[0] if len(blocks) == 1 else np.concatenate(blocks, axis=0)


def default_shards(plan: list[HFTensor], itemsize: int, num_shards: int) -> dict[str, str]:
    """Splits tensors, in order, into about num_shards files of about equal size."""
    sizes = [int(np.prod(t.shape)) * itemsize for t in plan]
    budget = sum(sizes) / num_shards
    shard_of, start = [], 0
    for size in sizes:  # a tensor goes to the shard holding its midpoint
        shard_of.append(min(num_shards - 1, int((start + size / 2) // budget)))
        start += size
    used = sorted(set(shard_of))
    if len(used) == 1:
        return {t.name: SINGLE for t in plan}
    n = len(used)
    return {t.name: f"model-{used.index(i) + 1:05d}-of-{n:05d}.safetensors" for t, i in zip(plan, shard_of)}


def write_hf(folder: pathlib.Path, config: GLMConfig, layout: str, tensor: Callable[[HFTensor], np.ndarray],
             weight_map: Mapping[str, str], *, extra: Mapping[str, np.ndarray] | None = None,
             metadata: Mapping[str, dict | None] | None = None, hf_config_dict: dict | None = None,
             progress: Callable[[int], None] | None = None) -> None:
    """Writes an HF folder one shard at a time: config.json, safetensors shards, the index."""
    import jax.numpy as jnp
    from safetensors.flax import save_file

    plan = {t.name: t for t in hf_tensors(config, layout)}
    extra = dict(extra or {})
    by_file: dict[str, list[str]] = {}
    for name, file in weight_map.items():
        by_file.setdefault(file, []).append(name)
    folder.mkdir(parents=True, exist_ok=True)
    total = 0
    for file, names in sorted(by_file.items()):
        arrays = {}
        for name in names:
            arrays[name] = extra[name] if name in extra else tensor(plan[name])
            total += arrays[name].nbytes
        meta = (metadata or {}).get(file, {"format": "pt"})
        save_file({k: jnp.asarray(v) for k, v in arrays.items()}, os.fspath(folder / file), metadata=meta)
        if progress:
            progress(sum(a.nbytes for a in arrays.values()))
        del arrays
    if len(by_file) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(weight_map)}
        (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    (folder / "config.json").write_text(json.dumps(hf_config_dict or hf_config(config, layout), indent=2) + "\n")
