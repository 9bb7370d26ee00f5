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
