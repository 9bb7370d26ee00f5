"""glm_jax/quantize.py: the Quantized weight kind, its rounding and products against float64 numpy,
quantized logits against per-output-channel absmax rounding simulated in float64 (transformers'
GlmForCausalLM in float64), quantized checkpoints (stored, loaded sharded), and bad inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import glm_jax
from glm_jax.cli import main
from glm_jax.config import PRESETS
from glm_jax.model import dense
from glm_jax.options import INT4_GROUP, Quantization
from glm_jax.params import param_specs
from glm_jax.quantize import Quantized, dequantize, quantization_of, quantize, stored_bytes, stored_specs
from glm_jax.testing import QMAX, absmax_rounding, rounded_float64
from glm_jax.train.lora import LowRank

from conftest import random_glm

def test_quantization_forms():
    assert Quantization.parse(None) is None
    assert Quantization.parse("int8") == Quantization("int8", None)
    assert Quantization.parse("int4") == Quantization("int4", INT4_GROUP) and str(Quantization.parse("int4")) == "int4"
    assert Quantization.parse("int4:32") == Quantization("int4", 32) and str(Quantization("int4", 32)) == "int4:32"
    assert Quantization.parse("int8:0") == Quantization("int8", None)
    for bad in ("int5", "int4:x", "int4:-1", "fp8"):
        with pytest.raises(ValueError, match="--quantize"):
            Quantization.parse(bad)


@pytest.mark.parametrize("kind, group", [("int8", None), ("int4", 32), ("int4", 16), ("int8", 64)])
def test_round_trip_bounds(kind, group):
    rng = np.random.default_rng(1)
    w = rng.normal(size=(6, 16, 64)).astype(np.float32) * np.exp(rng.normal(size=(6, 16, 1)))  # uneven rows
    w[0, 0] = 0.0                                                                      # an all-zero channel
    q = quantize(w, Quantization(kind, group), 2)
    assert q.values.dtype == {"int8": jnp.int8, "int4": jnp.int4}[kind] and q.values.shape == w.shape
    assert q.scales.dtype == jnp.float32 and q.scales.shape == (6, 16, 1 if group is None else 64 // group)
    values = np.asarray(q.values).astype(np.int32)
    assert np.abs(values).max() == QMAX[kind] and not values[0, 0].any()
    expected, scales = absmax_rounding(w, 2, kind, group)
    np.testing.assert_allclose(np.asarray(q.scales), scales, rtol=1e-6)
    back = np.asarray(dequantize(q, jnp.float32), np.float64)
    step = np.repeat(scales, w.shape[-1] // scales.shape[-1], axis=-1)
    assert (np.abs(back - w) <= step / 2 * (1 + 1e-5) + 1e-12).all()          # round to nearest
    assert np.abs(back - expected).max() <= 1e-6 * np.abs(w).max()           # the float64 rounding's values
    assert np.isfinite(back).all() and not back[0, 0].any()


# every product the model makes (model.py): (eq, x shape, weight shape, output dims of the weight)
PRODUCTS = [("bte,hde->bthd", (2, 3, 64), (4, 16, 64), 2),     # q/k/v_proj
            ("bthd,ehd->bte", (2, 3, 4, 16), (64, 4, 16), 1),  # o_proj
            ("bte,cfe->btcf", (2, 3, 64), (2, 32, 64), 2),     # gate_up_proj
            ("btf,ef->bte", (2, 3, 96), (64, 96), 1),          # down_proj
            ("bte,ve->btv", (2, 1, 64), (300, 64), 1)]         # lm_head


@pytest.mark.parametrize("eq, x_shape, w_shape, k", PRODUCTS)
def test_dense_against_float64_for_every_weight_kind(eq, x_shape, w_shape, k):
    rng = np.random.default_rng(2)
    x = rng.normal(size=x_shape).astype(np.float32)
    w = rng.normal(size=w_shape).astype(np.float32)
    a = rng.normal(size=(3, *w_shape[k:])).astype(np.float32)
    b = rng.normal(size=(*w_shape[:k], 3)).astype(np.float32)
    int8, int4 = quantize(w, Quantization("int8"), k), quantize(w, Quantization("int4", 16), k)
    f64 = lambda q: np.asarray(q.values, np.float64).reshape(*w_shape[:k], q.scales.shape[-1], -1) \
        * np.asarray(q.scales, np.float64)[..., None]
    delta = np.tensordot(b, a, axes=([-1], [0])).astype(np.float64)
    kinds = {"float": (w, w.astype(np.float64)),
             "int8": (int8, f64(int8).reshape(w_shape)),
             "int4": (int4, f64(int4).reshape(w_shape)),
             "lora": (LowRank(jnp.asarray(w), a, b, 0.5), w + 0.5 * delta),
             "lora on int8": (LowRank(int8, a, b, 0.5), f64(int8).reshape(w_shape) + 0.5 * delta)}
    for name, (weight, exact) in kinds.items():
        ref = np.einsum(eq, x.astype(np.float64), exact)
        got = np.asarray(jax.jit(lambda x, w: dense(eq, x, w))(jnp.asarray(x), weight), np.float64)
        err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
        assert err < 2e-6, (name, err)


def test_stored_bytes_of_the_9b_models():
    """Counted on two layers (abstract: nothing allocated), the layer's bytes times the 40 layers."""
    def model_bytes(preset, q):
        config = PRESETS[preset]
        specs = stored_specs(param_specs(config.replace(num_layers=2), jnp.bfloat16), q)
        layer = stored_bytes({n: s for n, s in specs.items() if n.startswith("layers.1.")})
        return stored_bytes({n: s for n, s in specs.items() if not n.startswith("layers.1.")}) + \
            (config.num_layers - 1) * layer

    for preset in ("glm-4-9b-chat", "glm-4-9b-chat-1m"):
        bf16 = model_bytes(preset, None)
        assert bf16 == 2 * PRESETS[preset].num_params
        int8, int4 = (model_bytes(preset, Quantization.parse(k)) for k in ("int8", "int4"))
        assert int8 <= 0.6 * bf16 and int4 <= 0.4 * bf16, (preset, int8 / bf16, int4 / bf16)


