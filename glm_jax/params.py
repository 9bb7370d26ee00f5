"""Flat parameter names ("layers.3.attn.q_proj") <-> the NNX state of a GLM, and the Orbax folder."""

from __future__ import annotations

import contextlib
import dataclasses
import pathlib
import signal
import threading
from typing import Any, Iterable, Mapping

import jax
from flax import nnx

from .config import GLMConfig
from .model import abstract_model

PARAMS_DIR = "params"  # the Orbax checkpoint inside a model folder


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    dtype: Any
    axes: tuple[str, ...]  # logical axis names, one per dim


def out_dims(spec: ParamSpec) -> int:
    """How many leading dims of a projection are its outputs: the heads with their head_dim
    (q/k/v), gate and up with the MLP dim (gate_up), else the first dim."""
    return 2 if len(spec.axes) == 3 and (spec.axes[1] == "head_dim" or spec.axes[0] == "gate_up") else 1


def _name(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def param_specs(config: GLMConfig, dtype) -> dict[str, ParamSpec]:
    """Every weight of the model, by flat name, in forward order of definition."""
    _, state = nnx.split(abstract_model(config, dtype))
    return {_name(path): ParamSpec(tuple(v.shape), v.dtype, tuple(v.get_metadata()["axes"]))
            for path, v in nnx.to_flat_state(state)}


def split_model(config: GLMConfig, dtype, arrays: Mapping[str, jax.Array]) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, state) of a GLM whose weights are `arrays` (flat names; every one required)."""
    graphdef, abstract = nnx.split(abstract_model(config, dtype))
    flat = []
    for path, var in nnx.to_flat_state(abstract):
        name = _name(path)
        if name not in arrays:
            raise ValueError(f"missing parameter {name}")
        flat.append((path, var.replace(arrays[name])))
    extra = sorted(set(arrays) - {_name(p) for p, _ in flat})
    if extra:
        raise ValueError(f"unexpected parameter(s): {', '.join(extra[:5])}")
    return graphdef, nnx.from_flat_state(flat)


# -- Orbax: the nested tree is {"embed": x, "layers": {"0": {"attn": {"q_proj": x, ...}}}, ...} --------

def nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for name, value in flat.items():
        *parents, leaf = name.split(".")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def unnest(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(unnest(value, name + "."))
        else:
            flat[name] = value
    return flat


def save_params(path: pathlib.Path, groups: Iterable[Mapping[str, Any]]) -> None:
    """Writes an Orbax checkpoint from groups of flat arrays. Each group is written in the
    background while the next is produced, so at most two groups are in memory at a time."""
    from orbax.checkpoint import v1 as ocp

    path = pathlib.Path(path).absolute()        # Orbax refuses relative paths
    pending = None
    try:
        for group in groups:
            if pending is not None:
                pending.result()
            with signals_held():
                pending = ocp.partial.save_async(path, nest(group))
    finally:  # also when producing a group failed: never leave a write running behind the caller
        if pending is not None:
            pending.result()
    with signals_held():
        ocp.partial.finalize(path)


@contextlib.contextmanager
def signals_held():
    """Delivers SIGINT and SIGTERM when the block ends (main thread only): an Orbax call cut in half
    leaves its background writes running, unawaited, past the caller's cleanup."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in held}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        for s in dict.fromkeys(caught):
            signal.raise_signal(s)


def stored_arrays(path: pathlib.Path) -> dict[str, Any]:
    """The arrays of an Orbax folder by flat name: metadata only (shape, dtype), nothing read."""
    from orbax.checkpoint import v1 as ocp

    return unnest(ocp.metadata(pathlib.Path(path).absolute()).metadata)


def load_params(path: pathlib.Path, specs: Mapping[str, ParamSpec],
                shardings: Mapping[str, jax.sharding.Sharding]) -> dict[str, jax.Array]:
    """Restores the arrays named in `specs` straight onto their target shardings (each device reads
    only its own part; arrays not named are not read)."""
    from orbax.checkpoint import v1 as ocp

    path = pathlib.Path(path).absolute()
    stored = stored_arrays(path)
    missing = sorted(set(specs) - set(stored))
    if missing:
        raise ValueError(f"{path}: checkpoint lacks {', '.join(missing[:5])}")
    for name, spec in specs.items():
        if tuple(stored[name].shape) != spec.shape:
            raise ValueError(f"{path}: {name} has shape {tuple(stored[name].shape)}, config implies {spec.shape}")
    abstract = {name: ocp.PLACEHOLDER for name in stored}  # leaves not asked for are not read
    abstract.update({name: jax.ShapeDtypeStruct(spec.shape, spec.dtype, sharding=shardings[name])
                     for name, spec in specs.items()})
    restored = unnest(ocp.load(path, nest(abstract)))
    return {name: restored[name] for name in specs}


def flat_params(state: nnx.State) -> dict[str, jax.Array]:
    """The weights of a split model's state by flat name (the inverse of `split_model`): arrays, or
    another kind of weight a Param holds (quantize.Quantized)."""
    return {_name(path): var.get_value() for path, var in nnx.to_flat_state(state)}
