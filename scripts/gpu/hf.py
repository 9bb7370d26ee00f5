"""Sections transformers (GlmForCausalLM on the very same device arrays, timed like glm-jax) and
accuracy (teacher-forced logits of every path against a float32 reference)."""

from __future__ import annotations

import functools
import gc
from typing import Callable

from gpu.bench import GPU, XLA, Bench, context_figures, log, measure, random_ids, ratio


def hf_model(config, arrays: dict):
    """transformers' GlmForCausalLM (SDPA, bf16) on the given device arrays, without copying them
    and without a random init of its own."""
    import torch
    import transformers

    from glm_jax.convert.layout import GLM, hf_config, hf_tensors

    state = {}
    for tensor in hf_tensors(config, GLM):
        parts = [part.to_hf(torch.from_dlpack(arrays[part.param])) for part in tensor.parts]
        state[tensor.name] = parts[0] if len(parts) == 1 else torch.cat(parts)
    device = next(iter(state.values())).device
    cfg = {k: v for k, v in hf_config(config, GLM).items() if k not in ("model_type", "architectures", "torch_dtype")}
    cfg.update(eos_token_id=None, pad_token_id=None)             # exactly N tokens, like glm-jax without stop ids
    hf_cfg = transformers.GlmConfig(**cfg)
    with torch.device("meta"):
        model = transformers.GlmForCausalLM._from_config(hf_cfg, attn_implementation="sdpa")
    model.load_state_dict(state, strict=True, assign=True)             # the bf16 device arrays themselves
    with torch.device(device):       # RoPE inverse frequencies: a buffer the state dict does not hold
        model.model.rotary_emb = type(model.model.rotary_emb)(model.config)
    on_meta = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if on_meta:
        raise RuntimeError(f"transformers model still has meta tensors: {', '.join(on_meta[:3])}")
    return model.eval().requires_grad_(False), device


def section_transformers(bench: Bench) -> dict:
    import torch
    import transformers

    bench.need_model()
    transformers.logging.set_verbosity_error()
    if bench.args.small:
        torch.set_num_threads(1)   # tiny matrices: more threads only wait on each other (and on JAX's)
    model, device = hf_model(bench.config, bench.arrays)
    try:
        def hf_run(prompt: list[int]) -> Callable[[int], list[int]]:
            ids = torch.tensor([prompt], device=device)

            def run(n):
                with torch.no_grad():
                    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
                return out[0, len(prompt):].tolist()                      # to the host: waits for the GPU
            return run

        result = {"attn_implementation": model.config._attn_implementation, "torch": torch.__version__,
                  "transformers": transformers.__version__, "device": str(device)}
        decode_prompt, new = bench.scale.contexts["context_1k"]
        t1, tn, tokens = measure(hf_run(random_ids(bench.config.vocab_size, decode_prompt)), new, bench.scale.repeats)
        result["decode_1k"] = context_figures(bench, decode_prompt, new, t1, tn, first_has_step=False)
        prefill_prompt = bench.scale.contexts["context_8k"][0]
        t1, _, _ = measure(hf_run(random_ids(bench.config.vocab_size, prefill_prompt)), 1, bench.scale.repeats)
        result["prefill_8k"] = context_figures(bench, prefill_prompt, 1, t1, None, first_has_step=False)
        ours = bench.tokens.get(decode_prompt)
        if ours is not None:
            same = [a == b for a, b in zip(ours, tokens)]
            result["greedy_1k"] = {"compared": len(same), "leading_identical": (same + [False]).index(False),
                                   "identical": sum(same)}
        glm = bench.results
        result["decode_speedup_1k"] = ratio(glm.get("context_1k", {}).get("decode_tokens_per_s"),
                                            result["decode_1k"]["decode_tokens_per_s"])
        result["prefill_speedup_8k"] = ratio(glm.get("context_8k", {}).get("prefill_tokens_per_s"),
                                             result["prefill_8k"]["prefill_tokens_per_s"])
        return result
    finally:   # free the torch model (and the gate_up copies) before the long sections
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def chunk_logits(config, graphdef, state, layout, kernel: str, prompt: list[int], chunk: int):
    """Every position's logits [P, V] (float32, on the device) of a chunked prefill with `kernel`,
    the cache in the weights' dtype."""
    import jax
    import numpy as np

    from glm_jax.engine import model_step, one_row_cache

    step = jax.jit(functools.partial(model_step, graphdef, layout=layout, kernel=kernel, last_only=False),
                   donate_argnums=(1,))
    cache = one_row_cache(config, layout, len(prompt), 128, jax.tree.leaves(state)[0].dtype)
    ids = np.asarray(prompt, np.int32)[None]
    out = []
    for start in range(0, len(prompt), chunk):
        part = slice(start, start + chunk)
        logits, cache = step(state, cache, ids[:, part], np.arange(len(prompt), dtype=np.int32)[None, part],
                             np.ones((1, chunk), bool), np.zeros(1, np.int32))
        out.append(logits[0])
    return jax.numpy.concatenate(out)