# -- logits: quantized forward (float32) against the same rounding simulated in float64 -------------

def _side_by_side(folder, hf, ids, reference32, kind, group):
    """((relative error, top-1 agreement) of glm-jax quantized, of the float64 simulation), both
    against the float32 logits."""
    import torch

    ref = reference32.astype(np.float64)
    err = lambda x: np.linalg.norm(x - ref) / np.linalg.norm(ref)
    top1 = lambda x: float((x.argmax(-1) == ref.argmax(-1)).mean())
    ours = glm_jax.load(folder, quantize=str(Quantization(kind, group))).logits(ids)
    with torch.no_grad():
        sim = rounded_float64(hf, kind, group)(torch.from_numpy(np.asarray(ids))).logits.numpy()
    return (err(ours), top1(ours)), (err(sim), top1(sim))


def test_int8_logits_on_the_float32_fixture(reference):
    import transformers

    folder = reference / "fixtures" / "glm-hf-f32"
    ref = np.load(folder / "reference.npz")
    hf = transformers.GlmForCausalLM.from_pretrained(folder).eval()
    (err, top1), (sim_err, sim_top1) = _side_by_side(folder, hf, ref["input_ids"], ref["logits"], "int8", None)
    assert 1e-3 < err <= 1.02 * sim_err + 1e-5, (err, sim_err)
    assert top1 >= sim_top1, (top1, sim_top1)


@pytest.mark.parametrize("heads, kv_heads, seed, kind, group", [(4, 2, 0, "int8", None), (8, 8, 1, "int8", None),
                                                             (4, 2, 2, "int4", 32)])
def test_quantized_logits_on_random_configs(tmp_path, heads, kv_heads, seed, kind, group):
    import torch

    hf = random_glm(tmp_path / "hf", heads=heads, kv_heads=kv_heads, rope_theta=10000.0, seed=seed)
    ids = np.random.default_rng(seed).integers(0, 300, size=(2, 24))
    with torch.no_grad():
        logits32 = hf(torch.from_numpy(ids)).logits.numpy()
    (err, top1), (sim_err, sim_top1) = _side_by_side(tmp_path / "hf", hf, ids, logits32, kind, group)
    assert 1e-3 < err <= 1.02 * sim_err + 1e-5, (err, sim_err)
    assert top1 >= sim_top1, (top1, sim_top1)


# -- quantized checkpoints -------------------------------------------------------------------------

