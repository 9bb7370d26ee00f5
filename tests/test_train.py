"""The train step: loss and gradients against transformers' GlmForCausalLM in float32, on one device
and on sequence-parallel meshes; the chunked vocab-parallel loss against float64 numpy; remat and
gradient accumulation change nothing; the optimizer's schedule and weight-decay mask."""

import contextlib
import io

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.ad_checkpoint import print_saved_residuals

import glm_jax
from glm_jax.params import flat_params
from glm_jax.sharding import Layout, make_mesh
from glm_jax.train.loss import IGNORE, counted_budget, cross_entropy, shift_labels
from glm_jax.train.step import Batch, OptimizerConfig, Trainer, decays, make_optimizer, schedule

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from conftest import random_glm  # noqa: E402  (tests/ is on sys.path)


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def one_device():
    return make_mesh("sequence=1", jax.devices()[:1])


def trainer_for(model, **kwargs) -> Trainer:
    return Trainer(model.config, model.layout, model.dtype, make_optimizer(OptimizerConfig(optimizer="sgd")),
                   **kwargs)


def batch_of(ids, labels, positions, segments=None, accum=1) -> Batch:
    """[B, T] arrays -> a Batch of `accum` micro-batches of B / accum rows (one segment a row)."""
    segments = np.ones_like(ids) if segments is None else segments
    return Batch(*(jnp.asarray(np.stack(np.split(np.asarray(a), accum)), jnp.int32)
                   for a in (ids, labels, positions, segments)))


def torch_loss_and_grads(torch_model, ids, labels):
    torch_model.zero_grad()
    out = torch_model(torch.from_numpy(ids), labels=torch.from_numpy(labels))
    out.loss.backward()
    return float(out.loss.detach()), {n: p.grad.numpy().copy() for n, p in torch_model.named_parameters()}


def hf_grads(model, grads):
    from glm_jax.convert.hf import hf_tensor_from
    from glm_jax.convert.layout import GLM, hf_tensors

    return {t.name: hf_tensor_from(t, lambda n: np.asarray(grads[n])) for t in hf_tensors(model.config, GLM)}


@pytest.mark.parametrize("mesh, heads, kv_heads, seq, batch", [
    (None, 8, 2, 37, 2),                      # GQA 4, odd length, 1 device
    ("sequence=8", 4, 4, 29, 3),              # no GQA, 29 tokens over 8 devices (padded zigzag)
    ("tensor=2,sequence=4", 16, 2, 45, 2),    # GQA 8, heads and vocab split on tensor
    ("fsdp=2,sequence=4", 8, 4, 53, 2),       # weights split on fsdp, batch on fsdp
])
def test_loss_and_gradients_match_transformers(tmp_path, mesh, heads, kv_heads, seq, batch):
    torch_model = random_glm(tmp_path, heads=heads, kv_heads=kv_heads, rope_theta=1e4)
    rng = np.random.default_rng(seq)
    ids = rng.integers(0, 300, (batch, seq))
    labels = ids.copy()
    labels[0, : seq // 3] = IGNORE                                  # a prompt that does not count
    labels[-1, -4:] = IGNORE
    want_loss, want = torch_loss_and_grads(torch_model, ids, labels)

    model = glm_jax.load(tmp_path, mesh=mesh or one_device())
    positions = np.broadcast_to(np.arange(seq), ids.shape)
    grads, loss, count = jax.jit(trainer_for(model, remat="full", loss_chunk=16).gradients)(
        flat_params(model.state), {}, batch_of(ids, labels, positions))
    assert int(count) == int((shift_labels(jnp.asarray(labels)) != IGNORE).sum())
    assert abs(float(loss) - want_loss) <= 1e-6 * want_loss
    got = hf_grads(model, grads)
    assert set(got) == set(want)
    for name in want:
        assert rel(got[name], want[name]) <= 1e-4, name


@pytest.mark.slow
def test_accumulation_and_remat_change_nothing(tmp_path):
    """Two micro-batches of one row give the loss and gradients of one batch of two rows (the mean
    over all counted targets, not a mean of means), with every remat policy (5 layers: "segments"
    runs blocks 0-2 and 3-4 as two segments)."""
    random_glm(tmp_path, heads=4, kv_heads=2, rope_theta=1e4, layers=5)
    model = glm_jax.load(tmp_path, mesh=one_device())
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 300, (2, 24))
    labels = ids.copy()
    labels[0, :18] = IGNORE                                         # rows count 6 and 23 targets
    positions = np.broadcast_to(np.arange(24), ids.shape)
    params = flat_params(model.state)
    runs = {(accum, remat): jax.jit(trainer_for(model, remat=remat).gradients)(
        params, {}, batch_of(ids, labels, positions, accum=accum)) for accum, remat in ((1, "none"), (2, "none"), (2, "dots"), (2, "full"), (2, "segments"))}
    base_grads, base_loss, base_count = runs[(1, "none")]
    assert int(base_count) == 29
    for key, (grads, loss, count) in runs.items():
        assert int(count) == 29 and float(loss) == pytest.approx(float(base_loss), rel=1e-6), key
        for name in grads:
            np.testing.assert_allclose(grads[name], base_grads[name], rtol=1e-5, atol=1e-6, err_msg=f"{key} {name}")


