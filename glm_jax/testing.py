"""Random GLM-4 models for tests, benchmarks and scripts: a small config, its weights in memory, and
the model folders glm-jax and Hugging Face read.

Every weight is normal with std `std` (norm weights 1 + normal with std `norm_std`), drawn from a
generator seeded by (seed, the tensor's name): a tensor does not depend on the others or their order.
The in-memory model and glm-jax folders draw by glm-jax's names, Hugging Face folders by theirs: the
same seed gives different weights in the two (a converted folder holds the checkpoint's).
"""

from __future__ import annotations

import pathlib
import shutil
import zlib

import numpy as np

from glm_jax.config import PRESETS, GLMConfig

STD, NORM_STD = 0.02, 0.1
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "generation_config.json")
BASE = "glm-4-9b-chat-1m"      # the real vocabulary, special ids and head layout


def random_config(*, hidden_size: int = 64, num_layers: int = 1, num_heads: int = 4, num_kv_heads: int = 2,
                  head_dim: int | None = None, intermediate_size: int | None = None, dtype: str = "float32",
                  **fields) -> GLMConfig:
    """glm-4-9b-chat-1m's config shrunk: head_dim defaults to hidden_size // num_heads, the MLP to
    twice hidden_size; `fields` replace any other field (vocab_size, max_seq_len, rope_theta, ...)."""
    return PRESETS[BASE].replace(hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                                 num_kv_heads=num_kv_heads, head_dim=head_dim or hidden_size // num_heads,
                                 intermediate_size=intermediate_size or 2 * hidden_size, dtype=dtype, **fields)