def test_quantized_checkpoint_loads_sharded(reference, tmp_path, quantize="int4:16"):
    src = reference / "fixtures" / "glm-hf-f32"
    assert main(["convert", str(src), str(tmp_path / "q"), "--quantize", quantize, "--quiet"]) == 0
    ids = np.load(src / "reference.npz")["input_ids"]
    single = glm_jax.load(tmp_path / "q")
    assert str(quantization_of({"w": single.state["layers"][0]["mlp"]["down_proj"].get_value()})) == quantize
    np.testing.assert_array_equal(single.logits(ids), glm_jax.load(src, quantize=quantize).logits(ids))
    mesh = "fsdp=2,tensor=2,sequence=2"
    sharded = glm_jax.load(tmp_path / "q", mesh=mesh)
    layout = sharded.layout
    for name, axes in (("q_proj", ("q_heads", "head_dim", "embed")), ("o_proj", ("embed", "q_heads", "head_dim"))):
        w = sharded.state["layers"][1]["attn"][name].get_value()
        assert isinstance(w, Quantized)
        assert w.values.sharding.spec == layout.spec(axes, w.values.shape)
        assert w.scales.sharding.spec == layout.spec(axes[:w.scales.ndim], w.scales.shape)
    down = sharded.state["layers"][0]["mlp"]["down_proj"].get_value()
    assert down.values.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    np.testing.assert_allclose(sharded.logits(ids), single.logits(ids), rtol=2e-5, atol=2e-5)


def test_quantized_folder_is_smaller(tmp_path):
    """On disk, a wide model's int8 folder against its bfloat16 arrays' bytes (Orbax compresses: random
    bfloat16 by about a fifth, int8 hardly)."""
    from glm_jax.config import GLMConfig
    from glm_jax.testing import write_random_checkpoint

    config = GLMConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=64, max_seq_len=1024, dtype="bfloat16")
    write_random_checkpoint(tmp_path / "hf", config)
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "int8"), "--quantize", "int8", "--quiet"]) == 0
    on_disk = sum(f.stat().st_size for f in (tmp_path / "int8" / "params").rglob("*") if f.is_file())
    int8_bytes = stored_bytes(stored_specs(param_specs(config, jnp.bfloat16), Quantization("int8")))
    assert on_disk <= 0.6 * 2 * config.num_params, (on_disk, 2 * config.num_params)
    assert abs(on_disk - int8_bytes) < 0.1 * int8_bytes, (on_disk, int8_bytes)


# -- bad inputs ------------------------------------------------------------------------------------

def test_bad_inputs_are_one_line(reference, tmp_path, capsys):
    src = reference / "fixtures" / "glm-hf-f32"          # hidden 64: int4's groups of 128 do not fit
    assert main(["convert", str(src), str(tmp_path / "q"), "--quantize", "int4", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has 64 input features, not a multiple of the group " \
                                      "size 128" in err, err
    assert not (tmp_path / "q").exists()
    assert main(["convert", str(src), str(tmp_path / "q"), "--quantize", "int3", "--quiet"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    with pytest.raises(ValueError, match="input features"):
        glm_jax.load(src, quantize="int4:64")             # down_proj: 160 inputs
    assert main(["convert", str(src), str(tmp_path / "q8"), "--quantize", "int8", "--quiet"]) == 0
    with pytest.raises(ValueError, match=r"stored quantized \(int8\)"):
        glm_jax.load(tmp_path / "q8", quantize="int4:16")


def test_every_command_that_loads_weights_takes_quantize(capsys):
    from glm_jax.parser import build_parser

    sub = build_parser()._subparsers._group_actions[0].choices
    for command in ("convert", "generate", "chat", "serve", "needle", "finetune", "compile-report"):
        assert "--quantize" in sub[command].format_help(), command
    assert "--quantize" not in sub["export"]._option_string_actions and "dequantized" in sub["export"].format_help()


def test_generate_with_int8_weights(tiny_chat_model, capsys):
    import json

    assert main(["generate", "--model", str(tiny_chat_model), "--prompt", "hi", "--max-new-tokens", "4",
                 "--temperature", "0", "--quantize", "int8", "--json"]) == 0
    assert 1 <= len(json.loads(capsys.readouterr().out)["ids"]) <= 4
    assert main(["compile-report", "--config", "glm-4-9b", "--topology", "local", "--seq-len", "64",
                 "--quantize", "int8", "--train"]) == 2
