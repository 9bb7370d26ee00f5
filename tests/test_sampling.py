"""sample() against a float64 numpy reference of the truncated distribution; per-row parameters and keys;
the engine's decode bursts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glm_jax import GLMConfig, Layout, make_mesh
from glm_jax.engine import Engine, SamplingParams
from glm_jax.sampling import TOP_K_MAX, argmax, sample
from glm_jax.testing import random_model

SAMPLE = jax.jit(sample)


def draw(logits, temperature, top_k, top_p, seed=0):
    """logits [B, V] -> token ids [B] (numpy), the parameters as the generator passes them."""
    return np.asarray(SAMPLE(jnp.asarray(logits, jnp.float32), jax.random.key(seed), np.float32(temperature),
                             np.int32(top_k), np.float32(top_p)))


def reference(logits, temperature, top_k, top_p):
    """logits [V] -> the probabilities [V] (float64) transformers samples from: temperature, then
    top-k (values tied with the k-th stay), then top-p (drop the least likely tokens while their
    mass stays within 1 - top_p, never the most likely; values tied with a kept one stay)."""
    x = np.asarray(logits, np.float32).astype(np.float64) / temperature
    if 0 < top_k < x.size:
        x = np.where(x < np.sort(x)[::-1][top_k - 1], -np.inf, x)
    p = np.exp(x - x.max())
    p /= p.sum()
    ascending = np.sort(p)
    dropped = np.cumsum(ascending) <= 1 - top_p
    dropped[-1] = False
    p = np.where(p < ascending[~dropped].min(), 0, p)
    return p / p.sum()


def assert_frequencies(logits, temperature, top_k, top_p, n=20000):
    """n draws from n identical rows: tokens outside the truncated set never appear, and each
    token's frequency lies within 5 standard deviations (plus one count) of its probability."""
    want = reference(logits, temperature, top_k, top_p)
    tokens = draw(np.tile(logits, (n, 1)), temperature, top_k, top_p)
    got = np.bincount(tokens, minlength=len(logits)) / n
    assert not got[want == 0].any(), f"drew outside the kept set: {np.flatnonzero(got * (want == 0))}"
    bound = 5 * np.sqrt(want * (1 - want) / n) + 1 / n
    assert (np.abs(got - want) <= bound).all(), np.abs(got - want).max()


V = 50
LOGITS = np.random.default_rng(0).normal(scale=2.0, size=V).astype(np.float32)


@pytest.mark.parametrize("temperature, top_k, top_p", [
    (1.0, 0, 1.0), (0.5, 0, 1.0), (3.0, 0, 1.0),        # no truncation: no sort
    (0.7, 10, 1.0), (1.3, 5, 0.6), (1.0, 1, 1.0),        # top-k within TOP_K_MAX (and top-p on top)
    (0.8, 0, 0.7), (1.0, 0, 0.3),                        # top-p alone: the full sort
    (1.0, 1000, 1.0), (0.9, 1000, 0.5), (1.0, V, 0.9),   # top_k >= V keeps everything
])
def test_frequencies_match_the_reference(temperature, top_k, top_p):
    assert_frequencies(LOGITS, temperature, top_k, top_p)


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 3, 0.9), (2.0, 0, 0.5), (0.6, 2, 1.0), (1.0, 6, 1.0)])
def test_tiny_vocabulary(temperature, top_k, top_p):
    assert_frequencies(np.array([1.5, -0.3, 0.9, 2.2, 0.1, -1.7, 1.1], np.float32), temperature, top_k, top_p)


def test_ties_at_the_cuts():
    # top-k: the 2nd value is shared by three tokens; all three stay
    logits = np.array([3.0, 2.0, 2.0, 0.5, 2.0, 0.0, -1.0], np.float32)
    assert (reference(logits, 1.0, 2, 1.0) > 0).sum() == 4
    assert_frequencies(logits, 1.0, 2, 1.0)
    # top-p: the mass reaches 0.5 inside a group of ties; the whole group stays
    logits = np.concatenate([[2.5], np.full(6, 1.0), np.linspace(-2, 0, V - 7)]).astype(np.float32)
    assert (reference(logits, 1.0, 0, 0.5) > 0).sum() == 7
    for top_k in (0, 20):                                   # full sort; lax.top_k
        assert_frequencies(logits, 1.0, top_k, 0.5)


def test_ties_past_top_k_max():
    """The k-th value is tied far beyond the TOP_K_MAX values lax.top_k returns: those ties stay,
    and their mass counts for top-p."""
    v = 4 * TOP_K_MAX
    logits = np.full(v, -3.0, np.float32)
    logits[:5] = [4.0, 3.5, 3.0, 2.5, 2.0]
    logits[5 : 5 + 2 * TOP_K_MAX] = 1.0                     # ties from rank 6 to 2 * TOP_K_MAX + 5
    logits[-20:] = np.linspace(-2.5, 0.5, 20)
    for top_k, top_p in [(10, 1.0), (10, 0.35), (TOP_K_MAX, 0.95), (TOP_K_MAX + 1, 1.0)]:
        assert (reference(logits, 1.0, top_k, top_p) > 0).sum() > TOP_K_MAX
        assert_frequencies(logits, 1.0, top_k, top_p, n=10000)


def test_top_k_above_top_k_max():
    logits = np.random.default_rng(3).normal(scale=0.5, size=4 * TOP_K_MAX).astype(np.float32)
    for top_p in (1.0, 0.9):
        assert_frequencies(logits, 1.0, 2 * TOP_K_MAX, top_p, n=10000)


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.8, 50, 0.8), (0.8, 0, 0.8), (1.0, 0, 1.0), (0.6, 40, 1.0),
                                                       (1.0, TOP_K_MAX + 100, 0.95)])