def test_mlp_in_token_groups_changes_nothing(monkeypatch):
    """Long sequences run the MLP in interleaved token groups under jax.checkpoint (memory): the
    same outputs and gradients as the whole sequence at once, tokens split over `sequence`."""
    from flax import nnx

    import glm_jax.model
    from glm_jax.config import GLMConfig

    config = GLMConfig(vocab_size=16, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4,
                       num_kv_heads=2, head_dim=8, max_seq_len=1024, dtype="float32")
    mlp = glm_jax.model.MLP(config, jnp.float32, nnx.Rngs(0))
    graphdef, state = nnx.split(mlp)
    layout = Layout(make_mesh("sequence=4", jax.devices()[:4]))
    x = layout.constrain(jnp.asarray(np.random.default_rng(2).standard_normal((2, 64, 32)), jnp.float32),
                         ("batch", "seq", "act_embed"))
    runs, maps = [], []
    for tokens in (4096, 4):          # 64 tokens: whole, then 4 groups of 4 tokens per device
        monkeypatch.setattr(glm_jax.model, "MLP_TOKENS", tokens)
        # a fresh function per setting: traces are cached by function, not by this constant
        loss = lambda state, x: (nnx.merge(graphdef, state)(x, layout) ** 2).sum()
        maps.append(str(jax.make_jaxpr(loss)(state, x)).count("scan["))
        runs.append(jax.jit(jax.value_and_grad(lambda s, x: loss(s, x), argnums=(0, 1)))(state, x))
    assert maps == [0, 1]                                        # the groups are one lax.map
    (v_whole, g_whole), (v_groups, g_groups) = runs
    assert float(v_groups) == pytest.approx(float(v_whole), rel=1e-6)
    for a, b in zip(jax.tree.leaves(g_groups), jax.tree.leaves(g_whole)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def numpy_cross_entropy(h, w, y):
    logits = np.einsum("bth,vh->btv", h.astype(np.float64), w.astype(np.float64))
    top = logits.max(-1, keepdims=True)
    lse = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
    target = np.take_along_axis(logits, np.clip(y, 0, w.shape[0] - 1)[..., None], -1)[..., 0]
    counted = y != IGNORE
    return ((lse - target) * counted).sum(), counted.sum()


@pytest.mark.parametrize("spec", ["tensor=2,sequence=4", "data=2,fsdp=2,tensor=2"])
def test_chunked_vocab_parallel_loss(spec):
    """Chunks that do not divide the tokens, a vocab split over tensor, batch over data/fsdp, chunks
    with no counted target (skipped): the float64 loss, and the same gradients as one device."""
    rng = np.random.default_rng(1)
    h = rng.standard_normal((4, 48, 16)).astype(np.float32)
    w = rng.standard_normal((40, 16)).astype(np.float32)
    y = rng.integers(0, 40, (4, 48))
    y[0, :7] = IGNORE
    y[:, 12:30] = IGNORE                  # whole chunks of 5 with nothing to count, on every device
    want_loss, want_count = numpy_cross_entropy(h, w, y)
    layout, single = Layout(make_mesh(spec)), Layout(one_device())
    loss, count = jax.jit(lambda h, w, y: cross_entropy(h, w, y, layout, chunk=5))(h, w, y)
    assert int(count) == want_count and float(loss) == pytest.approx(want_loss, rel=1e-6)
    grad = lambda lay, chunk: jax.jit(jax.grad(lambda h, w: cross_entropy(h, w, y, lay, chunk=chunk)[0],
                                               argnums=(0, 1)))(h, w)
    for got, ref in zip(grad(layout, 5), grad(single, 48)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec", ["sequence=1", "tensor=2,sequence=4"])
def test_counted_budget_gives_the_same_loss_and_gradients(spec):
    """Answer-only targets (a few counted per row, anywhere; one row with none): the output layer
    on the gathered positions alone gives the float64 loss and the gradients of the full pass."""
    rng = np.random.default_rng(2)
    h = rng.standard_normal((2, 64, 16)).astype(np.float32)
    w = rng.standard_normal((40, 16)).astype(np.float32)
    y = np.full((2, 64), IGNORE)
    y[0, [3, 17, 18, 40, 63]] = rng.integers(0, 40, 5)         # 5 counted in row 0, none in row 1
    budget = counted_budget(y, 64)
    assert budget == 16
    want_loss, want_count = numpy_cross_entropy(h, w, y)
    layout = Layout(one_device() if spec == "sequence=1" else make_mesh(spec))
    loss_fn = lambda counted: lambda h, w: cross_entropy(h, w, y, layout, chunk=8, counted=counted)
    loss, count = jax.jit(loss_fn(budget))(h, w)
    assert int(count) == want_count and float(loss) == pytest.approx(want_loss, rel=1e-6)
    grads = [jax.jit(jax.grad(lambda h, w, f=loss_fn(c): f(h, w)[0], argnums=(0, 1)))(h, w) for c in (budget, None)]
    for got, ref in zip(*grads):
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-6)


def test_loss_gradients_take_three_products_a_chunk():
    """Differentiated, the chunked loss makes its gradients in its one pass over the chunks: the
    logits, dh and dW products (three, not four with the chunks rematerialised in the backward
    pass), and a frozen output layer (LoRA) costs no dW product at all."""
    layout = Layout(one_device())
    h, w = jnp.zeros((2, 24, 16)), jnp.zeros((40, 16))
    y = jnp.zeros((2, 24), jnp.int32)
    loss = lambda h, w: cross_entropy(h, w, y, layout, chunk=8)[0]
    products = lambda argnums: str(jax.make_jaxpr(jax.grad(loss, argnums=argnums))(h, w)).count("dot_general")
    assert products((0, 1)) == 3 and products(0) == 2


def test_counted_budget():
    """A power of two covering the row with the most counted labels; None when it would not save much."""
    labels = np.full((3, 2, 512), IGNORE)
    assert counted_budget(labels, 512) == 16
    labels[1, 0, :37] = 5
    assert counted_budget(labels, 512) == 64
    labels[2, 1, :200] = 5
    assert counted_budget(labels, 512) is None and counted_budget(labels, 1024) == 256


def test_schedule_and_weight_decay_mask():
    c = OptimizerConfig(learning_rate=1e-3, steps=100, warmup_steps=10, final_lr_ratio=0.1)
    lr = schedule(c)
    # optax's count 0 is step 1: step k of the 10 warmup steps at k/10 of the peak, the last (100) at the end
    assert float(lr(0)) == pytest.approx(1e-4) and float(lr(4)) == pytest.approx(5e-4)
    assert float(lr(9)) == pytest.approx(1e-3) and float(lr(54)) == pytest.approx(5.5e-4)
    assert float(lr(99)) == pytest.approx(1e-4)
    constant = schedule(OptimizerConfig(learning_rate=1e-3, schedule="constant"))
    assert float(constant(0)) == float(constant(999)) == pytest.approx(1e-3)
    warm = schedule(OptimizerConfig(learning_rate=1e-3, schedule="constant", warmup_steps=4))
    assert [float(warm(i)) for i in range(5)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])
    assert float(schedule(OptimizerConfig(learning_rate=1e-3, steps=10))(0)) == pytest.approx(1e-3)  # no warmup
    assert decays("layers.0.attn.q_proj") and decays("embed") and decays("lm_head")
    assert not any(decays(n) for n in ("layers.0.attn.q_bias", "layers.3.input_norm.weight", "final_norm.weight"))
    with pytest.raises(ValueError, match="unknown optimizer 'lion'"):
        make_optimizer(OptimizerConfig(optimizer="lion"))
    # decoupled decay: a zero gradient still shrinks a matrix, never a bias
    opt = make_optimizer(OptimizerConfig(learning_rate=0.1, schedule="constant", weight_decay=0.5, clip_norm=None))
    params = {"w_proj": jnp.ones(3), "b_bias": jnp.ones(3)}
    updates, _ = opt.update(jax.tree.map(jnp.zeros_like, params), opt.init(params), params)
    new = optax.apply_updates(params, updates)
    assert np.allclose(new["w_proj"], 0.95) and np.allclose(new["b_bias"], 1.0)


