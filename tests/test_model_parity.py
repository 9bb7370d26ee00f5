"""glm-jax against the original PyTorch outputs (fixtures) and transformers on random configs."""

import numpy as np
import pytest
from conftest import random_glm

import glm_jax
from glm_jax.convert.checkpoint import convert, export


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def offset_positions(ref):
    ids = ref["input_ids"]
    return ids, np.broadcast_to(np.arange(ids.shape[1]) + int(ref["position_offset"]), ids.shape)


@pytest.fixture(scope="module")
def converted(reference, tmp_path_factory):
    root = tmp_path_factory.mktemp("converted")
    return {name: convert(reference / "fixtures" / name, root / name, progress=False) and root / name
            for name in ("chatglm-f32", "glm-hf-f32", "chatglm-bf16")}


@pytest.mark.parametrize("source", ["hf", "converted"])
@pytest.mark.parametrize("name", ["chatglm-f32", "glm-hf-f32"])
def test_float32_fixtures(reference, converted, name, source):
    ref = np.load(reference / "fixtures" / name / "reference.npz")
    model = glm_jax.load(reference / "fixtures" / name if source == "hf" else converted[name])
    assert model.dtype == np.float32
    assert rel(model.logits(ref["input_ids"]), ref["logits"]) <= 1e-5
    assert rel(model.logits(*offset_positions(ref)), ref["logits_at_offset"]) <= 1e-5


@pytest.mark.parametrize("source", ["hf", "converted"])
def test_bfloat16_fixture(reference, converted, source):
    ref = np.load(reference / "fixtures" / "chatglm-bf16" / "reference.npz")
    model = glm_jax.load(reference / "fixtures" / "chatglm-bf16" if source == "hf" else converted["chatglm-bf16"])
    assert model.dtype == np.dtype("bfloat16")
    logits = model.logits(ref["input_ids"])
    assert rel(logits, ref["logits"]) <= 3e-2
    assert rel(model.logits(*offset_positions(ref)), ref["logits_at_offset"]) <= 3e-2
    # The original's own bf16 run agrees with its fp32 run on 95% of top-1 tokens here; we are at
    # least as close to the fp32 truth, and every disagreement is a near-tie.
    fp32 = ref["logits_fp32"]
    own = rel(ref["logits"], fp32)
    assert rel(logits, fp32) <= own
    ours = logits.argmax(-1)
    assert (ours == ref["logits"].argmax(-1)).mean() >= 0.95
    assert (ours == fp32.argmax(-1)).mean() >= 0.95
    best = fp32.argmax(-1)[..., None]
    margin = np.take_along_axis(fp32, best, -1) - np.take_along_axis(fp32, ours[..., None], -1)
    assert margin.max() <= 0.2                                      # a few bf16 ulps at |logit| ~ 7


@pytest.mark.parametrize("source", ["hf", "converted"])
def test_bfloat16_weights_run_in_float32(reference, converted, source):
    ref = np.load(reference / "fixtures" / "chatglm-bf16" / "reference.npz")
    folder = reference / "fixtures" / "chatglm-bf16" if source == "hf" else converted["chatglm-bf16"]
    model = glm_jax.load(folder, dtype="float32")
    assert model.dtype == np.float32
    assert rel(model.logits(ref["input_ids"]), ref["logits_fp32"]) <= 1e-5
    assert rel(model.logits(*offset_positions(ref)), ref["logits_at_offset_fp32"]) <= 1e-5


@pytest.mark.parametrize("attention", ["exact", "blockwise"])
def test_attention_choice_does_not_change_logits(reference, attention):
    ref = np.load(reference / "fixtures" / "chatglm-f32" / "reference.npz")
    model = glm_jax.load(reference / "fixtures" / "chatglm-f32", attention=attention)
    assert rel(model.logits(ref["input_ids"]), ref["logits"]) <= 1e-5


