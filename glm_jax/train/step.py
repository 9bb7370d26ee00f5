"""The train step: a pure function of the train state and one global batch, under `jax.jit`.

Parameters travel as a flat dict {"layers.3.attn.q_proj": array, ...} (params.py's names), so the
optimizer state and checkpoints are plain trees of named arrays. Mixed precision: a bf16 model
trains float32 master weights (and float32 optimizer state) and runs its forward on bf16 copies;
a float32 model trains in float32. The loss is the mean over every counted target of the global
batch, gradient accumulation included (sums over micro-batches, one division at the end), as
transformers counts it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ..config import GLMConfig
from ..forward import device_order_call
from ..options import DEFAULT_REMAT, LOSS_CHUNK, OPTIMIZERS, SCHEDULES, check_choice
from ..params import param_specs, split_model
from ..quantize import as_float
from ..sharding import Layout
from .lora import LoRAConfig, attach, merge
from .loss import IGNORE, cross_entropy, shift_labels
from .remat import block_runner

Params = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """What `make_optimizer` builds (the CLI's flags)."""

    learning_rate: float = 1e-5
    steps: int = 1000                 # total optimizer steps: the cosine decays over them
    warmup_steps: int = 0             # linear warmup: step k of them at k/warmup_steps x the peak
    schedule: str = "cosine"          # "cosine" (to final_lr_ratio x the peak) or "constant"
    final_lr_ratio: float = 0.1
    optimizer: str = "adamw"          # "adamw" or "sgd" (plain SGD, no momentum)
    weight_decay: float = 0.0         # AdamW's decoupled decay, never on norms and biases
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_norm: float | None = 1.0     # global gradient-norm clipping (None: off)


def schedule(c: OptimizerConfig) -> optax.Schedule:
    """The learning rate of each update, by optax's count (0 for the first update). A warmup ramps
    linearly over the steps that take it: step k of W runs at k/W x the peak, so the first step trains
    (at peak/W, not 0) and step W at the peak; the cosine then ends at its final rate on the last step.
    Without warmup the first step runs at the peak."""
    check_choice("schedule", c.schedule, SCHEDULES)
    if c.schedule == "cosine":
        base = optax.warmup_cosine_decay_schedule(0.0, c.learning_rate, c.warmup_steps, max(c.steps, c.warmup_steps + 1),
                                                  end_value=c.learning_rate * c.final_lr_ratio)
    elif c.warmup_steps == 0:
        return optax.constant_schedule(c.learning_rate)
    else:
        base = optax.join_schedules([optax.linear_schedule(0.0, c.learning_rate, c.warmup_steps),
                                     optax.constant_schedule(c.learning_rate)], [c.warmup_steps])
    return base if c.warmup_steps == 0 else lambda count: base(count + 1)


def decays(name: str) -> bool:
    """Weight decay applies to matrices and embeddings, never to norms and biases."""
    leaf = name.rsplit(".", 1)[-1]
    return not (leaf.endswith("bias") or "norm" in name)


def make_optimizer(c: OptimizerConfig) -> optax.GradientTransformation:
    """The optimizer of a flat {name: array} tree of trained weights (or adapters)."""
    check_choice("optimizer", c.optimizer, OPTIMIZERS)
    lr = schedule(c)
    if c.optimizer == "sgd":
        core = optax.sgd(lr)
    else:
        mask = lambda params: {name: decays(name) for name in params}
        core = optax.adamw(lr, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay, mask=mask)
    return optax.chain(optax.clip_by_global_norm(c.clip_norm), core) if c.clip_norm else core


@dataclasses.dataclass(frozen=True)
class Batch:
    """One global batch, split into `accum` micro-batches: every array [accum, B, T] int32.
    labels are aligned with tokens (transformers' convention; IGNORE where nothing counts);
    positions are RoPE positions (restarting per packed example); segments tell packed examples
    apart (a token attends only within its segment; 0 = padding)."""

    tokens: Any
    labels: Any
    positions: Any
    segments: Any


jax.tree_util.register_dataclass(Batch, data_fields=["tokens", "labels", "positions", "segments"], meta_fields=[])


@dataclasses.dataclass(frozen=True)
class Trainer:
    """The compiled pieces of one training run: the model structure, its layout and precision."""

    config: GLMConfig
    layout: Layout
    dtype: Any                        # the forward's dtype (the model's)
    optimizer: optax.GradientTransformation
    remat: str = DEFAULT_REMAT        # what a block keeps for the backward pass (train/remat.py)
    loss_chunk: int = LOSS_CHUNK
    lora: LoRAConfig | None = None    # None: every weight trains; else only the adapters
    # each block's weight gradients fenced to its input gradient (remat.fence_gradients); whether
    # that lowers a run's peak memory depends on the run (--no-gradient-fence turns it off)
    fence: bool = True

    def weights(self, params: Mapping[str, jax.Array], frozen: Mapping[str, jax.Array]) -> dict:
        """The forward's weights in the model's dtype: the trained ones, or the frozen base with
        the adapters attached."""
        if self.lora:
            return attach(self.lora, frozen, params, self.dtype)
        return {k: v.astype(self.dtype) for k, v in params.items()}

    def merged(self, params: Mapping[str, jax.Array], frozen: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        """The weights to save, in the model's dtype (LoRA: base + scale * B A)."""
        weights = merge(self.lora, frozen, params) if self.lora else params
        return {k: as_float(v, self.dtype) for k, v in weights.items()}     # a quantized base: dequantized

    def loss(self, params: Mapping[str, jax.Array], frozen: Mapping[str, jax.Array], tokens, labels,
             positions, segments, counted: int | None = None) -> tuple[jax.Array, jax.Array]:
        """(summed float32 loss, counted targets) of one micro-batch [B, T]. counted: a budget of
        counted targets per row (`loss.counted_budget`), or None."""
        graphdef, state = split_model(self.config, self.dtype, self.weights(params, frozen))
        model = nnx.merge(graphdef, state)
        order, hidden = device_order_call(model, tokens, positions, self.layout, segments=segments, head=False,
                                          run_blocks=block_runner(self.remat, self.fence))  # [B, T', H]
        t = tokens.shape[1]
        targets = shift_labels(labels)[:, np.minimum(order, t - 1)]                      # [B, T']
        targets = jnp.where(jnp.asarray(order < t)[None], targets, IGNORE)
        return cross_entropy(hidden, model.lm_head[...], targets, self.layout, chunk=self.loss_chunk,
                             counted=counted)

    def gradients(self, params: Params, frozen: Params, batch: Batch,
                  counted: int | None = None) -> tuple[Params, jax.Array, jax.Array]:
        """(mean gradient, mean loss, counted targets) over every micro-batch of `batch`."""
        grad_fn = jax.value_and_grad(self.loss, has_aux=True)

        def micro(carry, mb):
            grads, loss, count = carry
            (l, c), g = grad_fn(params, frozen, mb.tokens, mb.labels, mb.positions, mb.segments, counted)
            return (jax.tree.map(jnp.add, grads, g), loss + l, count + c), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        (grads, loss, count), _ = jax.lax.scan(micro, (zeros, jnp.float32(0), jnp.int32(0)), batch)
        scale = 1.0 / jnp.maximum(count, 1).astype(jnp.float32)
        return jax.tree.map(lambda g: g * scale, grads), loss * scale, count

    def step(self, state: dict, frozen: Params, batch: Batch, counted: int | None = None) -> tuple[dict, dict]:
        """One optimizer step. state: {"params" (the trained weights or adapters), "opt_state",
        "step"}; frozen: the base weights under LoRA (else empty); counted (static): the batch's
        `counted_budget`, or None. Returns the state updated and the metrics (loss, grad_norm,
        counted tokens)."""
        grads, loss, count = self.gradients(state["params"], frozen, batch, counted)
        updates, opt_state = self.optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "tokens": count}
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

    def init(self, params: Params) -> dict:
        """The train state of the trained `params` (weights or adapters): float32 copies, never the
        caller's arrays (the step donates its state). The master weights and every parameter-shaped
        leaf of the optimizer state are laid out as the layout shards that weight (adapters:
        replicated): optax makes its state with zeros_like, which under `jax.jit` came back
        replicated (the full fine-tuning step's Adam moments whole on every chip)."""
        specs = param_specs(self.config, self.dtype)

        def place(x: jax.Array, name: str) -> jax.Array:
            return self.layout.constrain(x, specs[name].axes if name in specs else (None,) * x.ndim)

        master = {k: place(jnp.array(v, jnp.float32, copy=True), k) for k, v in params.items()}
        opt_state = optax.tree_utils.tree_map_params(self.optimizer, place, self.optimizer.init(master),
                                                     {k: k for k in master})
        return {"params": master, "opt_state": opt_state, "step": jnp.int32(0)}
