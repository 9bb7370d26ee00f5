"""What the train step keeps for the backward pass: block runners for the model (`GLM(run_blocks=)`).

A policy (options.REMATS) says what a block keeps: "none" everything, "dots" its matmul outputs
(the rest is recomputed), "full" only its input (the whole block is recomputed), "segments" as
"full", but only every `segment_length`-th block input is kept through the forward pass. Under a
remat policy, every block but the first also fences its weight gradients to its input gradient
(`fence_gradients`).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
from flax import nnx

from ..model import Block, BlockRunner, run_in_order
from ..options import REMATS, check_choice
from .lora import LowRank

POLICIES = {"none": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
            "full": jax.checkpoint_policies.nothing_saveable}
assert set(REMATS) == {*POLICIES, "segments"}


def block_runner(remat: str, fence: bool = True) -> BlockRunner:
    """The model's block runner for `remat` (options.REMATS); with `fence`, every block's weight
    gradients but the first's are fenced to its input gradient (no fence without remat)."""
    check_choice("remat policy", remat, REMATS)
    if remat == "none":
        return run_in_order
    if remat == "segments":
        return functools.partial(_segments, fence=fence)
    return functools.partial(_blocks, policy=POLICIES[remat], fence=fence)


def segment_length(layers: int) -> int:
    """Blocks per segment under remat "segments": ceil(sqrt(layers)), which about minimises the
    block inputs alive at once (layers / s kept through the forward pass, s more inside the
    segment being differentiated): 40 layers, segments of 7, 13 inputs instead of 40."""
    return math.ceil(math.sqrt(layers))


def _blocks(blocks: list[Block], x, call, *, policy, fence: bool):
    for i, block in enumerate(blocks):
        x = _block(i, block, x, call, policy, fence=fence and i > 0)
    return x


def _segments(blocks: list[Block], x, call, *, fence: bool):
    step = segment_length(len(blocks))
    for start in range(0, len(blocks), step):
        x = _segment(list(enumerate(blocks))[start:start + step], x, call, fence)
    return x


def _segment(blocks: list[tuple[int, Block]], x, call, fence: bool):
    """Consecutive blocks (index, block) under one more `jax.checkpoint` that keeps only the
    segment's input: the backward pass runs the segment's forward again (each block remat "full"
    inside it, keeping its own input) just before differentiating its blocks. One more forward of
    every block, for (layers / s + s) block inputs alive instead of all of them."""
    graphdefs, states = zip(*(nnx.split(block) for _, block in blocks))

    def run(states, x):
        for (i, _), graphdef, state in zip(blocks, graphdefs, states):
            x = _block(i, nnx.merge(graphdef, state), x, call, POLICIES["full"], fence=fence and i > 0)
        return x

    return jax.checkpoint(run, policy=POLICIES["full"])(list(states), x)


def _block(i: int, block: Block, x, call, policy, fence: bool):
    """Block i (`call(i, block, x)`) under `jax.checkpoint` with `policy`; with `fence`, its weight
    gradients are fenced to its input's gradient (`fence_gradients`)."""
    graphdef, state = nnx.split(block)
    if fence:
        x, state = fence_gradients(x, state)
    run = lambda state, x: call(i, nnx.merge(graphdef, state), x)
    return jax.checkpoint(run, policy=policy)(state, x)


@jax.custom_vjp
def _fence(x, weights):
    return x, weights


def _fence_fwd(x, weights):
    return (x, weights), None


def _fence_bwd(_, cotangents):
    return jax.lax.optimization_barrier(cotangents)


_fence.defvjp(_fence_fwd, _fence_bwd)


def fence_gradients(x, state):
    """(x, state) unchanged; in the backward pass, the gradients of the block's trained weights
    (a LowRank's a and b if the state has any, else every weight) leave together with x's through
    one optimization barrier. So the previous block's backward cannot start before this block's
    weight gradients are computed: left free, XLA deferred those small [in, r] / [out, r] dots
    (contractions over all tokens) to the end of the step, next to the all-reduce of every
    gradient, and kept their [T, H] operands (the block's output gradient, its attention output,
    its normed input) alive across every later layer's backward."""
    is_low_rank = lambda v: isinstance(v, LowRank)
    leaves, treedef = jax.tree.flatten(state, is_leaf=is_low_rank)
    lora = any(map(is_low_rank, leaves))
    trained = [(w.a, w.b) if is_low_rank(w) else w for w in leaves if is_low_rank(w) or not lora]
    x, trained = _fence(x, trained)
    it = iter(trained)
    fenced = []
    for w in leaves:
        if is_low_rank(w):
            a, b = next(it)
            fenced.append(dataclasses.replace(w, a=a, b=b))
        else:
            fenced.append(w if lora else next(it))
    return x, jax.tree.unflatten(treedef, fenced)
