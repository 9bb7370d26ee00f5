"""HF folder -> glm-jax model folder (Orbax), and back.

A glm-jax model folder holds:
  config.json            the GLMConfig (model_type "glm_jax"), dtype = the stored weights' dtype
  params/                the Orbax checkpoint, one array per parameter (flat names nested on ".")
  hf_source.json         what `export` needs to rebuild the HF folder exactly: layout, original
                         config.json, tensor -> file map and each file's safetensors metadata
  hf_extra.safetensors   tensors the HF folder carries that the model never uses (inv_freq)
  the source's other files   tokenizer.model, tokenizer_config.json, generation_config.json, remote
                         code (modeling_*.py, configuration_*.py), README, licence: every file but the
                         weights, their index, config.json, hidden files and files over 64 MiB
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pathlib
import shutil
import sys
from typing import Iterator

import numpy as np

from glm_jax.config import GLMConfig
from glm_jax.options import DTYPES, Quantization
from glm_jax.params import PARAMS_DIR, load_params, param_specs, save_params, signals_held, stored_arrays
from glm_jax.progress import Progress

from .hf import ConversionError, HFCheckpoint, default_shards, hf_tensor_from, iter_params, layout_of, write_hf
from .layout import CHATGLM, hf_tensors

SIDE_FILES = ("tokenizer.model", "tokenizer_config.json", "generation_config.json")   # folders of old converts
SOURCE, EXTRA = "hf_source.json", "hf_extra.safetensors"
WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".index.json")
CARRIED_MAX_BYTES = 64 << 20


def np_dtype(name: str):
    import ml_dtypes

    if name not in DTYPES:
        raise ConversionError(f"unsupported dtype {name!r}; choose from {', '.join(DTYPES)}")
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(np.float32)


def open_hf(src: str | pathlib.Path) -> tuple[GLMConfig, str, HFCheckpoint, list]:
    """Reads and validates an HF folder completely (config and every tensor's name and shape)."""
    src = pathlib.Path(src)
    if not src.is_dir():
        raise ConversionError(f"{src}: not a folder")
    layout = layout_of(src)
    config = GLMConfig.from_hf(src)
    ckpt = HFCheckpoint(src)
    plan = ckpt.check(config, layout)
    return config, layout, ckpt, plan


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:    # another user's process
        pass
    return True


def _remove_stale(dst: pathlib.Path) -> None:
    """Removes the temporary siblings of dst that a killed run left (their process is gone), saying so:
    an unfinished .DST.tmp-PID, or the previous DST (.DST.old-PID), put back when DST is missing."""
    name = glob.escape(dst.name)
    stale = [p for kind in ("tmp", "old") for p in sorted(dst.parent.glob(f".{name}.{kind}-*"))
             if p.name.rpartition("-")[2].isdigit() and not _alive(int(p.name.rpartition("-")[2]))]
    for path in stale:
        if path.name.startswith(f".{dst.name}.old-") and not dst.exists():
            path.rename(dst)
            print(f"restored {dst} from {path.name}, left by an interrupted run", file=sys.stderr)
        else:
            shutil.rmtree(path, ignore_errors=True)
            print(f"removed {path}, left by an interrupted run", file=sys.stderr)


@contextlib.contextmanager
def atomic_folder(dst: pathlib.Path, force: bool) -> Iterator[pathlib.Path]:
    """Yields a temporary sibling of dst; renames it to dst only if the block succeeds. An exception
    (KeyboardInterrupt too) removes it and leaves dst as it was."""
    _remove_stale(dst)
    if dst.exists() and not force:
        raise ConversionError(f"{dst} already exists (use --force to replace it)")
    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}"
    old = dst.parent / f".{dst.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if dst.exists():
            dst.rename(old)
        tmp.rename(dst)
    finally:
        if old.exists() and not dst.exists():   # interrupted between the two renames
            old.rename(dst)
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)


def _groups(params: Iterator[tuple[str, np.ndarray]], progress: Progress) -> Iterator[dict]:
    """Batches parameters into embed / one layer each / head groups, for incremental saving."""
    group, key = {}, None
    for name, array in params:
        parts = name.split(".")
        k = ".".join(parts[:2]) if parts[0] == "layers" else ("embed" if parts[0] == "embed" else "head")
        if group and k != key:
            yield group
            group = {}
        group[name], key = array, k
        progress.update(array.nbytes)
    if group:
        yield group


def convert(src: str | pathlib.Path, dst: str | pathlib.Path, *, dtype: str | None = None,
            quantize: str | None = None, force: bool = False, progress: bool = True) -> GLMConfig:
    """Converts an untouched HF folder (either layout) into a glm-jax model folder; with `quantize`
    ("int8", "int4", "KIND:G") the layers' projections are stored quantized (glm_jax/quantize.py),
    the rest in `dtype`."""
    from glm_jax.quantize import quantize_stream, stored_specs

    src, dst = pathlib.Path(src), pathlib.Path(dst)
    q = Quantization.parse(quantize)
    config, layout, ckpt, plan = open_hf(src)
    dtype = dtype or config.dtype
    target = np_dtype(dtype)
    specs = param_specs(config, target)
    stored = stored_specs(specs, q)               # a group that does not divide a width stops here
    total = sum(int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize for s in stored.values())
    with atomic_folder(dst, force) as tmp:
        config.replace(dtype=dtype).save(tmp / "config.json")
        with Progress(f"convert {src.name}", total, enabled=progress) as bar:
            save_params(tmp / PARAMS_DIR, _groups(quantize_stream(iter_params(ckpt, plan, target), specs, q), bar))
        _remember_hf(src, tmp, layout, ckpt, config.dtype)
    return config


