"""Speculative decoding (engine/speculative.py, programs.verify_step): the n-gram drafter, the
acceptance rule against the exact distribution, and the engine's output with and without
speculation (greedy and seeded sampling alike: token for token)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import glm_jax
from glm_jax.engine import Engine, SamplingParams
from glm_jax.engine.speculative import NgramDrafter, accepted
from glm_jax.cli import main
from glm_jax.sampling import sample
from glm_jax.sharding import make_mesh
from glm_jax.testing import damp_blocks

DRAFTS = 4


@pytest.fixture(scope="module")
def folder(reference):
    return reference / "fixtures" / "chatglm-f32"


def test_ngram_drafter_proposes_what_followed_the_latest_longest_match():
    d = NgramDrafter(max_n=3, min_n=2)
    assert d.propose([1, 2, 3, 4, 5, 9, 2, 3, 4, 7, 8, 2, 3, 4], 3) == [7, 8, 2]       # the latest 3-gram
    assert d.propose([5, 6, 1, 2, 7, 7, 9, 1, 2], 4) == [7, 7, 9, 1]                   # a 2-gram
    assert d.propose([1, 2, 3, 4, 5, 6], 4) == []                                     # no match
    assert d.propose([4, 2, 3, 9, 2, 3], 5) == [9, 2, 3]                              # up to the end
    with pytest.raises(ValueError):
        NgramDrafter(max_n=1, min_n=2)


class Oracle:
    """Drafts the request's known answer for a random number of tokens, then wrong tokens."""

    def __init__(self, answers: dict[tuple, list[int]], seed: int = 0):
        self.answers, self.rng = answers, np.random.default_rng(seed)

    def propose(self, context, k):
        for prompt, answer in self.answers.items():
            if tuple(context[:len(prompt)]) == prompt:
                at = len(context) - len(prompt)                      # the pending token is answer[at - 1]
                right = int(self.rng.integers(0, k + 1))
                return [t if j < right else (t + 1) % 512 for j, t in enumerate(answer[at:at + k])]
        return []


def answers(model, prompts, params, drafter=None):
    """Outputs and stats of one batch engine (the programs `generate` compiles) on `model`."""
    engine = Engine(model.config, model.graphdef, model.state, model._layout(), prefill_chunk=8, page_size=4,
                    kv_cache_dtype=model.kv_cache_dtype, steps_per_call=4, serving=False,
                    speculative="ngram" if drafter else None, num_speculative_tokens=DRAFTS)
    engine.reserve(4, 96, fixed=True)
    if drafter is not None:
        engine.planner.drafter = drafter
    requests = [engine.submit(p, s) for p, s in zip(prompts, params)]
    while engine.step():
        pass
    return [r.output for r in requests], engine.stats()


@pytest.mark.parametrize("load", [{}, pytest.param({"mesh": "sequence=4"}, marks=pytest.mark.slow),
                                  pytest.param({"kv_cache_dtype": "int8"}, marks=pytest.mark.slow)],
                         ids=["one-device", "sequence=4", "int8"])
def test_verified_drafts_give_the_same_tokens(folder, reference, load):
    """Four rows at once, greedy and seeded sampling (top-k, top-p), with drafts right for a random
    number of tokens then wrong: every row accepts runs of different lengths, rejected drafts' K/V
    stay in its pages past its position, and every answer equals the one without speculation."""
    ref = np.load(folder / "reference.npz")
    prompts = [ref["input_ids"][i % 2][: 9 + 4 * i].tolist() for i in range(4)]
    params = [SamplingParams(max_tokens=20, temperature=0.0 if i % 2 else 0.8, top_k=20 if i == 2 else 0,
                             top_p=0.9 if i == 0 else 1.0, seed=i, stop_ids=(7,) if i == 3 else ())
              for i in range(4)]
    if "mesh" in load:                                                      # on 4 of the 8 test devices
        load = {"mesh": make_mesh(load["mesh"], jax.devices()[:4])}
    model = glm_jax.load(folder, **load)
    plain, _ = answers(model, prompts, params)
    oracle = Oracle({tuple(p): a for p, a in zip(prompts, plain)})
    spec, stats = answers(model, prompts, params, oracle)
    assert spec == plain
    assert stats["speculative_proposed"] > stats["speculative_accepted"] >= 8 and stats["pages_used"] == 0


