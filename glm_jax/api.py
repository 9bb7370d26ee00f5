"""The Python façade: `glm_jax.load(path)` -> Model, with `model.logits(input_ids)`."""

from __future__ import annotations

import contextlib
import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .attention import AttentionFn
from .config import GLMConfig
from .forward import forward
from .generation import GenerationDefaults
from .params import PARAMS_DIR, ParamSpec, load_params, param_specs, split_model, stored_arrays
from .quantize import assemble, quantize_stream, stored_quantization, stored_specs
from .engine import Engine, SamplingParams, cache_dtype, to_host
from .options import (DTYPES, MAX_BATCH, NGRAM_MAX, NGRAM_MIN, NUM_SPECULATIVE_TOKENS, PAGE_SIZE, PREFILL_BUDGET,
                      PREFILL_CHUNK, STEPS_PER_CALL, Quantization, check_choice)
from .runtime import select_platforms
from .sharding import Layout, make_mesh
from .tokenizer import Tokenizer

# As the command line does: off an accelerator, JAX does not start an installed libtpu (which prints
# errors), unless the user chose JAX_PLATFORMS or has already started JAX's backends.
select_platforms()


def _dtype(name):
    """A name of `options.DTYPES` -> its jnp dtype; None and such a jnp dtype pass through."""
    if name is None or name in {getattr(jnp, n) for n in DTYPES}:
        return name
    return getattr(jnp, check_choice("dtype", name, DTYPES))


