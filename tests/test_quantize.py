"""glm_jax/quantize.py: the Quantized weight kind, its rounding and products against float64 numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glm_jax.config import PRESETS
from glm_jax.model import dense
from glm_jax.options import INT4_GROUP, Quantization
from glm_jax.params import param_specs
from glm_jax.quantize import dequantize, quantize, stored_bytes, stored_specs
from glm_jax.testing import QMAX, absmax_rounding
from glm_jax.train.lora import LowRank


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
