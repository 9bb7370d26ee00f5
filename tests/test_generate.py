"""The sampler: exact greedy continuations, cache correctness, sampling controls, the CLI."""

import json

import jax
import numpy as np
import pytest

import glm_jax
from glm_jax.cli import main
from glm_jax.engine import model_step
from glm_jax.engine.cache import one_row_cache
from glm_jax.sharding import Layout, make_mesh


def fixture(reference, name):
    folder = reference / "fixtures" / name
    return folder, np.load(folder / "reference.npz")


@pytest.mark.parametrize("mesh", [None, "sequence=8", "tensor=2,sequence=4", "tensor=4,sequence=2"])
@pytest.mark.parametrize("name", ["chatglm-f32", "glm-hf-f32"])
def test_greedy_matches_the_original(reference, name, mesh):
    folder, ref = fixture(reference, name)
    prompt = ref["input_ids"][0]
    model = glm_jax.load(folder, mesh=mesh, prefill_chunk=16)   # 24 tokens: two prefill chunks
    out = model.generate([prompt.tolist()], max_new_tokens=16, temperature=0)
    assert out[0] == ref["greedy_ids"][0, len(prompt):].tolist()


def test_bf16_greedy_on_a_mesh(reference):
    folder, ref = fixture(reference, "chatglm-bf16")
    prompt = ref["input_ids"][0]
    out = glm_jax.load(folder, mesh="tensor=2,sequence=4").generate([prompt.tolist()], max_new_tokens=16, temperature=0)
    want = ref["greedy_ids"][0, len(prompt):].tolist()
    assert np.mean(np.array(out[0]) == np.array(want)) >= 0.75   # bf16: near-ties may flip (NOTES.md)


@pytest.mark.parametrize("mesh", [None, "sequence=4,tensor=2"])
def test_cached_decode_logits_equal_full_recomputation(reference, mesh):
    folder, ref = fixture(reference, "chatglm-f32")
    model = glm_jax.load(folder, mesh=mesh)
    ids = ref["greedy_ids"][:1]                                   # 40 tokens
    full = model.logits(ids)[0]
    layout = model.layout or Layout(make_mesh("sequence=1", jax.devices()[:1]))
    cache = one_row_cache(model.config, layout, 64, 8, np.float32)          # 8 pages of 8 over the devices
    prompt, got = 20, []
    step = jax.jit(lambda *a, last_only: model_step(model.graphdef, *a, layout=layout, last_only=last_only),
                   static_argnames="last_only")
    valid = np.ones((1, prompt), bool)
    row = np.zeros(1, np.int32)
    logits, cache = step(model.state, cache, ids[:, :prompt], np.arange(prompt)[None], valid, row, last_only=False)
    got.extend(np.asarray(logits[0]))
    for t in range(prompt, ids.shape[1]):                          # one token at a time from the cache
        logits, cache = step(model.state, cache, ids[:, t:t + 1], np.array([[t]]), np.ones((1, 1), bool), row,
                             last_only=True)
        got.append(np.asarray(logits[0]))
    got = np.stack(got)
    assert np.linalg.norm(got - full) / np.linalg.norm(full) <= 1e-5


def test_ragged_batch_gives_each_prompt_its_own_tokens(reference):
    folder, ref = fixture(reference, "chatglm-f32")
    model = glm_jax.load(folder, prefill_chunk=8)
    prompts = [ref["input_ids"][0].tolist(), ref["input_ids"][1][:5].tolist(), ref["input_ids"][1][3:16].tolist()]
    together = model.generate(prompts, max_new_tokens=12, temperature=0)
    for prompt, out in zip(prompts, together):
        assert model.generate([prompt], max_new_tokens=12, temperature=0)[0] == out