class Model:
    """A GLM-4 model with its weights on devices. Build it with `glm_jax.load`."""

    def __init__(self, config: GLMConfig, graphdef: nnx.GraphDef, state: nnx.State, *,
                 attention: str | AttentionFn = "auto", layout: Layout | None = None, strategy: str = "ring",
                 path: pathlib.Path | None = None, prefill_chunk: int = PREFILL_CHUNK,
                 kv_cache_dtype: str | None = None, kernel: str = "auto", page_size: int = PAGE_SIZE,
                 kv_cache_tokens: int | None = None, kv_cache_memory: float | None = None):
        self.config, self.graphdef, self.state, self.layout, self.path = config, graphdef, state, layout, path
        self.prefill_chunk, self.kv_cache_dtype, self.kernel = prefill_chunk, kv_cache_dtype, kernel
        self.pool = {"page_size": page_size, "kv_cache_tokens": kv_cache_tokens, "kv_cache_memory": kv_cache_memory}
        cache_dtype(kv_cache_dtype, self.dtype)                          # fails early on a bad name
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
        """input_ids int [B, T] (positions default to 0..T-1) -> float32 numpy [B, T, V]
        (on every process of a multi-host run)."""
        with self._own_mesh():
            return to_host(self._forward(self.state, *self._inputs(input_ids, positions)))

    def hidden_states(self, input_ids, positions=None) -> tuple[np.ndarray, np.ndarray]:
        """(logits [B, T, V], hidden states [num_layers + 1, B, T, H]: embedding, then each layer)."""
        with self._own_mesh():
            logits, hidden = self._forward(self.state, *self._inputs(input_ids, positions), hidden_states=True)
            return to_host(logits), to_host(hidden)

    def _own_mesh(self):
        """The model's own (Auto-axes) mesh as the context mesh while it runs, so a caller inside
        `jax.set_mesh` of an Explicit mesh (the same devices) does not clash with its programs."""
        return jax.set_mesh(self.layout.mesh) if self.layout is not None else contextlib.nullcontext()

    @functools.cached_property
    def tokenizer(self) -> Tokenizer | None:
        """The tokenizer of the model folder, when it has a tokenizer.model."""
        if self.path is not None and (self.path / "tokenizer.model").is_file():
            return Tokenizer.from_file(self.path)
        return None

    @functools.cached_property
    def generation_defaults(self) -> GenerationDefaults:
        """Sampling defaults and stop ids of `generate` (and the CLI): the folder's generation_config.json."""
        return GenerationDefaults.from_folder(self.path) if self.path is not None else GenerationDefaults()

    def engine(self, *, max_batch: int = MAX_BATCH, max_model_len: int | None = None,
               steps_per_call: int = STEPS_PER_CALL, max_queue: int | None = None,
               prefill_budget: int = PREFILL_BUDGET, speculative: str | None = None,
               num_speculative_tokens: int = NUM_SPECULATIVE_TOKENS, ngram_max: int = NGRAM_MAX,
               ngram_min: int = NGRAM_MIN) -> Engine:
        """A continuous-batching engine on this model's weights (for a server or a chat): up to
        `max_batch` requests at once of at most `max_model_len` tokens each (default: the config's
        context length), over a page pool sized by `load`'s kv_cache_tokens / kv_cache_memory (default:
        room for max_batch requests of max_model_len), allocated now. Call `start()` to run it on a
        thread, then `submit` requests. prefill_budget: prompt tokens a round prefills before its
        decode burst (more: new requests start sooner, running ones wait longer between bursts).
        speculative, num_speculative_tokens, ngram_max, ngram_min: the requests' default
        speculative decoding (see `generate`)."""
        engine = Engine(self.config, self.graphdef, self.state, self._layout(), prefill_chunk=self.prefill_chunk,
                        kernel=self.kernel, kv_cache_dtype=self.kv_cache_dtype, steps_per_call=steps_per_call,
                        max_queue=max_queue, prefill_budget=prefill_budget, speculative=speculative,
                        num_speculative_tokens=num_speculative_tokens, ngram_max=ngram_max, ngram_min=ngram_min,
                        **self.pool)
        with self._own_mesh():
            engine.reserve(max_batch, max_model_len or self.config.max_seq_len, fixed=True)
        return engine

    def _layout(self) -> Layout:
        return self.layout or Layout(make_mesh("sequence=1", jax.devices()[:1]))

    @functools.cached_property
    def _engine(self) -> Engine:
        """The engine `generate` runs on (its cache sized to each call)."""
        return Engine(self.config, self.graphdef, self.state, self._layout(), prefill_chunk=self.prefill_chunk,
                      kernel=self.kernel, kv_cache_dtype=self.kv_cache_dtype, serving=False, **self.pool)

    def generate(self, prompts, *, max_new_tokens: int, temperature: float | None = None, top_p: float | None = None,
                 top_k: int | None = None, seed: int = 0, stop_ids=None, on_token=None, progress: bool = False,
                 reuse: bool = True, speculative: str | None = None,
                 num_speculative_tokens: int = NUM_SPECULATIVE_TOKENS, ngram_max: int = NGRAM_MAX,
                 ngram_min: int = NGRAM_MIN):
        """Samples continuations; returns one list of new token ids per prompt (ending with the
        stop id when one was produced).

        prompts: token-id lists, or strings when the model folder has a tokenizer (encoded with
        the `[gMASK]<sop>` prefix). temperature 0 is greedy; top_k 0 and top_p 1 turn those off;
        stop_ids=() never stops. Those left as None come from `generation_defaults`, as in the CLI:
        the folder's generation_config.json (do_sample false there: greedy), else glm-4-9b-chat-1m's
        published 0.8, 0.8, 50, (151329, 151336, 151338). on_token(row, id) is called for every new
        token as it is produced (streaming). reuse: a prompt that extends one of an earlier call
        (whose pages the engine's cache still holds) prefills only the rest; False prefills it whole.
        speculative: "ngram" drafts up to `num_speculative_tokens` tokens by looking the last
        ngram_max..ngram_min tokens up in the prompt and output, verified in one model step (the
        same output, greedy or seeded; `speculative_stats` counts the drafts)."""
        sampling = self.generation_defaults.sampling(temperature, top_p, top_k, stop_ids)
        SamplingParams(max_new_tokens, sampling["temperature"], sampling["top_p"], sampling["top_k"], seed,
                       tuple(sampling["stop_ids"]))                      # raises ValueError for a bad one
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError("prompts must be a non-empty list of token-id lists or strings")
        if all(isinstance(p, str) for p in prompts):
            if self.tokenizer is None:
                raise ValueError("string prompts need a tokenizer.model in the model folder; pass token ids")
            prompts = [self.tokenizer.encode(p, add_special_tokens=True) for p in prompts]
        prompts = [list(map(int, p)) for p in prompts]
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        vocab = self.config.vocab_size
        if any(t < 0 or t >= vocab for p in prompts for t in p):
            raise ValueError(f"prompt token ids must lie in [0, {vocab})")
        longest = max(map(len, prompts))
        if longest + max_new_tokens > self.config.max_seq_len:
            raise ValueError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                             f"context length {self.config.max_seq_len}")
        if max_new_tokens == 0:
            return [[] for _ in prompts]
        self._engine.speculate(speculative, num_speculative_tokens, ngram_max, ngram_min)
        with self._own_mesh():
            return self._engine.generate(prompts, max_new_tokens=max_new_tokens, seed=seed, on_token=on_token,
                                         progress=progress, reuse=reuse, **sampling)

    def cache_stats(self) -> dict:
        """`generate`'s KV page pool: pages total / used / cached / free, prefix-cache lookups, hits
        and hit rate, evictions, preemptions (see `Engine.stats`)."""
        stats = self._engine.stats()
        return {k: stats[k] for k in ("page_size", "kv_cache_tokens", "pages_total", "pages_used", "pages_cached",
                                      "pages_free", "prefix_queries", "prefix_hits", "prefix_hit_rate", "evictions",
                                      "preemptions")}

    def speculative_stats(self) -> dict:
        """The last `generate` call's speculative drafts: proposed and accepted."""
        return dict(self._engine.speculated)

    def final_norm(self, hidden) -> np.ndarray:
        """The final RMSNorm applied to a hidden state [..., H] (as the model does before the head)."""
        norm = nnx.merge(self.graphdef, self.state).final_norm
        return np.asarray(norm(jnp.asarray(hidden, self.dtype)).astype(jnp.float32))


