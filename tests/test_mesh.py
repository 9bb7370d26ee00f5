"""Meshes as JAX makes them: Explicit (the `jax.make_mesh` default) or Auto axes, naming some axes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import glm_jax
from glm_jax.compile_report import compile_report
from glm_jax.config import GLMConfig
from glm_jax.ring import context_parallel
from glm_jax.sharding import MESH_AXES, Layout, make_mesh

# (shape, axis names, the same mesh as a spec string)
PARTIAL = [((8,), ("sequence",), "sequence=8"), ((2, 4), ("fsdp", "sequence"), "fsdp=2,sequence=4")]
TYPES = [AxisType.Explicit, AxisType.Auto]


def user_mesh(shape, names, kind=AxisType.Explicit):
    return jax.make_mesh(shape, names, axis_types=(kind,) * len(names))


def rel(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def inputs(b=2, t=40, hq=4, g=2, d=16):
    ks = jax.random.split(jax.random.key(0), 3)
    return (jax.random.normal(ks[0], (b, t, hq, d)), jax.random.normal(ks[1], (b, t, g, d)),
            jax.random.normal(ks[2], (b, t, g, d)))


@pytest.mark.parametrize("kind", TYPES)
@pytest.mark.parametrize("shape, names, spec", PARTIAL)
def test_user_meshes_become_auto_with_their_devices_and_names(shape, names, spec, kind):
    mesh = user_mesh(shape, names, kind)
    for normal in (make_mesh(mesh), Layout(mesh).mesh, Layout.create(mesh, weights_over_sequence=True).mesh):
        assert normal.axis_names == names and normal.axis_types == (AxisType.Auto,) * len(names)
        assert (normal.devices == mesh.devices).all()
    layout, string_layout = Layout(mesh), Layout(make_mesh(spec))
    assert {a: layout.size(a) for a in MESH_AXES} == dict(string_layout.mesh.shape)
    batch = "fsdp" if "fsdp" in names else None
    assert layout.spec(("batch", "seq", "q_heads"), (4, 64, 8)) == P(batch, "sequence", None)


def test_user_mesh_with_other_axes_or_devices_is_refused():
    with pytest.raises(ValueError, match=r"mesh axes \['pipeline'\] unknown"):
        make_mesh(jax.make_mesh((2, 4), ("pipeline", "sequence")))
    with pytest.raises(ValueError, match="devices are not the 4 asked for"):
        make_mesh(jax.make_mesh((4,), ("sequence",), devices=jax.devices()[:4]), jax.devices()[4:])


def ring_attention(q, k, v, mesh):
    return glm_jax.ring_attention(q, k, v, mesh=mesh, block_q=8, block_k=8)


jit_ring_attention = jax.jit(ring_attention, static_argnums=3)


@pytest.mark.parametrize("kind", TYPES)
@pytest.mark.parametrize("shape, names, spec", PARTIAL)
def test_ring_attention_on_user_meshes_and_their_arrays(shape, names, spec, kind):
    q, k, v = inputs()
    want = jit_ring_attention(q, k, v, spec)
    mesh = user_mesh(shape, names, kind)
    on_mesh = [jax.device_put(x, NamedSharding(mesh, P(None, "sequence"))) for x in (q, k, v)]
    assert rel(jit_ring_attention(q, k, v, mesh), want) <= 1e-6
    out = jit_ring_attention(*on_mesh, mesh)
    assert rel(out, want) <= 1e-6
    # the result keeps q's sharding type: sharded on `sequence` like q where the axis is Explicit
    typed = P(None, "sequence", None, None) if kind == AxisType.Explicit else P(None, None, None, None)
    assert jax.typeof(out).sharding.spec == typed


@pytest.mark.slow
def test_ring_attention_eagerly_and_under_set_mesh():
    q, k, v = inputs()
    want = jax.jit(lambda q, k, v: glm_jax.ring_attention(q, k, v, mesh="sequence=8"))(q, k, v)
    mesh = jax.make_mesh((8,), ("sequence",))
    assert mesh.axis_types == (AxisType.Explicit,)                 # jax.make_mesh's default
    assert rel(glm_jax.ring_attention(q, k, v, mesh=mesh), want) <= 1e-6
    on_mesh = [jax.device_put(x, NamedSharding(mesh, P(None, "sequence"))) for x in (q, k, v)]
    assert rel(glm_jax.ring_attention(*on_mesh, mesh=mesh), want) <= 1e-6
    with jax.set_mesh(mesh):
        assert rel(glm_jax.ring_attention(q, k, v, mesh=mesh), want) <= 1e-6
        assert rel(jax.jit(lambda q, k, v: glm_jax.ring_attention(q, k, v, mesh=mesh))(*on_mesh), want) <= 1e-6


@pytest.mark.slow
def test_ring_attention_gradients_through_an_explicit_mesh():
    q, k, v = inputs()
    w = jax.random.normal(jax.random.key(1), q.shape)
    mesh = user_mesh((2, 4), ("fsdp", "sequence"))
    loss = lambda mesh: lambda q, k, v: (ring_attention(q, k, v, mesh) * w).sum()
    want = jax.grad(loss("fsdp=2,sequence=4"), argnums=(0, 1, 2))(q, k, v)
    on_mesh = [jax.device_put(x, NamedSharding(mesh, P(None, "sequence"))) for x in (q, k, v)]
    with jax.set_mesh(mesh):
        got = jax.jit(jax.grad(loss(mesh), argnums=(0, 1, 2)))(*on_mesh)
    for g_got, g_want in zip(got, want):
        assert rel(g_got, g_want) <= 1e-5


@pytest.mark.parametrize("kind", TYPES)
def test_context_parallel_on_a_layout_of_a_user_mesh(kind):
    q, k, v = inputs(t=64)
    index = jnp.broadcast_to(jnp.arange(64, dtype=jnp.int32), (2, 64))
    want = jax.jit(context_parallel(Layout(make_mesh("fsdp=2,sequence=4")), block_q=8, block_k=8))(q, k, v, index, index)
    mesh = user_mesh((2, 4), ("fsdp", "sequence"), kind)
    attend = jax.jit(context_parallel(Layout(mesh), block_q=8, block_k=8))
    assert rel(attend(q, k, v, index, index), want) <= 1e-6
    args = [jax.device_put(x, NamedSharding(mesh, P("fsdp", "sequence"))) for x in (q, k, v, index, index)]
    assert rel(attend(*args), want) <= 1e-6
    with jax.set_mesh(mesh):
        assert rel(attend(*args), want) <= 1e-6


LOAD_MESHES = [  # (shape, names, axis types, the same mesh as a spec string)
    ((2, 4), ("tensor", "sequence"), AxisType.Explicit, "tensor=2,sequence=4"),
    ((2, 4), ("fsdp", "sequence"), AxisType.Auto, "fsdp=2,sequence=4"),
]


@pytest.fixture(scope="module")
def string_mesh_results(reference):
    """(logits, greedy tokens) of the fixture loaded on a spec-string mesh, computed once per spec."""
    folder = reference / "fixtures" / "chatglm-f32"
    ids = np.load(folder / "reference.npz")["input_ids"]
    cache = {}

    def results(mesh):
        if mesh not in cache:
            model = glm_jax.load(folder, mesh=mesh)
            cache[mesh] = model.logits(ids), model.generate([ids[0].tolist()], max_new_tokens=8, temperature=0)
        return cache[mesh]

    return folder, ids, results


@pytest.mark.parametrize("shape, names, kind, spec", LOAD_MESHES)
def test_load_logits_and_generate_on_user_meshes(string_mesh_results, shape, names, kind, spec):
    folder, ids, results = string_mesh_results
    want_logits, want_tokens = results(spec)
    model = glm_jax.load(folder, mesh=user_mesh(shape, names, kind))
    assert rel(model.logits(ids), want_logits) <= 1e-6
    assert model.generate([ids[0].tolist()], max_new_tokens=8, temperature=0) == want_tokens
    assert model.mesh.axis_names == names and model.mesh.axis_types == (AxisType.Auto,) * len(names)
    if kind == AxisType.Explicit:   # also called inside `jax.set_mesh` of the user's Explicit mesh
        with jax.set_mesh(user_mesh(shape, names, kind)):
            assert rel(model.logits(ids), want_logits) <= 1e-6
            assert model.generate([ids[0].tolist()], max_new_tokens=8, temperature=0) == want_tokens


def test_compile_report_on_an_explicit_mesh(reference):
    config = GLMConfig.from_hf(reference / "fixtures" / "chatglm-f32")
    report = lambda mesh: compile_report(config, topology="local", seq_len=1024, mesh=mesh, chunk=128)
    for got, want in zip(report(user_mesh((2, 4), ("tensor", "sequence"))), report("tensor=2,sequence=4")):
        assert got.mesh == "tensor=2,sequence=4" and want.mesh == "sequence=4,tensor=2"
        assert (got.peak_bytes_per_device, got.kv_cache_bytes_per_device) == (want.peak_bytes_per_device,
                                                                             want.kv_cache_bytes_per_device)


@pytest.mark.parametrize("spec", ["sequence=8", "tensor=2,sequence=4"])
def test_logits_with_weights_over_sequence_equal_the_unsharded_logits(reference, spec):
    """compile_report's v5e default: the weights' embed dim also split over `sequence` (gathered
    where they are used). The fixture's logits equal one device's within float32 tolerance."""
    import functools

    from glm_jax.forward import forward
    from glm_jax.params import flat_params, param_specs, split_model

    folder = reference / "fixtures" / "chatglm-f32"
    ids = np.load(folder / "reference.npz")["input_ids"]
    model = glm_jax.load(folder)
    want = model.logits(ids)
    layout = Layout.create(make_mesh(spec), weights_over_sequence=True)
    specs = param_specs(model.config, model.dtype)
    weights = {n: jax.device_put(a, layout.sharding(specs[n].axes, specs[n].shape))
               for n, a in flat_params(model.state).items()}
    assert weights["layers.0.attn.q_proj"].sharding.spec[2] == "sequence"          # [Hq, D, H]: H split
    graphdef, state = split_model(model.config, model.dtype, weights)
    positions = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
    got = jax.jit(functools.partial(forward, graphdef, layout=layout))(state, jnp.asarray(ids), jnp.asarray(positions))
    assert rel(got, want) <= 1e-5
