"""Ahead-of-time compile reports: the arithmetic on local devices, the 1M-token fit on a TPU v5e-8."""

import importlib.util
import json

import pytest

from glm_jax.cli import main
from glm_jax.compile_report import compile_report, model_flops
from glm_jax.config import GLMConfig, PRESETS


# TPU topologies start libtpu, which one process at a time may hold: these tests share one worker.
pytestmark = pytest.mark.xdist_group("libtpu")

def test_local_report_fields_and_arithmetic(reference):
    config = GLMConfig.from_hf(reference / "fixtures" / "chatglm-f32")
    reports = compile_report(config, topology="local", seq_len=4096, batch=2, mesh="tensor=2,sequence=4", chunk=256)
    assert [r.program for r in reports] == ["prefill chunk (256 tokens)", "decode step"]
    for r in reports:
        # K and V: 2 layers x 2 x a pool of 2 x 4096 slots [4 heads, 64 pages, 128, 16] bf16, split 2
        # (heads) x 4 (pages), plus the page tables [2 rows, 32 pages] int32 every device holds
        assert r.kv_cache_bytes_per_device == 2 * 2 * (2 * 4096 * 4 * 16 * 2) // 8 + 2 * 32 * 4
        assert r.alias_bytes_per_device >= r.kv_cache_bytes_per_device   # the cache is donated, updated in place
        assert r.hbm_bytes_per_device is None and r.fits is None and r.flops > 0
    assert reports[1].model_flops == model_flops(config, 2, 1, 4096)


def test_model_flops_of_the_1m_model():
    c = PRESETS["glm-4-9b-chat-1m"]
    dense = 2 * (c.num_params - c.vocab_size * c.hidden_size)
    assert model_flops(c, 1, 1, 0) == dense                       # 2 x 8.86e9 per token
    assert c.num_params == 9_483_857_920 and abs(dense - 2 * 8.863e9) < 0.01e9