def carried_files(src: pathlib.Path) -> list[str]:
    """The files of an HF folder that travel with the model, to be given back by `export`."""
    return sorted(p.name for p in src.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.name not in ("config.json", SOURCE)
                  and not p.name.endswith(WEIGHT_FILES) and p.stat().st_size <= CARRIED_MAX_BYTES)


def _remember_hf(src: pathlib.Path, dst: pathlib.Path, layout: str, ckpt: HFCheckpoint, dtype: str) -> None:
    ignored = ckpt.ignored(layout)
    if ignored:
        from safetensors.flax import save_file
        import jax.numpy as jnp

        save_file({n: jnp.asarray(ckpt.read(n)) for n in ignored}, os.fspath(dst / EXTRA))
    files = carried_files(src)
    source = {"layout": layout, "dtype": dtype, "config": json.loads((src / "config.json").read_text()),
              "weight_map": ckpt.weight_map, "metadata": ckpt.metadata, "files": files}
    (dst / SOURCE).write_text(json.dumps(source, indent=1) + "\n")
    for name in files:
        shutil.copy2(src / name, dst / name)


def _carried(model_dir: pathlib.Path, source: dict | None) -> list[str]:
    files = source["files"] if source and "files" in source else SIDE_FILES
    return [name for name in files if (model_dir / name).is_file()]


def remember_source(src: str | pathlib.Path, dst: str | pathlib.Path) -> None:
    """Gives the glm-jax folder dst (a fine-tuned model) what `export` needs to write src's HF folder
    again (its layout, config, shards, metadata and other files): src is that HF folder, or a glm-jax
    folder (whose record, if any, is copied)."""
    src, dst = pathlib.Path(src), pathlib.Path(dst)
    if src.resolve() == dst.resolve():
        return
    if json.loads((src / "config.json").read_text()).get("model_type") != "glm_jax":
        layout = layout_of(src)
        _remember_hf(src, dst, layout, HFCheckpoint(src), GLMConfig.from_hf(src).dtype)
        return
    source = json.loads((src / SOURCE).read_text()) if (src / SOURCE).is_file() else None
    for name in [SOURCE, EXTRA, *_carried(src, source)]:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def export(model_dir: str | pathlib.Path, out: str | pathlib.Path, *, force: bool = False,
           layout: str | None = None, progress: bool = True) -> None:
    """Writes a glm-jax model folder back as an HF folder.

    With the hf_source.json the converter (or a fine-tuning run) left, the result is the source folder
    again (same layout, names, shards, metadata and bytes when the dtype was kept, and its other
    files); without it, the original `chatglm` layout (or `layout`) with a generated config and
    shards of about 2 GB. A folder stored quantized (`convert --quantize`) is written dequantized:
    a float model in the config's dtype that carries the quantization's rounding.
    """
    import jax

    from glm_jax.quantize import as_float, assemble, stored_quantization, stored_specs

    model_dir, out = pathlib.Path(model_dir), pathlib.Path(out)
    config = GLMConfig.load(model_dir / "config.json")
    source = json.loads((model_dir / SOURCE).read_text()) if (model_dir / SOURCE).is_file() else None
    layout = layout or (source["layout"] if source else CHATGLM)
    keep_source = source is not None and source["layout"] == layout and source["dtype"] == config.dtype
    plan = hf_tensors(config, layout)
    itemsize = np_dtype(config.dtype).itemsize
    if keep_source:
        weight_map, metadata, hf_cfg = source["weight_map"], source["metadata"], source["config"]
    else:
        total = sum(int(np.prod(t.shape)) for t in plan) * itemsize
        weight_map = default_shards(plan, itemsize, max(1, round(total / 2e9)))
        metadata, hf_cfg = None, None
    extra = {}
    if keep_source and (model_dir / EXTRA).is_file():
        from safetensors import safe_open

        with safe_open(model_dir / EXTRA, framework="flax") as f:
            extra = {k: np.asarray(f.get_tensor(k)) for k in f.keys()}
    weight_map = {k: v for k, v in weight_map.items() if k in extra or k in {t.name for t in plan}}

    specs = param_specs(config, np_dtype(config.dtype))
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    path = model_dir / PARAMS_DIR
    stored = stored_specs(specs, stored_quantization(stored_arrays(path), specs))   # quantized: dequantized

    def tensor(t):  # restores just the parameters of one HF tensor (Orbax's reads swallow an interrupt)
        names = {p.param for p in t.parts}
        wanted = {n: s for n, s in stored.items() if n in names or n.rpartition(".")[0] in names}
        with signals_held():
            arrays = assemble(load_params(path, wanted, {n: cpu for n in wanted}))
        return hf_tensor_from(t, lambda n: np.asarray(as_float(arrays[n], specs[n].dtype)))

    total = sum(int(np.prod(t.shape)) for t in plan) * itemsize
    with atomic_folder(out, force) as tmp:
        with Progress(f"export {model_dir.name}", total, enabled=progress) as bar:
            write_hf(tmp, config, layout, tensor, weight_map, extra=extra, metadata=metadata,
                     hf_config_dict=hf_cfg, progress=bar.update)
        for name in _carried(model_dir, source):
            shutil.copy2(model_dir / name, tmp / name)