def load(path: str | pathlib.Path, *, dtype: str | None = None, mesh=None,
         attention: str | AttentionFn = "auto", strategy: str = "ring", prefill_chunk: int = PREFILL_CHUNK,
         kv_cache_dtype: str | None = None, kernel: str = "auto", quantize: str | None = None,
         page_size: int = PAGE_SIZE, kv_cache_tokens: int | None = None,
         kv_cache_memory: float | None = None) -> Model:
    """Loads a converted glm-jax folder, or an HF folder (either layout, converted in memory).

    dtype: "bfloat16" or "float32" (default: the stored weights' dtype).
    mesh: None (one device), a spec such as "sequence=8" or "tensor=2,sequence=4", or a Mesh.
      Weights are placed by the logical sharding rules; with a `sequence` axis the forward runs
      context-parallel attention (`strategy`: "ring" or "allgather").
    attention: the single-device attention ("auto", "exact", "blockwise" or a callable).
    prefill_chunk: tokens per prefill step in `generate` (bounds prefill activations).
    kv_cache_dtype: the KV cache's storage in `generate`: None (the weights' dtype) or "int8"
      (per-token, per-head float32 scales; dequantized inside the attention).
    kernel: attention in `generate` (options.KERNELS): "auto" (gpu on a GPU, tpu on a TPU, xla
      elsewhere), "xla" (portable), "gpu" (GPUs only; for a cache held by one device: cuDNN for one
      request's prefill chunks, a paged Pallas kernel for decode steps) or "tpu" (TPUs only: JAX's
      Pallas paged-attention kernel for decode steps of a bf16 cache).
    page_size, kv_cache_tokens, kv_cache_memory: the engine's KV page pool (`Engine`): slots a page;
      its size in tokens, or as a fraction of the device memory left after the weights (GPU/TPU);
      default: room for every request of a `generate` call (or `engine`'s max_batch x max_model_len).
    quantize: "int8", "int4" or "KIND:G" (options.Quantization): the layers' projections are
      quantized while loading, one layer at a time (glm_jax/quantize.py). A folder `convert
      --quantize` wrote loads as stored, quantize left None (or the same).
    """
    path = pathlib.Path(path)
    q = Quantization.parse(quantize)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path}: no config.json (expected a glm-jax or Hugging Face model folder)")
    layout = None if mesh is None else Layout(make_mesh(mesh))
    if json.loads(config_file.read_text()).get("model_type") == "glm_jax":
        config = GLMConfig.load(config_file)
        target = _dtype(dtype) or _dtype(config.dtype)
        arrays = _load_folder(path / PARAMS_DIR, param_specs(config, target), layout, q)
    else:
        from glm_jax.convert.checkpoint import np_dtype, open_hf
        from glm_jax.convert.hf import iter_params

        config, _, ckpt, plan = open_hf(path)
        target = _dtype(dtype) or (_dtype(config.dtype) if config.dtype in DTYPES else jnp.bfloat16)
        specs = param_specs(config, target)
        shardings = _shardings(specs, layout)
        arrays = _placed(((n, jax.device_put(a, shardings[n]))
                          for n, a in iter_params(ckpt, plan, np_dtype(jnp.dtype(target).name))), specs, layout, q)
    graphdef, state = split_model(config, target, arrays)
    return Model(config, graphdef, state, attention=attention, layout=layout, strategy=strategy, path=path,
                 prefill_chunk=prefill_chunk, kv_cache_dtype=kv_cache_dtype, kernel=kernel, page_size=page_size,
                 kv_cache_tokens=kv_cache_tokens, kv_cache_memory=kv_cache_memory)


def _load_folder(path: pathlib.Path, specs: dict[str, ParamSpec], layout: Layout | None, q: Quantization | None):
    """The weights of a glm-jax folder's checkpoint: as stored (float, or quantized by `convert`), or
    float ones quantized with q one layer at a time (never the whole float model in memory)."""
    stored = stored_quantization(stored_arrays(path), specs)
    if stored is not None and q is not None and stored != q:
        raise ValueError(f"{path.parent} is stored quantized ({stored}); load it without --quantize or as "
                         f"{stored}, or quantize its float source")
    if stored is not None or q is None:
        wanted = stored_specs(specs, stored)
        return assemble(load_params(path, wanted, _shardings(wanted, layout)))
    layers: dict[str, dict[str, ParamSpec]] = {}
    for name, spec in specs.items():
        parts = name.split(".")
        layers.setdefault(".".join(parts[:2]) if parts[0] == "layers" else parts[0], {})[name] = spec
    loaded = (item for group in layers.values()
              for item in load_params(path, group, _shardings(group, layout)).items())
    return _placed(loaded, specs, layout, q)


def _placed(params, specs: dict[str, ParamSpec], layout: Layout | None, q: Quantization | None) -> dict:
    """(name, array) pairs on devices -> the model's weights (quantized with q), each stored array on
    its sharding."""
    shardings = _shardings(stored_specs(specs, q), layout)
    return assemble({n: jax.device_put(a, shardings[n]) for n, a in quantize_stream(params, specs, q)})


def _shardings(specs, layout: Layout | None) -> dict[str, jax.sharding.Sharding]:
    if layout is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return {name: device for name in specs}
    return {name: layout.sharding(spec.axes, spec.shape) for name, spec in specs.items()}