def test_ngram_speculation_on_a_quoting_model(folder):
    """A model that walks a fixed chain of tokens (its blocks' outputs zeroed: the next token is a
    function of the current one) asked to continue a stretch of the chain its prompt quotes: the
    n-gram drafts are accepted, the output is the same, and `generate` reports the counts."""
    model = glm_jax.load(folder, prefill_chunk=16, page_size=8)
    damp_blocks(model, 0.0)
    chain = [5] + model.generate([[5]] * 3, max_new_tokens=40, temperature=0)[0]      # the cache shape of the rest
    rng = np.random.default_rng(0)
    prompts = [rng.integers(2, 500, 20).tolist() + chain[:30] + rng.integers(2, 500, 9).tolist() + [chain[i]]
               for i in (0, 10)] + [rng.integers(2, 500, 30).tolist()]
    plain = model.generate(prompts, max_new_tokens=24, temperature=0)
    spec = model.generate(prompts, max_new_tokens=24, temperature=0, speculative="ngram", num_speculative_tokens=3)
    stats = model.speculative_stats()
    assert spec == plain and plain[0][:20] == chain[1:21]
    assert stats["accepted"] >= 20 and stats["accepted"] / stats["proposed"] > 0.6


def test_acceptance_rule_keeps_the_model_distribution():
    """The rule in isolation on a vocabulary of 6 (temperature, top-k, top-p): for a draft x, the
    first token produced (x accepted, else the model's resampled draw) follows p exactly, x is
    accepted with probability p(x), a rejection draws from p without x, and after an accepted x the
    next token follows the second position's p. Total-variation distance over 40,000 draws."""
    n, v = 40_000, 6
    logits = jnp.array([[1.2, 0.3, -0.4, 0.9, 0.0, -1.0], [0.1, 0.8, 0.5, -0.2, 1.1, 0.0]], jnp.float32)
    temperature, top_k, top_p = 0.9, 5, 0.95

    def exact(row):
        x = np.asarray(logits[row], np.float64) / temperature
        x[np.argsort(-x)[top_k:]] = -np.inf
        p = np.exp(x - x.max()) / np.exp(x - x.max()).sum()
        order = np.argsort(-p)
        keep = (np.cumsum(p[order]) - p[order]) < top_p
        q = np.zeros(v)
        q[order[keep]] = p[order[keep]]
        return q / q.sum()

    drafts = jnp.array([[0, 4]], jnp.int32)                                          # x = 0, then 4

    @jax.jit
    def draw(key):
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(2))
        targets = sample(logits, keys, temperature, top_k, top_p)[None]              # [1, 2]
        kept = accepted(drafts, jnp.array([2]), targets, jnp.full((1, 1), -1))[0]
        return kept, jnp.where(kept > 0, drafts[0, 0], targets[0, 0]), targets[0, 1]

    kept, first, second = map(np.asarray, jax.vmap(draw)(jax.random.split(jax.random.key(0), n)))
    p0, p1 = exact(0), exact(1)
    hist = lambda x: np.bincount(x, minlength=v) / len(x)
    tv = lambda a, b: 0.5 * np.abs(a - b).sum()
    assert tv(hist(first), p0) < 0.01
    assert abs((kept > 0).mean() - p0[0]) < 0.01
    rest = p0.copy()
    rest[0] = 0
    assert tv(hist(first[kept == 0]), rest / rest.sum()) < 0.015
    assert tv(hist(second[kept > 0]), p1) < 0.015


def test_cli_generate_speculative_json(tiny_chat_model, capsys):
    """`generate --speculative ngram --json`: the same ids as without, and the draft counts."""
    args = ["generate", "--model", str(tiny_chat_model), "--prompt", "la la la la la la la la", "--max-new-tokens",
            "12", "--temperature", "0", "--json"]
    assert main(args) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(args + ["--speculative", "ngram", "--num-speculative-tokens", "3", "--ngram-min", "1"]) == 0
    spec = json.loads(capsys.readouterr().out)
    assert spec["ids"] == plain["ids"] and plain["speculative"] == {"proposed": 0, "accepted": 0, "method": None}
    drafts = spec["speculative"]
    assert drafts["method"] == "ngram" and drafts["proposed"] >= drafts["accepted"]
    for flags, message in ((["--num-speculative-tokens", "0"], "--num-speculative-tokens must be >= 1"),
                           (["--ngram-min", "5"], "n-gram sizes need 1 <= min <= max")):
        assert main(args + ["--speculative", "ngram", *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
