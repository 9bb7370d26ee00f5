"""The Python façade: `glm_jax.load(path)` -> Model, with `model.logits(input_ids)`."""

from __future__ import annotations

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .attention import AttentionFn
from .config import GLMConfig
from .model import forward
from .params import PARAMS_DIR, load_params, param_specs, split_model
from .sharding import Layout, make_mesh

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


def _dtype(name):
    if name is None or name in DTYPES.values():
        return name
    if name not in DTYPES:
        raise ValueError(f"unsupported dtype {name!r}; choose bfloat16 or float32")
    return DTYPES[name]


class Model:
    """A GLM-4 model with its weights on devices. Build it with `glm_jax.load`."""

    def __init__(self, config: GLMConfig, graphdef: nnx.GraphDef, state: nnx.State, *,
                 attention: str | AttentionFn = "auto", layout: Layout | None = None, strategy: str = "ring",
                 path: pathlib.Path | None = None):
        self.config, self.graphdef, self.state, self.layout, self.path = config, graphdef, state, layout, path
        self._forward = jax.jit(functools.partial(forward, graphdef, attention=attention, layout=layout,
                                                  strategy=strategy),
                                static_argnames=("hidden_states",))

    @property
    def mesh(self):
        return None if self.layout is None else self.layout.mesh

    @property
    def dtype(self):
        return jax.tree.leaves(self.state)[0].dtype

    def _inputs(self, input_ids, positions):
        ids = np.asarray(input_ids)
        if ids.ndim != 2 or ids.shape[1] == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"input_ids must be a non-empty int array [batch, time], got {ids.dtype} {ids.shape}")
        if ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise ValueError(f"input_ids must lie in [0, {self.config.vocab_size}), got [{ids.min()}, {ids.max()}]")
        if positions is None:
            positions = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
        positions = np.asarray(positions)
        if positions.shape != ids.shape:
            raise ValueError(f"positions {positions.shape} must match input_ids {ids.shape}")
        return jnp.asarray(ids, jnp.int32), jnp.asarray(positions, jnp.int32)

    def logits(self, input_ids, positions=None) -> np.ndarray:
        """input_ids int [B, T] (positions default to 0..T-1) -> float32 numpy [B, T, V]."""
        return np.asarray(self._forward(self.state, *self._inputs(input_ids, positions)))

    def hidden_states(self, input_ids, positions=None) -> tuple[np.ndarray, np.ndarray]:
        """(logits [B, T, V], hidden states [num_layers + 1, B, T, H]: embedding, then each layer)."""
        logits, hidden = self._forward(self.state, *self._inputs(input_ids, positions), hidden_states=True)
        return np.asarray(logits), np.asarray(hidden)

    def final_norm(self, hidden) -> np.ndarray:
        """The final RMSNorm applied to a hidden state [..., H] (as the model does before the head)."""
        norm = nnx.merge(self.graphdef, self.state).final_norm
        return np.asarray(norm(jnp.asarray(hidden, self.dtype)).astype(jnp.float32))


def load(path: str | pathlib.Path, *, dtype: str | None = None, mesh=None,
         attention: str | AttentionFn = "auto", strategy: str = "ring") -> Model:
    """Loads a converted glm-jax folder, or an HF folder (either layout, converted in memory).

    dtype: "bfloat16" or "float32" (default: the stored weights' dtype).
    mesh: None (one device), a spec such as "sequence=8" or "tensor=2,sequence=4", or a Mesh.
      Weights are placed by the logical sharding rules; with a `sequence` axis the forward runs
      context-parallel attention (`strategy`: "ring" or "allgather").
    attention: the single-device attention ("auto", "exact", "blockwise" or a callable).
    """
    path = pathlib.Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path}: no config.json (expected a glm-jax or Hugging Face model folder)")
    layout = None if mesh is None else Layout(make_mesh(mesh))
    if json.loads(config_file.read_text()).get("model_type") == "glm_jax":
        config = GLMConfig.load(config_file)
        target = _dtype(dtype) or DTYPES[config.dtype]
        specs = param_specs(config, target)
        arrays = load_params(path / PARAMS_DIR, specs, _shardings(specs, layout))
    else:
        from glm_jax.convert.checkpoint import np_dtype, open_hf
        from glm_jax.convert.hf import iter_params

        config, _, ckpt, plan = open_hf(path)
        target = _dtype(dtype) or DTYPES.get(config.dtype, jnp.bfloat16)
        specs = param_specs(config, target)
        shardings = _shardings(specs, layout)
        arrays = {n: jax.device_put(a, shardings[n])
                  for n, a in iter_params(ckpt, plan, np_dtype(jnp.dtype(target).name))}
    graphdef, state = split_model(config, target, arrays)
    return Model(config, graphdef, state, attention=attention, layout=layout, strategy=strategy, path=path)


def _shardings(specs, layout: Layout | None) -> dict[str, jax.sharding.Sharding]:
    if layout is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return {name: device for name in specs}
    return {name: layout.sharding(spec.axes, spec.shape) for name, spec in specs.items()}