# -- transformers GlmForCausalLM on random configurations ---------------------------------------

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("heads, kv_heads, rope_theta, seq, batch", [
    (4, 4, 1e4, 37, 2),       # ratio 1
    (8, 4, 5e6, 53, 1),       # ratio 2
    (8, 2, 1e8, 29, 3),       # ratio 4
    (16, 2, 2.5e5, 45, 2),    # ratio 8
])
def test_transformers_random_configs(tmp_path, heads, kv_heads, rope_theta, seq, batch):
    torch_model = random_glm(tmp_path, heads=heads, kv_heads=kv_heads, rope_theta=rope_theta)
    ids = np.random.default_rng(1).integers(0, 300, (batch, seq))
    positions = np.broadcast_to(np.arange(seq) + 1000, ids.shape)
    with torch.no_grad():
        want = torch_model(torch.from_numpy(ids)).logits.numpy()
        want_offset = torch_model(torch.from_numpy(ids), position_ids=torch.from_numpy(positions.copy())).logits.numpy()
    model = glm_jax.load(tmp_path)
    assert model.config.num_kv_heads == kv_heads and model.config.rope_theta == rope_theta
    assert rel(model.logits(ids), want) <= 1e-5
    assert rel(model.logits(ids, positions), want_offset) <= 1e-5


def test_layouts_round_trip_through_glm_jax(tmp_path):
    """glm layout -> glm-jax -> chatglm layout -> glm-jax -> glm layout: same weights, same logits."""
    torch_model = random_glm(tmp_path / "hf", heads=8, kv_heads=2, rope_theta=1e8)
    convert(tmp_path / "hf", tmp_path / "a", progress=False)
    export(tmp_path / "a", tmp_path / "chatglm", layout="chatglm", progress=False)
    convert(tmp_path / "chatglm", tmp_path / "b", progress=False)
    export(tmp_path / "b", tmp_path / "glm", layout="glm", progress=False)
    ids = np.random.default_rng(2).integers(0, 300, (2, 17))
    with torch.no_grad():
        want = torch_model(torch.from_numpy(ids)).logits.numpy()
    for path in ("chatglm", "b", "glm"):
        assert rel(glm_jax.load(tmp_path / path).logits(ids), want) <= 1e-5
    reloaded = transformers.GlmForCausalLM.from_pretrained(tmp_path / "glm").eval()
    for name, p in torch_model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], p), name


def test_a_registered_weight_kind_runs_in_the_model_as_its_plain_array(reference):
    """`model.dense` multiplies any weight kind registered with `register_weight`, where the model
    reads every projection: int8 weights with per-output scales in every Param of a projection
    give the logits of the same weights dequantized into plain arrays."""
    import dataclasses

    import jax
    import jax.numpy as jnp

    from glm_jax.forward import forward
    from glm_jax.model import register_weight
    from glm_jax.params import flat_params, split_model

    @dataclasses.dataclass(frozen=True)
    class Int8:
        values: jax.Array        # int8, the weight's shape
        scales: jax.Array        # float32, the weight's shape with its input dims 1

        @property
        def dtype(self):
            return self.scales.dtype

    jax.tree_util.register_dataclass(Int8, data_fields=["values", "scales"], meta_fields=[])
    register_weight(Int8, lambda eq, x, w: jnp.einsum(eq, x, w.values.astype(x.dtype) * w.scales.astype(x.dtype),
                                                       preferred_element_type=jnp.float32))

    model = glm_jax.load(reference / "fixtures" / "chatglm-f32")
    ids = np.load(reference / "fixtures" / "chatglm-f32" / "reference.npz")["input_ids"]
    plain, quantized = {}, {}
    for name, w in flat_params(model.state).items():
        if name.endswith("_proj"):
            inputs = tuple(range(2 if w.ndim == 3 and name.endswith(("q_proj", "k_proj", "v_proj", "gate_up_proj"))
                                 else 1, w.ndim))
            scales = jnp.max(jnp.abs(w), axis=inputs, keepdims=True) / 127
            values = jnp.round(w / scales).astype(jnp.int8)
            quantized[name] = Int8(values, scales)
            w = values.astype(jnp.float32) * scales
        plain[name] = w
        quantized.setdefault(name, w)
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    logits = [jax.jit(lambda state, g=graphdef: forward(g, state, jnp.asarray(ids), positions, attention="exact"))(state)
              for graphdef, state in (split_model(model.config, model.dtype, w) for w in (plain, quantized))]
    assert rel(np.asarray(logits[1]), np.asarray(logits[0])) <= 1e-5