def test_realistic_vocabulary_stays_in_the_kept_set(temperature, top_k, top_p):
    """151,552 tokens, logits rounded to bfloat16 as the model gives them (ties are common)."""
    logits = np.random.default_rng(1).normal(scale=3.0, size=(8, 151552))
    logits = np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32))
    tokens = draw(logits, temperature, top_k, top_p, seed=3)
    for row, token in enumerate(tokens):
        assert reference(logits[row], temperature, top_k, top_p)[token] > 0


def test_greedy_and_keys():
    logits = np.random.default_rng(2).normal(size=(64, 1000)).astype(np.float32)
    for top_k, top_p in [(0, 1.0), (5, 0.5), (200, 0.9)]:
        assert (draw(logits, 0.0, top_k, top_p) == logits.argmax(axis=1)).all()
    a = draw(logits, 1.0, 50, 0.9, seed=5)
    assert (a == draw(logits, 1.0, 50, 0.9, seed=5)).all()
    assert (a != draw(logits, 1.0, 50, 0.9, seed=6)).any()


def test_argmax_is_first_maximum_and_reduces_in_float():
    """argmax equals numpy's (the first of tied maxima), and over the real vocabulary it compiles
    to float32 max/min reductions only, never jnp.argmax's paired (value, index) reduction."""
    x = np.random.default_rng(3).normal(size=(6, 151552)).astype(np.float32)
    x[1, [7, 151551]] = x[1].max() + 1                     # a tie: the first wins
    x[2, -1] = x[2].max() + 1                                # the last index, past float16's range
    x[3, 12345] = np.inf
    got = np.asarray(jax.jit(argmax)(jnp.asarray(x)))
    assert (got[:4] == x[:4].argmax(axis=1)).all() and (got[4:] == x[4:].argmax(axis=1)).all()
    hlo = jax.jit(argmax).lower(jax.ShapeDtypeStruct((16, 151552), jnp.float32)).compile().as_text()
    reductions = [line for line in hlo.splitlines() if " reduce(" in line]
    assert reductions and all("s32" not in line.split(" reduce(")[0] for line in reductions), reductions


def test_per_row_parameters_and_keys():
    """Mixed rows in one call: each row draws as it would alone (its own parameters and key)."""
    logits = np.tile(LOGITS, (4, 1))
    temperature, top_k, top_p = np.float32([0.0, 1.0, 0.7, 1.3]), np.int32([0, 0, 5, 0]), np.float32([1.0, 1.0, 1.0, 0.6])
    keys = jax.random.split(jax.random.key(4), 4)
    together = np.asarray(SAMPLE(jnp.asarray(logits), keys, temperature, top_k, top_p))
    for row in range(4):
        alone = SAMPLE(jnp.asarray(logits[row:row + 1]), keys[row:row + 1], temperature[row], top_k[row], top_p[row])
        assert together[row] == int(alone[0])
    assert together[0] == LOGITS.argmax()
    # a row that truncates nothing keeps its whole distribution beside rows that take the top-k branch
    n = 20000
    rows = np.asarray(SAMPLE(jnp.tile(jnp.asarray(LOGITS), (n, 1)), jax.random.split(jax.random.key(5), n),
                             np.float32(1.0), np.where(np.arange(n) % 2, 5, 0).astype(np.int32), np.float32(1.0)))
    free = np.bincount(rows[::2], minlength=V) / (n // 2)
    want = reference(LOGITS, 1.0, 0, 1.0)
    assert (np.abs(free - want) <= 5 * np.sqrt(want * (1 - want) / (n // 2)) + 2 / n).all()
    assert set(rows[1::2]) <= set(np.argsort(LOGITS)[-5:])


PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]             # 3 requests in a 4-row cache


@pytest.fixture(scope="module")
def engine():
    """A random one-layer GLM with a 16-token vocabulary; near-uniform next-token distributions."""
    config = GLMConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                       num_kv_heads=2, head_dim=8, max_seq_len=1024, dtype="float32")
    _, graphdef, state = random_model(config)
    return Engine(config, graphdef, state, Layout(make_mesh("sequence=1", jax.devices()[:1])), prefill_chunk=8,
                  steps_per_call=4)


def test_rows_stop_on_their_own(engine):
    """Each row ends at its first stop id or its own max_tokens; seeded rows give the same tokens
    whatever else runs beside them."""
    stops = (1, 2, 3, 4)                                    # about 1/4 of the mass: a few steps each
    engine.reserve(4, 128)
    alone = []
    for seed, prompt in enumerate(PROMPTS):
        alone.append(engine.generate([prompt], max_new_tokens=64, temperature=1.0, seed=seed, stop_ids=stops)[0])
    engine.reserve(4, 128)
    mixed = [engine.submit(p, SamplingParams(64 if i else 3, 1.0, 1.0, 0, i, stops)) for i, p in enumerate(PROMPTS)]
    while engine.step():
        pass
    for i, (request, want) in enumerate(zip(mixed, alone)):
        assert request.output == (want[:3] if i == 0 else want), i
        assert request.finish_reason == ("length" if i == 0 and len(want) > 3 else "stop")
        assert request.output[-1] in stops or request.finish_reason == "length"


def test_sampling_parameters_never_recompile(engine):
    """One decode program for every branch and mix of them; temperature=0 as an int too."""
    sizes = []
    for temperature, top_k, top_p in [(0, 0, 1.0), (1.0, 0, 1.0), (0.7, 5, 0.9), (0.7, 0, 0.5), (1.2, 100, 1.0)]:
        engine.generate(PROMPTS, max_new_tokens=4, temperature=temperature, top_k=top_k, top_p=top_p)
        sizes.append(engine._programs().decode._cache_size())
    assert len(set(sizes)) == 1
