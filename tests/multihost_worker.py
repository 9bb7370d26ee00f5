"""One process of the 2-process tests (run by test_multihost.py, not collected by pytest).

argv: process_id port model_dir reference_npz mode   (mode: run | die)
"""

import json
import os
import sys

pid, port, model_dir, reference, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid, heartbeat_timeout_seconds=10)

import numpy as np  # noqa: E402

import glm_jax  # noqa: E402

if mode == "die" and pid == 1:
    os._exit(3)                                  # a peer vanishes without a word
ref = np.load(reference)
model = glm_jax.load(model_dir, mesh="sequence=8")
params = model.state["layers"][0]["attn"]["q_proj"][...]
logits = model.logits(ref["input_ids"])
greedy = model.generate([ref["input_ids"][0].tolist()], max_new_tokens=16, temperature=0)[0]
# weights split over both hosts: each process restores only the heads its own devices hold
sharded = glm_jax.load(model_dir, mesh="tensor=8").state["layers"][0]["attn"]["q_proj"][...]
heads_here = sorted({i for shard in sharded.addressable_shards for i in range(*shard.index[0].indices(8))})
print("RESULT " + json.dumps({
    "heads_here": heads_here, "global_heads": sharded.shape[0],
    "process": jax.process_index(), "processes": jax.process_count(), "devices": jax.device_count(),
    "local_devices": jax.local_device_count(), "param_shards_here": len(params.addressable_shards),
    "logits_rel": float(np.linalg.norm(logits - ref["logits"]) / np.linalg.norm(ref["logits"])),
    "greedy": greedy}), flush=True)