def hf_logits(bench: Bench, prompt: list[int]):
    """transformers' logits [P, V] (bf16 model, float32 result, on the device) of the whole prompt."""
    import jax.numpy as jnp
    import torch

    model, device = hf_model(bench.config, bench.arrays)
    try:
        with torch.no_grad():
            logits = model(torch.tensor([prompt], device=device)).logits[0].float().contiguous()
        return jnp.from_dlpack(logits).copy() if device.type != "cpu" else jnp.asarray(logits.numpy())
    finally:
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def section_accuracy(bench: Bench) -> dict:
    """Teacher-forced logits of one random prompt (3 prefill chunks: the first attends to itself
    only, the others also to the cache) from the bf16 model through each path: glm-jax with the
    XLA kernel, with cuDNN (GPU only), and transformers (SDPA, the whole prompt at once), against a
    float32 reference: glm-jax with the same weights cast to float32, float32 cache, XLA kernel at
    HIGHEST precision. Per path: relative error (Frobenius), max abs error, the fraction of
    positions whose top-1 token is the reference's."""
    import jax
    import jax.numpy as jnp

    from glm_jax.params import split_model

    bench.need_model()
    chunk = max(bench.args.prefill_chunk // 4, 16)
    prompt = random_ids(bench.config.vocab_size, 3 * chunk)
    gpu = bench.device().get("platform") == "gpu"
    paths = {"glm_jax_bf16_xla": lambda: chunk_logits(bench.config, bench.graphdef, bench.state, bench.layout, XLA,
                                                      prompt, chunk)}
    if gpu:
        paths["glm_jax_bf16_cudnn"] = lambda: chunk_logits(bench.config, bench.graphdef, bench.state, bench.layout,
                                                           GPU, prompt, chunk)
    paths["transformers_bf16_sdpa"] = lambda: hf_logits(bench, prompt)
    logits, result = {}, {"prompt_tokens": len(prompt), "chunk": chunk}
    for name, fn in paths.items():
        try:
            logits[name] = fn().block_until_ready()
        except Exception as e:  # one path failing still leaves the others compared
            result[name] = {"error": f"{type(e).__name__}: {e}"[:1000]}
    arrays32 = {k: v.astype(jnp.float32) for k, v in bench.arrays.items()}
    graphdef32, state32 = split_model(bench.config, jnp.float32, arrays32)
    ref = chunk_logits(bench.config, graphdef32, state32, bench.layout, XLA, prompt, chunk).block_until_ready()
    del arrays32, state32
    top_ref = ref.argmax(-1)
    for name, got in logits.items():
        result[name] = {"relative_error": float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref)),
                        "max_abs_error": float(jnp.abs(got - ref).max()),
                        "top1_agreement": float((got.argmax(-1) == top_ref).mean())}
        log(f"  {name}: {result[name]['relative_error']:.2e} relative, top-1 {result[name]['top1_agreement']:.3f}")
    result["reference"] = {"path": "glm_jax_float32_xla", "logits_std": float(ref.std()),
                           "top1_margin_median": float(jnp.median(jnp.diff(jax.lax.top_k(ref, 2)[0], axis=-1)))}
    xla, cudnn = result.get("glm_jax_bf16_xla", {}), result.get("glm_jax_bf16_cudnn", {})
    if "relative_error" in xla and "relative_error" in cudnn:
        # cuDNN is as exact as the XLA path when neither its error nor its top-1 misses are larger by
        # more than the run-to-run spread of bf16 rounding (25% of the error, 2 points of top-1)
        result["cudnn_as_accurate_as_xla"] = (cudnn["relative_error"] <= 1.25 * xla["relative_error"]
                                              and cudnn["top1_agreement"] >= xla["top1_agreement"] - 0.02)
    return result