def test_sampling_controls(reference):
    folder, ref = fixture(reference, "chatglm-f32")
    model = glm_jax.load(folder)
    prompt = [ref["input_ids"][0].tolist()]
    greedy = model.generate(prompt, max_new_tokens=16, temperature=0)
    a = model.generate(prompt, max_new_tokens=16, temperature=1.0, seed=7)
    assert a == model.generate(prompt, max_new_tokens=16, temperature=1.0, seed=7)          # same seed
    assert a != model.generate(prompt, max_new_tokens=16, temperature=1.0, seed=8)          # another seed
    assert model.generate(prompt, max_new_tokens=16, temperature=1.3, top_k=1, seed=3) == greedy
    assert model.generate(prompt, max_new_tokens=16, temperature=0.7, top_p=1e-6, seed=3) == greedy
    restricted = model.generate(prompt * 4, max_new_tokens=16, temperature=2.0, top_k=3, seed=1)
    logits = model.logits(np.array(prompt))[0, -1]
    assert restricted[0][0] in np.argsort(logits)[-3:]                                     # within the top 3
    stop = greedy[0][5]
    assert model.generate(prompt, max_new_tokens=16, temperature=0, stop_ids=[stop])[0] == greedy[0][:greedy[0].index(stop) + 1]
    streamed = []
    out = model.generate(prompt, max_new_tokens=16, temperature=0, on_token=lambda row, t: streamed.append(t))
    assert streamed == out[0] == greedy[0]


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": -0.1}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"), ({"max_new_tokens": -1}, "max_tokens must be >= 0"),
    ({"prompts": [[]]}, "at least one token"), ({"max_new_tokens": 1048576}, "exceeds the context length"),
    ({"prompts": ["text"]}, "need a tokenizer"), ({"prompts": [[999]]}, r"\[0, 512\)"),
])
def test_bad_generation_parameters(reference, kwargs, message):
    folder, _ = fixture(reference, "chatglm-f32")
    model = glm_jax.load(folder)
    args = {"prompts": [[1, 2, 3]], "max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        model.generate(args.pop("prompts"), **args)


def test_cli_generate_json_and_streaming(tiny_chat_model, capsys):
    assert main(["generate", "--model", str(tiny_chat_model), "--prompt", "你好", "--chat", "--max-new-tokens", "6",
                 "--temperature", "0", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["prompt_tokens"] == 6 and len(result["ids"]) <= 6 and result["temperature"] == 0
    model = glm_jax.load(tiny_chat_model)
    prompt = model.tokenizer.apply_chat_template([{"role": "user", "content": "你好"}], split_special_tokens=True)
    assert result["ids"] == model.generate([prompt], max_new_tokens=6, temperature=0)[0]
    assert main(["generate", "--model", str(tiny_chat_model), "--prompt", "hi", "--max-new-tokens", "6",
                 "--temperature", "0"]) == 0
    streamed = capsys.readouterr().out
    ids = model.generate(["hi"], max_new_tokens=6, temperature=0)[0]
    assert streamed == model.tokenizer.decode(ids, skip_special_tokens=True) + "\n"


def test_cli_chat_reuses_the_conversation_cache(tiny_chat_model, capsys, monkeypatch):
    """The second turn prefills only what follows the kept first turn, and answers as a fresh
    prefill of the whole conversation does."""
    from glm_jax.engine import Engine

    requests, submit = [], Engine.submit
    monkeypatch.setattr(Engine, "submit", lambda self, *a, **k: requests.append(submit(self, *a, **k)) or requests[-1])
    lines = iter(["hello", "tell me more", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", "--model", str(tiny_chat_model), "--max-new-tokens", "5", "--temperature", "0",
                 "--max-model-len", "300", "--page-size", "4"]) == 0
    first, second = requests
    assert first.cached == 0 and second.cached >= first.prompt_len // 4 * 4 > 0   # the kept turn's full pages
    model = glm_jax.load(tiny_chat_model)
    assert second.output == model.generate([second.prompt], max_new_tokens=5, temperature=0)[0]
    assert capsys.readouterr().out.count("assistant> ") == 2


def test_cli_generate_bad_input(tiny_chat_model, capsys):
    assert main(["generate", "--model", str(tiny_chat_model), "--prompt", "x", "--top-p", "2"]) == 2
    assert "top_p must lie in (0, 1]" in capsys.readouterr().err


@pytest.mark.slow
def test_long_prompt_on_a_paged_pool_over_four_devices(reference):
    """2,100 prompt tokens: 17 pages of 128 round the 4 devices of `sequence`."""
    folder, _ = fixture(reference, "chatglm-f32")
    prompt = np.random.default_rng(5).integers(0, 512, 2100).tolist()
    want = glm_jax.load(folder).generate([prompt], max_new_tokens=6, temperature=0)
    got = glm_jax.load(folder, mesh="sequence=4,tensor=2").generate([prompt], max_new_tokens=6, temperature=0)
    assert got == want


def test_int8_cache_sharded_equals_unsharded(reference, capsys):
    """The int8 cache gives the same greedy tokens on one device, striped over 8 and with one KV
    head per device; a bad name is refused."""
    folder, ref = fixture(reference, "chatglm-f32")
    prompt = ref["input_ids"][0].tolist()
    outs = [glm_jax.load(folder, mesh=mesh, kv_cache_dtype="int8", prefill_chunk=16).generate(
        [prompt], max_new_tokens=12, temperature=0, stop_ids=()) for mesh in (None, "sequence=8", "tensor=4,sequence=2")]
    assert outs[0] == outs[1] == outs[2]
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        glm_jax.load(folder, kv_cache_dtype="int4")


def test_cli_generate_int8_cache(tiny_chat_model, capsys):
    assert main(["generate", "--model", str(tiny_chat_model), "--prompt", "hi", "--max-new-tokens", "4",
                 "--temperature", "0", "--kv-cache-dtype", "int8", "--kv-cache-tokens", "500", "--page-size", "16",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    ids = glm_jax.load(tiny_chat_model, kv_cache_dtype="int8").generate(["hi"], max_new_tokens=4, temperature=0)[0]
    assert result["ids"] == ids and (len(ids) == 4 or result["stopped"])
    pool = result["kv_cache"]
    assert (pool["page_size"], pool["pages_total"], pool["kv_cache_tokens"], pool["pages_used"]) == (16, 32, 512, 0)
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--model", str(tiny_chat_model), "--prompt", "hi", "--kv-cache-dtype", "fp4"])
    assert exit_.value.code == 2
    for flags, message in ((["--page-size", "12"], "page size must be a power of two, got 12"),
                           (["--kv-cache-memory", "0.5"], "--kv-cache-memory needs the devices' memory statistics"),
                           (["--kv-cache-tokens", "100"], "cannot hold one request of"),
                           (["--kv-cache-tokens", "100", "--kv-cache-memory", "0.5"], "not both")):
        capsys.readouterr()
        assert main(["generate", "--model", str(tiny_chat_model), "--prompt", "hi", *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err


def test_int8_cache_logits_against_the_float_cache(reference):
    """The int8 cache's prefill logits differ from the float cache's by the effect of rounding K/V
    to int8 and nothing more. Rounding moves each value by at most scale / 2 (scale = max|x| / 127
    of its token and KV head), evenly spread within that: the bound is the logits' change when
    every K/V value moves by the full scale / 2 with random signs (rms sqrt(3) times rounding's),
    measured on the same random model; and the int8 logits equal those of attention over the
    rounded values to float32 rounding."""
    from glm_jax.attention import exact_attention
    from glm_jax.engine.cache import quantize

    folder, ref = fixture(reference, "chatglm-f32")
    ids = ref["greedy_ids"][:1]                                   # 40 tokens
    t = ids.shape[1]
    layout = Layout(make_mesh("sequence=1", jax.devices()[:1]))
    model = glm_jax.load(folder)
    step = jax.jit(lambda cache: model_step(model.graphdef, model.state, cache, ids, np.arange(t)[None],
                                            np.ones((1, t), bool), np.zeros(1, np.int32), layout=layout,
                                            last_only=False)[0][0])
    cached = {dtype: np.asarray(step(one_row_cache(model.config, layout, 64, 16, dtype)))
              for dtype in (np.float32, np.int8)}

    def moved(move):
        def attention(q, k, v, q_index, k_index):
            return exact_attention(q, *(move(x) for x in (k, v)), q_index, k_index)
        return glm_jax.load(folder, attention=attention).logits(ids)[0]

    def rounded(x):
        q, scale = quantize(x)
        return q.astype(x.dtype) * scale[..., None]

    def worst(x):
        sign = jax.random.rademacher(jax.random.key(0), x.shape, x.dtype)
        return x + sign * quantize(x)[1][..., None] / 2

    rel = lambda a, b: np.linalg.norm(a - b) / np.linalg.norm(b)
    float_logits = cached[np.float32]
    np.testing.assert_allclose(cached[np.int8], moved(rounded), rtol=0, atol=1e-5 * np.abs(float_logits).max())
    bound = rel(moved(worst), float_logits)
    assert 0 < rel(cached[np.int8], float_logits) <= bound, (rel(cached[np.int8], float_logits), bound)
