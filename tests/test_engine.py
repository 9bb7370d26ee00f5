"""The decode engine: continuous batching, per-request prefill on sharded page pools, prefix reuse,
cancel, LRU eviction of cached pages."""

import dataclasses
import threading

import numpy as np
import pytest

import glm_jax
from glm_jax.engine import EngineClosed, QueueFull, SamplingParams
from glm_jax.engine.multihost import Chunk, Plan, pack, unpack
from glm_jax.sampling import MAX_STOP_IDS


@pytest.fixture(scope="module")
def f32(reference):
    folder = reference / "fixtures" / "chatglm-f32"
    return folder, np.load(folder / "reference.npz")


def greedy(n, stops=()):
    return SamplingParams(max_tokens=n, temperature=0.0, stop_ids=tuple(stops))


def run(engine):
    while engine.step():
        pass


@pytest.mark.parametrize("mesh", [None, "data=2,sequence=2,tensor=2"])
def test_staggered_requests_each_equal_the_original(f32, mesh):
    """Requests arriving while others decode (one prefilled chunk by chunk meanwhile) give the
    original PyTorch model's greedy tokens; on meshes whose batch axis splits the cache rows."""
    folder, ref = f32
    model = glm_jax.load(folder, mesh=mesh, prefill_chunk=8)
    engine = model.engine(max_batch=4, max_model_len=64, steps_per_call=2, prefill_budget=8)
    prompt = ref["input_ids"][0].tolist()                                   # 24 tokens: 3 chunks, one a round
    want = ref["greedy_ids"][0, len(prompt):].tolist()
    events = []
    log = lambda name: (lambda r, ids: events.append((name, len(ids))))
    first = engine.submit(prompt, greedy(16), log("first"))
    for _ in range(4):                                                      # 3 prefill chunks, then decoding
        engine.step()
    second = engine.submit(prompt, greedy(16), log("second"))
    third = engine.submit(prompt[5:], greedy(8), log("third"))
    run(engine)
    assert first.output == want and second.output == want
    assert third.output == model.generate([prompt[5:]], max_new_tokens=8, temperature=0)[0]
    # the first request kept decoding while the second was prefilled (one chunk per step)
    second_start = events.index(("second", 2))
    assert sum(1 for name, n in events[:second_start] if name == "first" and n) >= 4
    assert [r.finish_reason for r in (first, second, third)] == ["length"] * 3
    assert engine.stats()["running"] == 0


def test_kv_reuse_prefills_only_the_new_turn(f32):
    """The next turn extends the kept conversation: only its new tokens are prefilled, and the
    answer equals a fresh prefill of the whole prompt."""
    folder, ref = f32
    model = glm_jax.load(folder, prefill_chunk=8, page_size=4)
    engine = model.engine(max_batch=2, max_model_len=96, steps_per_call=4)
    turn1 = ref["input_ids"][0].tolist()
    a = engine.submit(turn1, greedy(10))
    run(engine)
    turn2 = turn1 + a.output + ref["input_ids"][1][:7].tolist()
    b = engine.submit(turn2, greedy(10))
    run(engine)
    held = len(turn1) + len(a.output) - 1                                   # all but the never-fed last token
    assert b.cached == held // 4 * 4                                        # its full pages
    assert b.output == model.generate([turn2], max_new_tokens=10, temperature=0)[0]
    # a prompt that parts from the kept one early reuses only the shared full pages
    c = engine.submit(turn1[:6] + [7, 8, 9], greedy(4))
    run(engine)
    assert c.cached == 4
    assert c.output == model.generate([turn1[:6] + [7, 8, 9]], max_new_tokens=4, temperature=0)[0]


def test_cancel_frees_the_pages_and_lru_eviction(f32):
    folder, ref = f32
    model = glm_jax.load(folder, prefill_chunk=8, page_size=4, kv_cache_tokens=64)     # 16 pages
    engine = model.engine(max_batch=2, max_model_len=64, steps_per_call=1, prefill_budget=8)
    p = ref["input_ids"][0].tolist()
    seen = []
    long = engine.submit(p, greedy(40), lambda r, ids: seen.append(list(ids)))
    for _ in range(5):
        engine.step()
    assert engine.stats()["pages_used"] == 7                                # 24 prompt tokens + the first
    engine.cancel(long)
    assert not engine.step()
    assert long.finish_reason == "abort" and long.done.is_set() and seen[-1] == []
    stats = engine.stats()
    assert stats["running"] == 0 and 0 < len(long.output) < 40
    assert (stats["pages_used"], stats["pages_cached"], stats["pages_free"]) == (0, 6, 16)   # full pages stay cached
    engine.forget()
    x = engine.submit(p[:10], greedy(2))                                    # caches 2 full pages
    run(engine)
    y = engine.submit(p[3:15], greedy(2))                                   # 3
    run(engine)
    engine.submit(p[:10] + x.output, greedy(2))                             # shares x's 2, caches 1 more
    run(engine)
    assert engine.stats()["pages_cached"] == 6
    z = engine.submit([1, 2, 3] * 16, greedy(2))                            # 13 pages: 10 free + y's 3 evicted
    run(engine)
    assert engine.stats()["evictions"] == 3
    again = engine.submit(p[:10] + x.output, greedy(1))
    run(engine)
    assert again.cached == 8                                                # x was kept
    again = engine.submit(p[3:15] + y.output, greedy(1))
    run(engine)
    assert again.cached == 0                                                # y was evicted
    assert z.finish_reason == "length"