def test_lora_gradients_follow_the_chain_rule(tmp_path):
    """With adapters (B non-zero), the loss is the merged model's and the adapter gradients are
    scale * B^T dW and scale * dW A^T of the full gradient dW at the merged weights."""
    from glm_jax.params import param_specs
    from glm_jax.train.lora import LoRAConfig, init_adapters, merge, out_dims

    random_glm(tmp_path, heads=4, kv_heads=2, rope_theta=1e4)
    model = glm_jax.load(tmp_path, mesh=one_device())
    lora = LoRAConfig(rank=3, alpha=6.0)
    specs = param_specs(model.config, model.dtype)
    adapters = init_adapters(lora, specs, jax.random.key(0))
    adapters = {k: v + 0.05 * jax.random.normal(jax.random.key(len(k)), v.shape) if k.endswith("lora_b") else v
                for k, v in adapters.items()}
    assert len(adapters) == 2 * 6 * model.config.num_layers     # q, k, v, o, gate_up, down
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 300, (2, 20))
    batch = batch_of(ids, ids, np.broadcast_to(np.arange(20), ids.shape))
    base = flat_params(model.state)
    with_lora = Trainer(model.config, model.layout, model.dtype, make_optimizer(OptimizerConfig()), lora=lora)
    grads, loss, _ = jax.jit(with_lora.gradients)(adapters, base, batch)
    merged = merge(lora, base, adapters)
    full_grads, full_loss, _ = jax.jit(trainer_for(model).gradients)(merged, {}, batch)
    assert float(loss) == pytest.approx(float(full_loss), rel=1e-6)
    for name, spec in specs.items():
        if f"{name}.lora_a" not in adapters:
            continue
        a, b, dw = (np.asarray(x, np.float64) for x in (adapters[f"{name}.lora_a"], adapters[f"{name}.lora_b"],
                                                         full_grads[name]))
        k = out_dims(spec)
        out_axes, in_axes = list(range(k)), list(range(k, dw.ndim))
        want_a = lora.scale * np.tensordot(b, dw, axes=(out_axes, out_axes))                   # [r, *in]
        want_b = lora.scale * np.tensordot(dw, a, axes=(in_axes, [i - k + 1 for i in in_axes]))  # [*out, r]
        np.testing.assert_allclose(grads[f"{name}.lora_a"], want_a, rtol=1e-4, atol=1e-7, err_msg=name)
        np.testing.assert_allclose(grads[f"{name}.lora_b"], want_b, rtol=1e-4, atol=1e-7, err_msg=name)