def test_cli_json(reference, capsys):
    assert main(["compile-report", "--config", str(reference / "fixtures" / "chatglm-f32"), "--topology", "local",
                 "--seq-len", "2048", "--mesh", "sequence=8", "--chunk", "128", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    keys = {"program", "argument_bytes_per_device", "output_bytes_per_device", "alias_bytes_per_device",
            "temp_bytes_per_device", "peak_bytes_per_device", "hbm_bytes_per_device", "fits", "flops",
            "seconds_at_peak", "kv_cache_bytes_per_device"}
    assert len(rows) == 2 and all(keys <= set(row) for row in rows)


@pytest.mark.parametrize("topology, wrong", [("v9z:1x1", "unknown chip 'v9z'"),
                                             ("v5e", "not of the form CHIP:SHAPE"),
                                             ("v5e:2y4", "not of the form CHIP:SHAPE")])
def test_unknown_topology(capsys, topology, wrong):
    """A malformed topology names what is wrong and the known forms, in one line; the [tpu] extra is
    suggested only where libtpu is missing (and the name is well formed)."""
    assert main(["compile-report", "--config", "glm-4-9b", "--topology", topology, "--seq-len", "8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"glm-jax compile-report: error: TPU topology {topology!r}: {wrong}; ") and err.count("\n") == 1
    assert "v5e, v5p, v6e" in err and "v5e:2x4" in err and "[tpu]" not in err


def test_train_step_report_has_no_kv_cache(reference, capsys):
    """A train step keeps no KV cache: the report has no line for one."""
    config = ["--config", str(reference / "fixtures" / "chatglm-f32"), "--topology", "local", "--seq-len", "32",
              "--train"]
    assert main(["compile-report", *config]) == 0
    text = capsys.readouterr().out
    assert text.startswith("train step (full fine-tuning") and "peak" in text and "KV cache" not in text


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs the [tpu] extra (libtpu)")
def test_million_token_prefill_and_decode_fit_a_v5e_8():
    """The 1M-token programs of glm-4-9b-chat-1m on v5e-8, at a tenth of its depth (4 of 40 layers:
    every layer is the same program, and the 40-layer compile takes minutes; its figures are in the
    README, from `glm-jax compile-report --config glm-4-9b-chat-1m --topology v5e:2x4 --seq-len 1048576`)."""
    config = PRESETS["glm-4-9b-chat-1m"].replace(num_layers=4)
    reports = compile_report(config, topology="v5e:2x4", seq_len=1048576)
    for r in reports:
        assert r.fits, r.format()
        assert r.kv_cache_bytes_per_device == pytest.approx(2**30, rel=0.01)         # 8 GiB / 8 chips
        assert r.argument_bytes_per_device < 1.5 * 2**30                             # weights + cache


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs the [tpu] extra (libtpu)")
@pytest.mark.parametrize("kv_cache_dtype", [None, "int8"])
def test_decode_writes_the_pool_in_place_on_tpu(kv_cache_dtype):
    """On v5e-8 (compiled ahead of time), a decode step's temporaries stay below one layer's K pool
    whatever the depth: each layer's new K/V are written into the pool where it lies (a scatter along
    a [G, P*page, D] view made XLA copy every layer's pool to another layout and back: 23.57 GiB of
    temporaries for 2M int8 tokens at 1M on v5e-8)."""
    config = GLMConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_layers=3, num_heads=8,
                       num_kv_heads=2, head_dim=128, max_seq_len=1 << 20)
    tokens = 1 << 20
    (_, decode) = compile_report(config, topology="v5e:2x4", seq_len=1 << 16, batch=8, chunk=128,
                                 kv_cache_dtype=kv_cache_dtype, kv_cache_tokens=tokens)
    layer_pool = tokens // 8 * config.num_kv_heads * config.head_dim * (1 if kv_cache_dtype else 2)   # one K, one chip
    assert decode.temp_bytes_per_device < layer_pool, decode.format()


def test_int8_cache_report(reference, capsys):
    """--kv-cache-dtype int8: int8 K/V plus a float32 scale per slot and KV head, about half the bf16 cache
    (both with the page table)."""
    config = ["--config", str(reference / "fixtures" / "chatglm-f32"), "--topology", "local", "--seq-len", "2048",
              "--mesh", "sequence=8", "--chunk", "128", "--json"]
    assert main(["compile-report", *config]) == 0
    bf16 = json.loads(capsys.readouterr().out)[1]["kv_cache_bytes_per_device"]
    assert main(["compile-report", *config, "--kv-cache-dtype", "int8"]) == 0
    int8 = json.loads(capsys.readouterr().out)[1]["kv_cache_bytes_per_device"]
    c = GLMConfig.from_hf(reference / "fixtures" / "chatglm-f32")
    slots, table = 2048 // 8, 2048 // 128 * 4                    # a device's pool slots; one row's page table
    values, scales = 2 * c.num_layers * slots * c.num_kv_heads * c.head_dim, 2 * c.num_layers * slots * c.num_kv_heads * 4
    assert int8 == values + scales + table and bf16 == 2 * values + table


@pytest.mark.slow
def test_train_step_report(reference, capsys):
    """--train compiles one train step; LoRA holds the frozen weights plus small adapters and their
    optimizer state, full fine-tuning float32 master weights and two AdamW moments on top."""
    config = ["--config", str(reference / "fixtures" / "chatglm-f32"), "--topology", "local", "--seq-len", "256",
              "--mesh", "sequence=8", "--train", "--json"]
    assert main(["compile-report", *config]) == 0
    full = json.loads(capsys.readouterr().out)[0]
    assert main(["compile-report", *config, "--lora-rank", "2"]) == 0
    lora = json.loads(capsys.readouterr().out)[0]
    assert full["program"] == "train step (full fine-tuning, remat full)"
    assert lora["program"] == "train step (LoRA rank 2, remat full)"
    c = GLMConfig.from_hf(reference / "fixtures" / "chatglm-f32")
    weights = 4 * c.num_params                                       # float32 fixture: 4 bytes a weight
    # full: master weights + 2 moments, sharded over the 8 devices (weights over sequence)
    assert full["argument_bytes_per_device"] >= 3 * weights / 8
    assert lora["argument_bytes_per_device"] < 1.5 * weights / 8 < full["argument_bytes_per_device"]
    assert full["model_flops"] == lora["model_flops"] > 0
    assert main(["compile-report", *config[:-2], "--lora-rank", "2"]) == 2           # needs --train
    assert capsys.readouterr().err.strip() == ("glm-jax compile-report: error: --lora-rank, --remat and "
                                               "--no-gradient-fence need --train")
    assert main(["compile-report", *config, "--lora-rank", "2", "--remat", "segments"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["program"] == "train step (LoRA rank 2, remat segments)"


def test_quantized_weights_report(reference, capsys):
    """--quantize int8: the weights' arguments shrink by exactly the bytes the quantization saves."""
    import jax.numpy as jnp

    from glm_jax.options import Quantization
    from glm_jax.params import param_specs
    from glm_jax.quantize import stored_bytes, stored_specs

    config = ["--config", str(reference / "fixtures" / "chatglm-f32"), "--topology", "local", "--seq-len", "256",
              "--mesh", "sequence=8", "--chunk", "64", "--json"]
    assert main(["compile-report", *config]) == 0
    bf16 = json.loads(capsys.readouterr().out)
    assert main(["compile-report", *config, "--quantize", "int8"]) == 0
    int8 = json.loads(capsys.readouterr().out)
    assert [r["program"] for r in int8] == ["prefill chunk (64 tokens, int8 weights)", "decode step (int8 weights)"]
    specs = param_specs(GLMConfig.from_hf(reference / "fixtures" / "chatglm-f32"), jnp.bfloat16)
    saved = stored_bytes(specs) - stored_bytes(stored_specs(specs, Quantization("int8")))
    for a, b in zip(bf16, int8):                               # weights replicated over `sequence`
        assert a["argument_bytes_per_device"] - b["argument_bytes_per_device"] == saved


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs the [tpu] extra (libtpu)")
@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quantized_products_make_no_float_copy_of_the_weight_on_tpu(kind):
    """On a v5e (compiled ahead of time), the quantized product of a decode token reads the int8 /
    int4 weight inside the dot: no temporary the size of the weight in bf16. A prefill chunk: int8
    too; int4 (grouped) gets one bf16 copy of the weight (XLA's choice; XLA's CPU backend converts
    every weight to float32 first: docs/benchmarks.md, "Quantized weights")."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import topologies

    from glm_jax.model import dense
    from glm_jax.options import Quantization
    from glm_jax.quantize import Quantized, storage_dtype

    device = topologies.get_topology_desc(topology_name="v5e:1x1", platform="tpu").devices[0]
    at = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=jax.sharding.SingleDeviceSharding(device))
    f, h = 13696, 4096                                          # glm-4-9b's down_proj [H, F]
    g = 1 if Quantization.parse(kind).group is None else f // Quantization.parse(kind).group
    w = Quantized(at((h, f), storage_dtype(kind)), at((h, g), jnp.float32))
    temps = {}
    for tokens in (1, 512):
        compiled = jax.jit(lambda x, w: dense("btf,ef->bte", x, w)).lower(at((1, tokens, f), jnp.bfloat16), w).compile()
        temps[tokens] = compiled.memory_analysis().temp_size_in_bytes
    assert temps[1] < h * f * 2 // 4, temps
    assert temps[512] < h * f * 2 // 4 if kind == "int8" else temps[512] <= 1.05 * h * f * 2, temps