def test_bad_requests_and_a_full_queue(f32):
    folder, _ = f32
    engine = glm_jax.load(folder).engine(max_batch=1, max_model_len=64, max_queue=2)
    length = engine.max_model_len
    with pytest.raises(ValueError, match=f"60 tokens.*max_tokens \\(10\\).*{length}"):
        engine.submit([5] * 60, greedy(10))
    for bad in ([], [-1], [10**9]):
        with pytest.raises(ValueError):
            engine.submit(bad, greedy(1))
    with pytest.raises(ValueError, match="max_tokens"):
        engine.submit([5], greedy(0))
    engine.submit([5], greedy(1))
    engine.submit([6], greedy(1))
    with pytest.raises(QueueFull):
        engine.submit([7], greedy(1))


def test_threaded_engine_serves_concurrent_submissions_and_drains_on_shutdown(f32):
    folder, ref = f32
    model = glm_jax.load(folder, prefill_chunk=8)
    prompts = [ref["input_ids"][i % 2][: 6 + i].tolist() for i in range(6)]
    alone = model.generate(prompts, max_new_tokens=6, temperature=0)
    engine = model.engine(max_batch=4, max_model_len=64, steps_per_call=2)
    engine.start()
    results = [None] * len(prompts)

    def client(i):
        request = engine.submit(prompts[i], greedy(6))
        request.done.wait(60)
        results[i] = request.output

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == alone
    late = engine.submit(prompts[0], greedy(20))
    engine.shutdown(timeout=60)
    assert late.finish_reason == "length" and len(late.output) == 20      # in-flight work finished
    with pytest.raises(EngineClosed):
        engine.submit(prompts[0], greedy(1))


def test_warm_up_compiles_everything_and_changes_nothing(f32):
    """After warm_up, requests of every prompt and batch size compile nothing more, and answer as
    without it."""
    folder, ref = f32
    model = glm_jax.load(folder, prefill_chunk=32)
    engine = model.engine(max_batch=3, max_model_len=96, steps_per_call=3)
    engine.warm_up()
    programs = engine._programs()
    compiled = (programs.set_pages, programs.prefill, programs.admit, programs.decode)
    sizes = [f._cache_size() for f in compiled]
    prompts = [ref["input_ids"][0].tolist(), ref["input_ids"][1][:3].tolist(), (ref["input_ids"][0] % 50).tolist() * 3]
    requests = [engine.submit(p, greedy(5)) for p in prompts]
    run(engine)
    assert [f._cache_size() for f in compiled] == sizes
    assert [r.output for r in requests] == [model.generate([p], max_new_tokens=5, temperature=0)[0] for p in prompts]