def test_weight_gradients_are_fenced_per_block(tmp_path):
    """Under remat, the backward pass of every block but the first hands its weight gradients (LoRA:
    the adapters' a and b) and its input's gradient on through one optimization barrier, so XLA
    cannot defer the weight-gradient dots, and keep their [T, H] operands alive, to the end of the
    step. Without remat (and in inference) or with fence=False (--no-gradient-fence) there is none."""
    from glm_jax.params import param_specs
    from glm_jax.train.lora import LoRAConfig, init_adapters

    random_glm(tmp_path, heads=4, kv_heads=2, rope_theta=1e4)
    model = glm_jax.load(tmp_path, mesh=one_device())
    layers = model.config.num_layers
    assert layers > 1
    lora = LoRAConfig(rank=2, alpha=4.0)
    adapters = init_adapters(lora, param_specs(model.config, model.dtype), jax.random.key(0))
    ids = np.random.default_rng(0).integers(0, 300, (1, 16))
    batch = batch_of(ids, ids, np.broadcast_to(np.arange(16), ids.shape))
    base = flat_params(model.state)

    def barriers(trainer, params, frozen):
        eqns = str(jax.make_jaxpr(trainer.gradients)(params, frozen, batch))
        return [line for line in eqns.splitlines() if "optimization_barrier" in line]

    with_lora = Trainer(model.config, model.layout, model.dtype, make_optimizer(OptimizerConfig()), lora=lora)
    fenced = barriers(with_lora, adapters, base)
    assert len(fenced) == layers - 1
    per_block = len(adapters) // layers           # a and b of every adapted weight
    assert all(len(line.split("optimization_barrier")[1].split()) == 1 + per_block for line in fenced)  # dx too
    assert len(barriers(trainer_for(model, remat="full"), base, {})) == layers - 1
    assert barriers(trainer_for(model, remat="none"), base, {}) == []
    unfenced = Trainer(model.config, model.layout, model.dtype, make_optimizer(OptimizerConfig()), lora=lora, fence=False)
    assert barriers(unfenced, adapters, base) == []


