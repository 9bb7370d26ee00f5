"""Two JAX processes on localhost (CPU, gloo collectives, 4 devices each) form one 8-device mesh."""

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from glm_jax.convert.checkpoint import convert

WORKER = pathlib.Path(__file__).with_name("multihost_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(model, reference, mode):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return [subprocess.Popen([sys.executable, str(WORKER), str(i), str(port), str(model), str(reference), mode],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            for i in range(2)]


@pytest.fixture(scope="module")
def converted(reference, tmp_path_factory):
    out = tmp_path_factory.mktemp("mh") / "model"
    convert(reference / "fixtures" / "chatglm-f32", out, progress=False)
    return out


@pytest.mark.slow
def test_two_processes_reproduce_single_process_results(reference, converted):
    npz = reference / "fixtures" / "chatglm-f32" / "reference.npz"
    ref = np.load(npz)
    procs = launch(converted, npz, "run")
    results = []
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:]))
    want = ref["greedy_ids"][0, ref["input_ids"].shape[1]:].tolist()
    assert sorted(r["process"] for r in results) == [0, 1]
    for r in results:
        assert (r["processes"], r["devices"], r["local_devices"], r["param_shards_here"]) == (2, 8, 4, 4)
        assert r["logits_rel"] <= 1e-5
        assert r["greedy"] == want
        assert r["global_heads"] == 8 and len(r["heads_here"]) == 4
    assert sorted(results[0]["heads_here"] + results[1]["heads_here"]) == list(range(8))


@pytest.mark.slow
def test_a_dead_peer_makes_the_other_fail_in_bounded_time(reference, converted):
    npz = reference / "fixtures" / "chatglm-f32" / "reference.npz"
    start = time.monotonic()
    procs = launch(converted, npz, "die")
    outputs = [p.communicate(timeout=120) for p in procs]
    elapsed = time.monotonic() - start
    assert procs[1].returncode == 3
    assert procs[0].returncode != 0
    assert "another task died" in outputs[0][1] or "unhealthy" in outputs[0][1]
    assert elapsed < 90


def test_two_process_server_answers_as_one_process(tiny_chat_model):  # noqa: F811
    """`glm-jax serve` on 2 processes (4 CPU devices each, one 8-device mesh): process 0 serves
    HTTP and broadcasts every engine round (with n-gram drafts: verification steps on both);
    concurrent greedy requests answer as one process does; SIGTERM to process 0 ends both with exit
    code 0."""
    import queue
    import signal
    import threading

    import openai

    import glm_jax
    from test_serve import text_of

    env = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"},
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    coordinator = f"127.0.0.1:{free_port()}"
    procs = [subprocess.Popen([sys.executable, "-m", "glm_jax.cli", "serve", "--model", str(tiny_chat_model),
                               "--port", "0", "--mesh", "tensor=2,sequence=4", "--max-batch", "4", "--prefill-chunk", "32",
                               "--max-model-len", "256", "--coordinator", coordinator, "--num-processes", "2",
                               "--process-id", str(i), "--speculative", "ngram", "--ngram-min", "1"],
                              stderr=subprocess.PIPE, text=True, env=env)
             for i in range(2)]
    try:
        lines = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in procs[0].stderr], daemon=True).start()
        deadline = time.monotonic() + 240
        while "http://" not in (line := lines.get(timeout=max(1.0, deadline - time.monotonic()))):
            pass
        url = line.split("http://")[1].split()[0]
        client = openai.OpenAI(base_url=f"http://{url}/v1", api_key="none", timeout=120)
        prompts = [[7, 300, 4000, 151330], [11, 12, 13, 14, 15, 16, 17, 18, 19], [151331, 151333, 5000]]
        answers = [None] * len(prompts)

        def ask(i):
            answers[i] = client.completions.create(model="model", prompt=prompts[i], max_tokens=8,
                                                   temperature=0).choices[0].text

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        model = glm_jax.load(tiny_chat_model)
        assert answers == [text_of(model, model.generate([p], max_new_tokens=8, temperature=0)[0]) for p in prompts]
        procs[0].send_signal(signal.SIGTERM)
        assert [p.wait(timeout=60) for p in procs] == [0, 0]
    finally:
        for p in procs:
            p.kill()
