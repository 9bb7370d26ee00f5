#!/usr/bin/env python3
"""Train-step speed on this CPU: glm-jax's compiled train step against PyTorch (transformers'
GlmForCausalLM, SDPA, torch.optim.AdamW) on the same random weights and the same batch.

  python scripts/bench_train.py [--layers 2 --hidden 512 --seq-len 1024 --batch 2 --steps 6] [--json]

Model: random GLM-4 (8 query / 2 KV heads of dim 64, ffn 1408, vocab 32,768, float32, partial
rotary 0.5). Both sides: AdamW (lr 1e-4, betas 0.9/0.999, eps 1e-8, no weight decay), gradient
clipping at 1.0, the loss over every next token of the batch, float32. glm-jax: one jitted step
(donated state, remat "none", "full" and "segments"), PyTorch: zero_grad, forward with labels, backward,
clip, step. Two untimed rounds (compilation, first use of the buffers), then --steps rounds,
each timing one step of every side in turn (so the machine's drifts fall on all sides alike).
Figures: the median seconds per step, tokens/s = batch x seq_len / that, and the range of the
per-round ratios; and the floor: the step's model FLOPs (forward and backward, no remat) at the
best float32 product rate jax or torch reaches on this machine in the same run, with each side's
fraction of it. The losses of the first steps are printed side by side (same weights, same
data: they should agree to float32 rounding).
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=1"

import argparse  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

import numpy as np  # noqa: E402
from _bench import best_time, hf_random_model, rounds  # noqa: E402

sys.path.insert(1, str(pathlib.Path(__file__).resolve().parents[1]))
REMATS = ("none", "full", "segments")


def torch_model(args, folder: pathlib.Path):
    """transformers' GlmForCausalLM (SDPA, training mode) of a random model written at folder, which
    glm_jax.load reads: both sides start from the same weights."""
    from glm_jax.testing import random_config

    config = random_config(vocab_size=32768, hidden_size=args.hidden, intermediate_size=1408, num_layers=args.layers,
                           num_heads=8, num_kv_heads=2, head_dim=64, rope_theta=1e4, max_seq_len=8192,
                           eos_token_ids=(1,), pad_token_id=None)
    return hf_random_model(folder, config).train()


def matmul_rate(m: int, k: int, n: int, repeats: int = 3) -> dict:
    """Best float32 GFLOP/s of one [m, k] x [k, n] product on this machine, by jax and by torch (the
    train step's largest products are the loss's [tokens, hidden] x [hidden, vocab])."""
    import jax
    import jax.numpy as jnp
    import torch

    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
    xa, xb = jnp.asarray(a), jnp.asarray(b)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    product = jax.jit(jnp.matmul)
    product(xa, xb).block_until_ready()
    flops = 2.0 * m * k * n
    return {"jax": flops / best_time(lambda: product(xa, xb).block_until_ready(), repeats) / 1e9,
            "torch": flops / best_time(lambda: ta @ tb, repeats) / 1e9}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6, help="timed rounds, one step of every side each (after two untimed rounds)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import torch

    import glm_jax
    from glm_jax.compile_report import model_flops
    from glm_jax.params import flat_params
    from glm_jax.sharding import make_mesh
    from glm_jax.train.step import Batch, OptimizerConfig, Trainer, make_optimizer

    torch.set_num_threads(os.cpu_count())
    folder = pathlib.Path(tempfile.mkdtemp())
    tm = torch_model(args, folder)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 32768, (args.batch, args.seq_len))
    tokens = args.batch * args.seq_len
    result = {"command": " ".join(["python scripts/bench_train.py", *(argv or sys.argv[1:])]),
              "model": {"layers": args.layers, "hidden": args.hidden, "heads": "8/2 x 64", "vocab": 32768,
                        "dtype": "float32"}, "batch": args.batch, "seq_len": args.seq_len, "steps": args.steps,
              "threads": {"torch": torch.get_num_threads(), "cpus": os.cpu_count()}}

    # PyTorch
    opt = torch.optim.AdamW(tm.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    t_ids = torch.from_numpy(ids)
    losses = {"torch": []}

    def torch_step():
        opt.zero_grad(set_to_none=True)
        loss = tm(t_ids, labels=t_ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tm.parameters(), 1.0)
        opt.step()
        losses["torch"].append(float(loss.detach()))

    # glm-jax, same initial weights (the saved folder) and data
    model = glm_jax.load(folder, mesh=make_mesh("sequence=1", jax.devices()[:1]))
    batch = Batch(*(jnp.asarray(x[None], jnp.int32) for x in (ids, ids, np.broadcast_to(np.arange(args.seq_len),
                                                                                       ids.shape), np.ones_like(ids))))
    config = OptimizerConfig(learning_rate=1e-4, schedule="constant", clip_norm=1.0)

    def jax_side(remat):
        trainer = Trainer(model.config, model.layout, model.dtype, make_optimizer(config), remat=remat)
        step = jax.jit(trainer.step, donate_argnums=0)
        state = [trainer.init(flat_params(model.state))]
        losses[remat] = []

        def jax_step():
            state[0], metrics = step(state[0], {}, batch)
            losses[remat].append(float(metrics["loss"]))          # waits for the step
        return jax_step

    sides = {"torch": torch_step, **{remat: jax_side(remat) for remat in REMATS}}
    seconds = rounds(sides, args.steps)      # after two untimed rounds: compilation, first use of the buffers
    torch_s = statistics.median(seconds["torch"])
    result["torch"] = {"seconds_per_step": torch_s, "tokens_per_s": tokens / torch_s, "losses": losses["torch"][:3]}
    for remat in REMATS:
        s = statistics.median(seconds[remat])
        result[f"glm_jax_remat_{remat}"] = {"seconds_per_step": s, "tokens_per_s": tokens / s,
                                            "losses": losses[remat][:3], "speedup_vs_torch": torch_s / s,
                                            "speedup_per_round": [t / j for t, j in zip(seconds["torch"], seconds[remat])]}
    # the floor: the step's model FLOPs (forward + backward, remat none) at the best product rate measured now
    rate = matmul_rate(tokens, args.hidden, 32768)
    flops = 3 * model_flops(model.config, args.batch, args.seq_len, (args.seq_len + 1) / 2)
    floor = flops / (max(rate.values()) * 1e9)
    result["floor"] = {"step_flops": flops, "matmul_gflops_per_s": rate, "seconds_per_step": floor,
                       "torch_fraction": floor / torch_s,
                       **{f"glm_jax_remat_{r}_fraction": floor / result[f"glm_jax_remat_{r}"]["seconds_per_step"]
                          for r in REMATS}}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"train step, {args.layers} layers, hidden {args.hidden}, batch {args.batch} x {args.seq_len} tokens, "
              f"float32, AdamW (median of {args.steps})")
        print(f"  torch (SDPA)          {torch_s:7.3f} s/step {tokens / torch_s:9,.0f} tokens/s  losses "
              f"{[round(x, 5) for x in losses['torch'][:3]]}")
        for remat in REMATS:
            r = result[f"glm_jax_remat_{remat}"]
            print(f"  glm-jax remat {remat:<8} {r['seconds_per_step']:7.3f} s/step {r['tokens_per_s']:9,.0f} tokens/s  "
                  f"{r['speedup_vs_torch']:.2f}x torch (rounds {min(r['speedup_per_round']):.2f}-"
                  f"{max(r['speedup_per_round']):.2f}x); losses {[round(x, 5) for x in r['losses']]}")
        f = result["floor"]
        print(f"  floor: {flops / 1e9:,.0f} GFLOP a step at {max(rate.values()):.0f} GFLOP/s (the best float32 "
              f"[{tokens} x {args.hidden}] x [{args.hidden} x 32768] product now: jax {rate['jax']:.0f}, torch "
              f"{rate['torch']:.0f}) = {floor:.3f} s; torch at {f['torch_fraction']:.0%} of it, glm-jax "
              + ", ".join(f"{r} {f[f'glm_jax_remat_{r}_fraction']:.0%}" for r in REMATS))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