def test_segments_keep_a_fraction_of_the_block_inputs(tmp_path):
    """remat "segments": ceil(sqrt(layers)) blocks a segment, each segment one more checkpoint
    around its blocks' own; what the forward pass keeps for the backward holds one block input a
    segment, not one a block."""
    from glm_jax.train.remat import segment_length

    assert [segment_length(n) for n in (1, 2, 5, 9, 10, 40)] == [1, 2, 3, 3, 4, 7]
    random_glm(tmp_path, heads=4, kv_heads=2, rope_theta=1e4, layers=5)
    model = glm_jax.load(tmp_path, mesh=one_device())
    ids = np.random.default_rng(0).integers(0, 300, (1, 16))
    batch = batch_of(ids, ids, np.broadcast_to(np.arange(16), ids.shape))
    params = flat_params(model.state)

    micro = (batch.tokens[0], batch.labels[0], batch.positions[0], batch.segments[0])

    def saved_inputs(remat):    # [1, 16, 64] arrays the forward pass saves for the backward (traced, not run)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            print_saved_residuals(lambda p: trainer_for(model, remat=remat).loss(p, {}, *micro)[0],
                                                    params)
        return out.getvalue().count("[1,16,64]")

    assert saved_inputs("full") >= 5 and saved_inputs("segments") == saved_inputs("full") - 5 + 2
    jaxpr = str(jax.make_jaxpr(lambda p: trainer_for(model, remat="segments").loss(p, {}, *micro))(params))
    assert jaxpr.count("remat2[") == 2 + 5                      # two segments around five blocks


@pytest.mark.parametrize("mesh", ["sequence=8"])
def test_packing_equals_the_examples_run_separately(tmp_path, mesh):
    """Three examples packed into one row (positions restarting, segments apart, each example's
    first label masked as the batcher does) give the summed loss and gradients of the three run
    one a row, on one device and through the ring."""
    random_glm(tmp_path, heads=4, kv_heads=2, rope_theta=1e4)
    model = glm_jax.load(tmp_path, mesh=mesh or one_device())
    rng = np.random.default_rng(5)
    lengths, row = (11, 7, 13), 36
    examples = [rng.integers(1, 300, n) for n in lengths]
    packed = np.zeros((1, row), np.int64)
    labels, positions, segments = np.full((1, row), IGNORE), np.zeros((1, row)), np.zeros((1, row))
    separate = [np.zeros((3, row), np.int64), np.full((3, row), IGNORE), np.zeros((3, row)), np.zeros((3, row))]
    start = 0
    for i, ex in enumerate(examples):
        n = len(ex)
        packed[0, start:start + n], labels[0, start + 1:start + n] = ex, ex[1:]
        positions[0, start:start + n], segments[0, start:start + n] = np.arange(n), i + 1
        separate[0][i, :n], separate[1][i, 1:n], separate[2][i, :n], separate[3][i, :n] = ex, ex[1:], np.arange(n), 1
        start += n
    trainer = trainer_for(model, remat="none")
    params = flat_params(model.state)
    got = jax.jit(trainer.gradients)(params, {}, batch_of(packed, labels, positions, segments))
    want = jax.jit(trainer.gradients)(params, {}, batch_of(*separate))
    assert int(got[2]) == int(want[2]) == sum(lengths) - 3
    assert float(got[1]) == pytest.approx(float(want[1]), rel=1e-6)
    for name in want[0]:
        np.testing.assert_allclose(got[0][name], want[0][name], rtol=1e-4, atol=1e-7, err_msg=name)
    # without the segments the examples see each other: a different loss
    crossed = jax.jit(trainer.gradients)(params, {}, batch_of(packed, labels, positions))
    assert abs(float(crossed[1]) - float(want[1])) > 1e-4


