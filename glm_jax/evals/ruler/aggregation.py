"""RULER's aggregation tasks: common words (scripts/data/synthetic/common_words_extraction.py: a
numbered list where 10 words repeat 30 times and the rest 3, after one solved example) and frequent
words (freq_words_extraction.py: coded 6-letter words drawn from a Zipf law of exponent alpha; the
three most frequent after the noise `...`)."""

from __future__ import annotations

import string

import numpy as np

from glm_jax.evals.ruler.build import Draw, Rendered
from glm_jax.evals.ruler.tasks import CWE_PREFIX, CWE_TEMPLATE, FWE_PREFIX, FWE_TEMPLATE, Task
from glm_jax.evals.ruler.words import distinct_letters, word_pool

SHORT = 4096     # below this length RULER's CWE repeats its words less (6 and 1 times) and its example is shorter


def _numbered(words) -> str:
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))


def _word_list(rng_seed: int, pool: list[str], n: int, common: int, repeats: int, rare_repeats: int):
    """(the numbered context, the common words): the first `common` of the pool's first n repeat most."""
    words = pool[:common] * repeats + pool[common:n] * rare_repeats
    order = np.random.default_rng(rng_seed).permutation(len(words))
    return _numbered(words[i] for i in order), pool[:common]


def draw_cwe(task: Task, rng: np.random.Generator, length: int, budget: int) -> Draw:
    a = task.args
    common = a["num_cw"]
    if length < SHORT:
        shot_args, repeats, rare = (20, 3, 1), 6, 1
    else:
        shot_args, repeats, rare = (40, 10, 3), a["freq_cw"], a["freq_ucw"]
    shot_pool = word_pool(np.random.default_rng(rng.integers(2 ** 63)), shot_args[0])
    context, answer = _word_list(int(rng.integers(2 ** 63)), shot_pool, shot_args[0], common, *shot_args[1:])
    shot = CWE_TEMPLATE.format(context=context) + CWE_PREFIX + " " + _numbered(answer)
    most = common + max(16, budget // 2)        # more words than any prompt of this budget can hold
    pool = word_pool(rng, most)
    seed = int(rng.integers(2 ** 63))

    def render(n: int) -> Rendered:
        context, answer = _word_list(seed, pool, min(n, most), common, repeats, rare)
        return Rendered(shot + "\n" + CWE_TEMPLATE.format(context=context), CWE_PREFIX, tuple(answer))

    return Draw(render, minimum=common)


def zeta(alpha: float, terms: int = 100_000) -> float:
    """Riemann zeta(alpha) for alpha > 1: a partial sum and its integral tail."""
    k = np.arange(1, terms + 1, dtype=np.float64)
    return float(np.sum(k ** -alpha) + terms ** (1 - alpha) / (alpha - 1))


def draw_fwe(task: Task, rng: np.random.Generator, budget: int, coded_wordlen: int = 6) -> Draw:
    alpha = task.args["alpha"]
    vocab_size = max(8, budget // 50)
    vocab = distinct_letters(rng, vocab_size, coded_wordlen, string.ascii_lowercase)
    vocab[0] = "..."                             # the most frequent: noise the question says to ignore
    weights = np.arange(1, vocab_size + 1, dtype=np.float64) ** -alpha / zeta(alpha)
    seed = int(rng.integers(2 ** 63))

    def render(n: int) -> Rendered:
        counts = (n * weights).astype(int)
        words = np.repeat(np.array(vocab, dtype=object), counts)
        words = words[np.random.default_rng(seed).permutation(len(words))]
        return Rendered(FWE_TEMPLATE.format(context=" ".join(words)), FWE_PREFIX, tuple(vocab[1:4]))

    # Enough words that the three answers are counted apart (their counts differ).
    return Draw(render, minimum=int(np.ceil(4 / (weights[2] - weights[3]))))