def test_forget_prefills_prompts_whole(f32):
    folder, ref = f32
    engine = glm_jax.load(folder, prefill_chunk=8, page_size=4).engine(max_batch=1, max_model_len=64)
    prompt = ref["input_ids"][0].tolist()
    first = engine.submit(prompt, greedy(3))
    run(engine)
    again = engine.submit(prompt, greedy(3))
    run(engine)
    engine.forget()
    fresh = engine.submit(prompt, greedy(3))
    run(engine)
    assert (again.cached, fresh.cached) == ((len(prompt) - 1) // 4 * 4, 0)
    assert first.output == again.output == fresh.output


def test_plan_survives_pack_and_unpack():
    """A round's plan as processes share it: packed into fixed-shape arrays (the same shapes for any
    plan of the engine's batch and prefill chunk) and unpacked exactly: chunks with and without an
    admission (every sampling field, seeds past 2**31, floats exact in float32, the precision the
    device programs take), cancels, a decode selection and its speculative drafts."""
    batch, chunk, k = 4, 16, 3
    admit = SamplingParams(max_tokens=77, temperature=0.71875, top_p=0.9375, top_k=40, seed=2**32 - 5,
                           stop_ids=tuple(range(151329, 151329 + MAX_STOP_IDS)))
    plan = Plan(cancel=np.array([False, True, False, True]),
                chunks=[Chunk(2, np.arange(16, dtype=np.int32) + 100, start=32, real=16, admit=None),
                        Chunk(0, np.array([0] * 5 + [7, 8, 9], np.int32), start=3, real=3, admit=admit, drawn=5),
                        Chunk(3, np.array([151551] * 16, np.int32), start=0, real=16,
                              admit=SamplingParams(1, temperature=0.0, seed=2**31 + 1))],
                decode=np.array([1, 3, 4, 4], np.int32), steps=1,
                pages=np.array([[0, 0, 17], [3, 5, 2], [2, 1, 0]], np.int32),
                drafts=np.array([[5, 151551, -1], [-1, -1, -1], [7, 8, 9], [-1, -1, -1]], np.int32))
    packed = pack(plan, batch, chunk, k)
    empty = pack(Plan.stopping(batch), batch, chunk, k)
    assert {k: (v.shape, v.dtype) for k, v in packed.items()} == {k: (v.shape, v.dtype) for k, v in empty.items()}
    back = unpack(packed, np.pad(plan.pages, ((0, 1), (0, 0))))            # a bucket larger than its 3
    assert (back.steps, back.stop) == (1, False) and unpack(empty).stop and unpack(empty).drafts is None
    np.testing.assert_array_equal(back.drafts, plan.drafts)
    assert unpack(pack(dataclasses.replace(plan, drafts=None), batch, chunk, k)).drafts is None
    np.testing.assert_array_equal(back.pages, plan.pages)
    np.testing.assert_array_equal(back.cancel, plan.cancel)
    np.testing.assert_array_equal(back.decode, plan.decode)
    assert len(back.chunks) == 3
    for got, want in zip(back.chunks, plan.chunks):
        assert (got.row, got.start, got.real, got.admit, got.drawn) == (want.row, want.start, want.real, want.admit,
                                                                         want.drawn)
        np.testing.assert_array_equal(got.tokens, want.tokens)


@pytest.mark.parametrize("field, value, message", [
    ("temperature", -0.5, "temperature must be >= 0"), ("top_p", 0.0, r"top_p must lie in \(0, 1\]"),
    ("top_p", 1.5, "top_p"), ("top_k", -1, "top_k must be >= 0"), ("max_tokens", -1, "max_tokens must be >= 0"),
    ("stop_ids", tuple(range(MAX_STOP_IDS + 1)), f"at most {MAX_STOP_IDS} stop ids"),
    ("top_p", 1e-50, "top_p"), ("stop_ids", (5, -1), "stop ids must be >= 0")])
def test_sampling_params_validate_themselves(field, value, message):
    """Every way in (the API, the server, the engine) builds SamplingParams, which refuse bad values."""
    with pytest.raises(ValueError, match=message):
        SamplingParams(**{"max_tokens": 4, field: value})


@pytest.mark.slow
def test_preempted_requests_resume_with_the_same_tokens(f32):
    """Six requests on a pool with room for about two: the newest running ones are preempted and
    resumed (prompt and what they emitted prefilled again, mostly from cached pages; the next draw
    with the same key), greedy and sampled alike: every answer equals the one from a pool that
    holds them all."""
    folder, ref = f32
    prompts = [ref["input_ids"][i % 2][: 10 + 3 * i].tolist() for i in range(6)]
    params = [SamplingParams(max_tokens=24, temperature=0.0 if i % 2 else 0.9, top_k=20 if i % 3 else 0, seed=i)
              for i in range(6)]

    def answers(**pool):
        engine = glm_jax.load(folder, prefill_chunk=8, page_size=8, **pool).engine(max_batch=6, max_model_len=64,
                                                                                    steps_per_call=4)
        requests = [engine.submit(p, s) for p, s in zip(prompts, params)]
        run(engine)
        return [r.output for r in requests], engine.stats()

    roomy, stats = answers()
    assert stats["preemptions"] == 0
    tight, stats = answers(kv_cache_tokens=96)                              # 12 pages
    assert stats["preemptions"] > 0 and stats["pages_used"] == 0
    assert tight == roomy and all(len(out) == 24 for out in roomy)


def test_kv_cache_memory_sizes_the_pool_from_free_device_memory(f32, monkeypatch):
    """--kv-cache-memory F: F of the memory each device has left, over the devices a token's K/V
    are spread on (pages over `sequence`, heads over `tensor`), in whole pages."""
    from glm_jax.engine import scheduler
    from glm_jax.engine.cache import cache_bytes_per_token

    folder, _ = f32
    monkeypatch.setattr(scheduler, "free_device_memory", lambda devices: 10 * 2**20)
    model = glm_jax.load(folder, mesh="tensor=2,sequence=4", page_size=16, kv_cache_memory=0.5)
    engine = model.engine(max_batch=2, max_model_len=64)
    per_token = cache_bytes_per_token(model.config, model.layout, model.dtype)
    want = int(0.5 * 10 * 2**20 * 8 // per_token)                   # 4 page devices x 2 head shards
    assert want - 16 * 4 < engine.stats()["kv_cache_tokens"] <= want + 16 * 4