def random_tensor(name: str, shape: tuple[int, ...], dtype, seed: int = 0, std: float = STD,
                  norm_std: float = NORM_STD) -> np.ndarray:
    """The weight called `name` (a norm weight when the name holds "norm")."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    x = rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
    if "norm" in name:
        x = x * np.float32(norm_std / std) + np.float32(1)
    return x.astype(dtype)


def random_model(config: GLMConfig | None = None, *, seed: int = 0, std: float = STD, norm_std: float = NORM_STD,
                 **fields):
    """(config, graphdef, state) of a random GLM (config: `random_config(**fields)` unless given),
    drawn with numpy: no device program runs for the initialisation."""
    import jax.numpy as jnp
    from flax import nnx

    from glm_jax.model import GLM

    config = config or random_config(**fields)
    dtype = jnp.dtype(config.dtype)
    graphdef, shapes = nnx.split(nnx.eval_shape(lambda: GLM(config, dtype=dtype)))
    flat = nnx.to_flat_state(shapes)
    values = [jnp.asarray(random_tensor(".".join(str(p) for p in path), var.shape, var.dtype, seed, std, norm_std))
              for path, var in flat]
    state = nnx.from_flat_state([(path, var.replace(value)) for (path, var), value in zip(flat, values)])
    return config, graphdef, state


def copy_tokenizer(folder: pathlib.Path, reference: pathlib.Path, names=TOKENIZER_FILES) -> None:
    """The GLM-4 tokenizer files of a reference folder laid out as tests/data into `folder`."""
    for name in names:
        source = reference / name if name == "tokenizer.model" else reference / "models" / BASE / name
        shutil.copy(source, pathlib.Path(folder) / name)


def write_random_model(folder: pathlib.Path, config: GLMConfig, *, seed: int = 0,
                       reference: pathlib.Path | None = None, **weights) -> pathlib.Path:
    """A glm-jax model folder (config.json, params/) of `random_model`; with `reference`, the GLM-4
    tokenizer files too."""
    from glm_jax.params import PARAMS_DIR, flat_params, save_params

    folder = pathlib.Path(folder)
    folder.mkdir(parents=True)
    _, _, state = random_model(config, seed=seed, **weights)
    save_params(folder / PARAMS_DIR, [flat_params(state)])
    config.save(folder / "config.json")
    if reference is not None:
        copy_tokenizer(folder, reference)
    return folder


def write_random_checkpoint(folder: pathlib.Path, config: GLMConfig, *, layout: str = "chatglm", seed: int = 0,
                            num_shards: int = 1, std: float = STD, norm_std: float = NORM_STD, force: bool = False,
                            progress: bool = False, reference: pathlib.Path | None = None) -> pathlib.Path:
    """A Hugging Face folder as a published one looks: real tensor names, shapes and dtype, the
    `layout`, `num_shards` safetensors files, plus the unused `rotary_pos_emb.inv_freq` of the original
    layout; written one shard at a time. With `reference`, the GLM-4 tokenizer files too."""
    from glm_jax.convert.checkpoint import atomic_folder, np_dtype
    from glm_jax.convert.hf import default_shards, write_hf
    from glm_jax.convert.layout import IGNORED, hf_tensors
    from glm_jax.progress import Progress

    folder = pathlib.Path(folder)
    dtype = np_dtype(config.dtype)
    plan = hf_tensors(config, layout)
    weight_map = default_shards(plan, dtype.itemsize, num_shards)
    extra = {}
    for name in IGNORED[layout]:  # the original checkpoints carry this unused buffer (base 10000)
        rot = config.rotary_dim
        extra[name] = (1.0 / 10000 ** (np.arange(0, rot, 2, dtype=np.float32) / rot)).astype(dtype)
        weight_map[name] = weight_map[plan[0].name]
    total = sum(int(np.prod(t.shape)) for t in plan) * dtype.itemsize
    with atomic_folder(folder, force) as tmp, Progress(f"random {folder.name}", total, enabled=progress) as bar:
        write_hf(tmp, config, layout, lambda t: random_tensor(t.name, t.shape, dtype, seed, std, norm_std),
                 weight_map, extra=extra, progress=bar.update)
    if reference is not None:
        copy_tokenizer(folder, reference)
    return folder


# -- quantization references (float64) -------------------------------------------------------------

QMAX = {"int8": 127, "int4": 7}


def absmax_rounding(w: np.ndarray, k: int, kind: str, group: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Plain symmetric absmax rounding in float64 of a weight [*out, *in] (k output dims), groups of
    `group` consecutive inputs (None: one per output channel): (the weight it stands for, scales [*out, G])."""
    rows = w.astype(np.float64).reshape(*w.shape[:k], -1)
    g = 1 if group is None else rows.shape[-1] // group
    rows = rows.reshape(*rows.shape[:-1], g, -1)
    scales = np.abs(rows).max(-1, keepdims=True) / QMAX[kind]
    values = np.clip(np.round(rows / np.where(scales > 0, scales, 1)), -QMAX[kind], QMAX[kind])
    return (values * scales).reshape(w.shape), scales[..., 0]


def rounded_float64(hf, kind: str, group: int | None):
    """A float64 copy of a transformers GlmForCausalLM whose layer projections are rounded by
    `absmax_rounding` (torch weights are [out, in]: a row is an output channel, as in glm-jax)."""
    import copy

    import torch

    model = copy.deepcopy(hf).double()
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith("_proj") and ".layers." in f".{name}":
                module.weight.copy_(torch.from_numpy(absmax_rounding(module.weight.numpy(), 1, kind, group)[0]))
    return model


def damp_blocks(model, scale: float) -> None:
    """Scales every block's output projections (attention's o_proj, the MLP's down_proj) of a loaded
    `glm_jax.Model` by `scale`, in place (before its first `generate`): with a small scale the
    residual stream is mostly the token's embedding, so the next token depends mostly on the
    current one, and greedy decoding walks a fixed chain of tokens (quotes any stretch of it the
    prompt holds) at the full model's cost."""
    import jax

    damped = lambda path, x: x * scale if any(getattr(k, "key", None) in ("o_proj", "down_proj") for k in path) else x
    model.state = jax.tree.map_with_path(damped, model.state)