def test_output_layer_gradient_takes_the_logit_gradient_as_it_is():
    """The output layer's gradient accumulates transposed ([H, V] += hᵀ·d) so that XLA's CPU matmul
    reads the chunk's logit gradient d [tokens, V] as it lies: accumulated as [V, H] += dᵀ·h, the
    compiled step first copied d into a [V, tokens] transpose."""
    layout = Layout(one_device())
    h, w = jnp.zeros((2, 256, 64)), jnp.zeros((4096, 64))
    y = jnp.zeros((2, 256), jnp.int32)
    grad = jax.jit(jax.grad(lambda h, w: cross_entropy(h, w, y, layout, chunk=256)[0], argnums=(0, 1)))
    # the products the loss traces: the dW one comes out [H, V], contracting d over its tokens
    dots = [eqn for eqn in _equations(jax.make_jaxpr(grad)(h, w).jaxpr) if eqn.primitive.name == "dot_general"]
    w_dots = [eqn for eqn in dots if sorted(eqn.outvars[0].aval.shape) == [64, 4096]]
    assert [tuple(eqn.outvars[0].aval.shape) for eqn in w_dots] == [(64, 4096)]
    hlo = grad.lower(h, w).compile().as_text()
    assert "f32[512,4096]" in hlo                      # d [tokens, V] as the compiled step holds it
    assert "f32[4096,512]" not in hlo                  # and no transposed copy [V, tokens] of it


def _equations(jaxpr):
    """Every equation of a jaxpr, those of its sub-jaxprs (scan, shard_map, custom_vjp, ...) included."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    yield from _equations(sub)


def test_optimizer_state_is_sharded_like_the_weights_under_jit():
    """Full fine-tuning on an FSDP-style layout: the jitted init (how compile-report sizes the
    step) lays out the float32 master weights and every parameter-shaped optimizer leaf as the
    weight is sharded. optax's zeros_like left Adam's moments replicated: the whole model's
    moments on every chip."""
    from glm_jax.config import GLMConfig
    from glm_jax.params import param_specs

    config = GLMConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=16)
    layout = Layout.create(make_mesh("sequence=4", jax.devices()[:4]), weights_over_sequence=True)
    specs = param_specs(config, jnp.bfloat16)
    weights = {n: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=layout.sharding(s.axes, s.shape))
               for n, s in specs.items()}
    trainer = Trainer(config, layout, jnp.bfloat16, make_optimizer(OptimizerConfig()))
    state = jax.jit(trainer.init).lower(weights).compile().output_shardings
    moments = [m for key in ("mu", "nu") for _, m in optax.tree_utils.tree_get_all_with_path(state["opt_state"], key)]
    assert len(moments) == 2
    for name, spec in specs.items():
        like = lambda sharding: sharding.is_equivalent_to(layout.sharding(spec.axes, spec.shape), len(spec.shape))
        assert like(state["params"][name]) and all(like(m[name]) for m in moments), name
    assert layout.spec(specs["embed"].axes, specs["embed"].shape) == jax.sharding.PartitionSpec(None, "sequence")
