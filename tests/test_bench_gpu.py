"""scripts/bench_gpu.py --small on the CPU: every section runs on one device and reports sane numbers."""

import json
import pathlib
import subprocess
import sys

import pytest

from glm_jax.compile_report import model_flops
from glm_jax.config import GLMConfig

SCRIPT = pathlib.Path(__file__).parents[1] / "scripts" / "bench_gpu.py"
SECTIONS = ("device", "model", "context_1k", "products", "accuracy", "context_8k", "transformers", "context_32k",
            "longest_fit", "prefill_128k", "int8_32k", "decode_kernel")


def bench(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    # the conftest's 8 simulated devices are inherited: the script must still measure one
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)


def chunked_prefill_flops(config: GLMConfig, prompt: int, chunk: int) -> float:
    """The prefill's model FLOPs summed chunk by chunk: chunk i's queries see i*C + (C+1)/2 keys on
    average; the output layer runs for the last token only."""
    head = 2 * config.vocab_size * config.hidden_size
    total = sum(model_flops(config, 1, chunk, i * chunk + (chunk + 1) / 2) for i in range(prompt // chunk))
    return total - head * (prompt - 1)


def in_range(x) -> bool:
    return x is not None and 0 < x < 10


@pytest.mark.slow
def test_small_run_reports_every_section(tmp_path):
    out = tmp_path / "bench.json"
    run = bench("--small", "--out", str(out))
    assert run.returncode == 0, run.stderr[-4000:]
    r = json.loads(out.read_text())
    assert r["meta"]["complete"] and r["meta"]["sections"] == list(SECTIONS)
    for name in SECTIONS:
        assert "error" not in r[name] and "skipped" not in r[name], (name, r[name])

    assert r["device"]["platform"] == "cpu" and r["device"]["devices_visible"] == 1
    assert r["device"]["copy_bytes_per_s"] > 0 and r["device"]["bf16_flops_per_s"] > 0
    config = GLMConfig.from_dict(r["model"]["glm_config"])
    assert config.num_layers == 2 and r["model"]["weight_bytes"] == 2 * config.num_params

    chunk = r["meta"]["prefill_chunk"]
    for name in ("context_1k", "context_8k", "context_32k"):
        c = r[name]
        assert c["decode_tokens_per_s"] > 0 and c["prefill_tokens_per_s"] > 0, c
        assert in_range(c["decode_roofline_fraction"]) and in_range(c["prefill_mfu"]), c
        assert c["prefill_model_flops"] == pytest.approx(chunked_prefill_flops(config, c["prompt_tokens"], chunk))
        weights = 2 * (config.num_params - (config.vocab_size - 1) * config.hidden_size)
        cached = c["prompt_tokens"] + 1 + c["new_tokens"] / 2
        assert c["decode_bytes_per_step"] == weights + config.kv_bytes_per_token(2) * cached

    p = r["products"]
    assert set(p["products"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head"}
    assert p["products"]["gate_up_proj"]["shape"] == [2 * config.intermediate_size, config.hidden_size]
    assert all(v["gb_per_s"] > 0 and v["bytes"] == 2 * v["shape"][0] * v["shape"][1] for v in p["products"].values())
    assert p["per_step_seconds"] > 0 and p["context_1k_step_seconds"] == r["context_1k"]["decode_seconds_per_token"]

    dk = r["decode_kernel"]       # on CPU the Pallas kernel runs interpreted: its figures, not its speed
    for case in dk["attention"].values():
        assert case["microseconds"]["xla"] > 0 and case["microseconds"]["pallas"] > 0
        assert case["max_abs_pallas_vs_float32"] < 0.02 and case["max_abs_xla_vs_float32"] < 0.02, case
    assert set(dk["attention"]) == {"context_1k", "context_32k", "int8_32k"}
    for name in ("context_1k", "context_32k", "int8_32k"):
        assert dk[f"engine_default_{name}"]["decode_seconds_per_token"] == r[name]["decode_seconds_per_token"]
        assert dk[f"engine_xla_{name}"]["decode_seconds_per_token"] > 0 and dk[f"decode_speedup_{name}"] > 0

    t = r["transformers"]
    assert t["attn_implementation"] == "sdpa"
    assert t["decode_1k"]["decode_tokens_per_s"] > 0 and t["prefill_8k"]["prefill_tokens_per_s"] > 0
    assert t["decode_speedup_1k"] > 0 and t["prefill_speedup_8k"] > 0
    assert t["greedy_1k"]["compared"] == r["context_1k"]["new_tokens"]
    assert t["greedy_1k"]["leading_identical"] > 0     # the same weights: at least the first token agrees

    fit = r["longest_fit"]
    assert fit["arithmetic"]["kv_cache_bytes_1m_bf16"] == config.kv_bytes_per_token(2) * 1048576
    bf16 = fit["bf16"]
    longest = bf16["longest_tokens"]
    assert longest and longest % 1024 == 0 and longest <= bf16["predicted_tokens"]
    verified = [c for c in bf16["compiles"] if c["seq_len"] == longest]
    assert verified and verified[0]["fits"]
    assert max(verified[0]["prefill_chunk_peak_bytes"], verified[0]["decode_peak_bytes"]) <= fit["memory_limit_bytes"]
    assert all(c["kv_cache_bytes"] > config.kv_bytes_per_token(2) * c["seq_len"] for c in bf16["compiles"])
    assert fit["int8"]["longest_tokens"] >= longest

    i8 = r["int8_32k"]
    assert i8["decode_tokens_per_s"] > 0 and in_range(i8["decode_roofline_fraction"])
    assert i8["decode_speedup_vs_bf16_cache"] > 0 and i8["greedy_vs_bf16_cache"]["compared"] > 0

    a = r["accuracy"]
    assert "glm_jax_bf16_cudnn" not in a and "cudnn_as_accurate_as_xla" not in a      # GPU only
    assert a["prompt_tokens"] == 3 * a["chunk"]
    for path in ("glm_jax_bf16_xla", "transformers_bf16_sdpa"):   # bf16 against the float32 reference
        assert 1e-4 < a[path]["relative_error"] < 0.05 and a[path]["top1_agreement"] > 0.8, (path, a[path])
    assert a["reference"]["logits_std"] > 0

    p = r["prefill_128k"]
    assert p["seconds"] > 0 and not p["includes_compile"] and in_range(p["prefill_mfu"])

    assert "targets:" in run.stdout


def test_spent_budget_skips_the_optional_sections(tmp_path):
    out = tmp_path / "bench.json"
    run = bench("--small", "--budget-s", "0.001", "--sections", "context_8k,longest_fit", "--out", str(out))
    assert run.returncode == 0, run.stderr[-4000:]
    r = json.loads(out.read_text())
    assert r["meta"]["sections"] == ["device", "model", "context_1k", "context_8k", "longest_fit"]
    assert r["context_1k"]["decode_tokens_per_s"] > 0                      # always runs
    assert r["context_8k"] == {"skipped": "budget"} and r["longest_fit"] == {"skipped": "budget"}
    assert "transformers" not in r and "prefill_128k" not in r


@pytest.mark.parametrize("args, message", [
    (["--prefill-chunk", "100"], "--prefill-chunk must be a positive power of two, got 100"),
    (["--sections", "context_8k,warp"], "--sections: unknown 'warp'; choose from products, accuracy, context_8k, "
                                        "transformers, context_32k, longest_fit, prefill_128k, int8_32k, "
                                        "decode_kernel"),
    (["--budget-s", "0"], "--budget-s must be positive, got 0"),
])
def test_bad_input_exits_2(args, message):
    run = bench("--small", *args, timeout=60)
    assert run.returncode == 2 and run.stderr.strip() == f"bench_gpu.py: {message}"
