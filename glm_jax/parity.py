"""Numerical parity of glm-jax against the PyTorch original on the same weights and ids.

The reference is transformers' GlmForCausalLM for the native `glm` layout; for the original
`chatglm` layout, the folder's own modeling code (trust_remote_code) when present and loadable,
else the same weights mapped to the native layout. Needs torch and transformers (the [test] extra).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import warnings

import numpy as np

from .config import GLMConfig

TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2}  # logits ‖Δ‖/‖ref‖
GRAD_TOLERANCE = {"float32": 1e-4, "bfloat16": 1e-1}  # --grad: the worst parameter's ‖Δ‖/‖ref‖


@dataclasses.dataclass
class ParityReport:
    reference: str                 # which PyTorch code ran
    dtype: str
    batch: int
    seq_len: int
    layers: list[dict]             # per hidden state: name, rel, max_abs
    logits_rel: float
    logits_max_abs: float
    top1: float
    tolerance: float
    fp32_reference: dict | None    # bf16 only: both sides against a float32 PyTorch run
    grad: dict | None = None       # --grad: loss and per-parameter gradient errors

    @property
    def ok(self) -> bool:
        grad_ok = self.grad is None or (self.grad["loss_rel"] <= self.grad["tolerance"]
                                        and self.grad["max_rel"] <= self.grad["tolerance"])
        return self.logits_rel <= self.tolerance and grad_ok

    def to_json(self) -> str:
        return json.dumps({**dataclasses.asdict(self), "ok": self.ok}, indent=2)

    def format(self) -> str:
        lines = [f"reference: {self.reference}",
                 f"inputs:    batch {self.batch} x {self.seq_len} random tokens, dtype {self.dtype}", "",
                 f"{'hidden state':<16}{'rel error':>12}{'max |Δ|':>12}"]
        lines += [f"{row['name']:<16}{row['rel']:>12.3e}{row['max_abs']:>12.3e}" for row in self.layers]
        lines += ["", f"{'logits':<16}{self.logits_rel:>12.3e}{self.logits_max_abs:>12.3e}",
                  f"top-1 agreement: {100 * self.top1:.2f}%"]
        if self.fp32_reference:
            f = self.fp32_reference
            lines += ["", "against PyTorch float32 on the same weights (bf16 rounding noise):",
                      f"  glm-jax bf16: logits rel {f['jax_rel']:.3e}, top-1 {100 * f['jax_top1']:.2f}%",
                      f"  PyTorch bf16: logits rel {f['torch_rel']:.3e}, top-1 {100 * f['torch_top1']:.2f}%"]
        if self.grad:
            g = self.grad
            lines += ["", f"loss (next-token cross-entropy, every token counted): PyTorch {g['loss_torch']:.6f}, "
                          f"glm-jax {g['loss_jax']:.6f}, rel error {g['loss_rel']:.3e}",
                      f"{'gradient':<48}{'rel error':>12}"]
            lines += [f"{row['name']:<48}{row['rel']:>12.3e}" for row in g["params"]]
            lines += [f"worst gradient rel error {g['max_rel']:.3e} ({g['worst']}); tolerance {g['tolerance']:.1e}"]
        verdict = "PASS" if self.ok else "FAIL"
        lines += ["", f"{verdict}: logits rel error {self.logits_rel:.3e} "
                      f"{'<=' if self.ok else '>'} tolerance {self.tolerance:.1e}"]
        return "\n".join(lines)


def _rel(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm((a - ref).astype(np.float64)) / max(np.linalg.norm(ref.astype(np.float64)), 1e-30))


def torch_reference(hf_dir: pathlib.Path, dtype: str, progress: bool = True):
    """(torch model, description). Tries the folder's own code for the chatglm layout first;
    `progress` False silences transformers' weight-loading bar."""
    import torch
    import transformers

    if not progress:
        transformers.utils.logging.disable_progress_bar()

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    model_type = json.loads((hf_dir / "config.json").read_text())["model_type"]
    if model_type == "glm":
        model = transformers.GlmForCausalLM.from_pretrained(hf_dir, dtype=torch_dtype)
        return model.eval(), f"transformers {transformers.__version__} GlmForCausalLM ({hf_dir})"
    reason = "no modeling_chatglm.py in the folder"
    if (hf_dir / "modeling_chatglm.py").is_file():
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch_dtype, trust_remote_code=True)
            return model.eval(), f"original modeling_chatglm.py ({hf_dir})"
        except Exception as e:  # the remote code often fails on newer transformers
            reason = f"its modeling_chatglm.py did not load ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    return _mapped_glm(hf_dir, torch_dtype), (
        f"transformers {transformers.__version__} GlmForCausalLM on the weights mapped from the "
        f"chatglm layout ({reason})")


def _mapped_glm(hf_dir: pathlib.Path, torch_dtype):
    """GlmForCausalLM holding a chatglm-layout folder's weights (renamed and split, values unchanged)."""
    import torch
    import transformers
    from glm_jax.convert.checkpoint import open_hf
    from glm_jax.convert.hf import hf_tensor_from, iter_params
    from glm_jax.convert.layout import GLM, hf_config, hf_tensors

    config, _, ckpt, plan = open_hf(hf_dir)
    params = dict(iter_params(ckpt, plan, np.float32))
    state = {t.name: torch.from_numpy(hf_tensor_from(t, params.__getitem__)) for t in hf_tensors(config, GLM)}
    cfg = hf_config(config, GLM)
    hf_cfg = transformers.GlmConfig(**{k: v for k, v in cfg.items() if k not in ("model_type", "architectures", "torch_dtype")})
    model = transformers.GlmForCausalLM(hf_cfg)
    model.load_state_dict(state, strict=True)
    return model.to(torch_dtype).eval()


def _torch_run(model, ids: np.ndarray):
    import torch

    with torch.no_grad():
        out = model(torch.from_numpy(ids), output_hidden_states=True)
    hidden = [h.float().numpy() for h in out.hidden_states]
    return out.logits.float().numpy(), hidden


def grad_parity(torch_model, jax_model, ids: np.ndarray, dtype: str) -> dict:
    """Loss (every next token counted) and the gradient of every parameter, PyTorch against
    glm-jax's train step on the same ids; gradients compared in the reference's own tensor names."""
    import jax
    import jax.numpy as jnp
    import torch

    from .convert.hf import hf_tensor_from
    from .convert.layout import CHATGLM, GLM, hf_tensors
    from .params import flat_params
    from .sharding import Layout, make_mesh
    from .train.step import Batch, OptimizerConfig, Trainer, make_optimizer

    torch_model.zero_grad()
    out = torch_model(torch.from_numpy(ids), labels=torch.from_numpy(ids))
    out.loss.backward()
    want = {n: p.grad.float().numpy() for n, p in torch_model.named_parameters() if p.grad is not None}
    layout = Layout(make_mesh("sequence=1", jax.devices()[:1]))
    trainer = Trainer(jax_model.config, layout, jax_model.dtype, make_optimizer(OptimizerConfig(optimizer="sgd")),
                      remat="none")
    params = {k: v.astype(jnp.float32) for k, v in flat_params(jax_model.state).items()}
    as_batch = lambda x: jnp.asarray(x[None], jnp.int32)
    batch = Batch(as_batch(ids), as_batch(ids), as_batch(np.broadcast_to(np.arange(ids.shape[1]), ids.shape)),
                  as_batch(np.ones_like(ids)))
    grads, loss, _ = jax.jit(trainer.gradients)(params, {}, batch)
    layout_name = GLM if any(n.startswith("model.") for n in want) else CHATGLM
    rows = []
    for t in hf_tensors(jax_model.config, layout_name):
        if t.name in want:
            got = hf_tensor_from(t, lambda n: np.asarray(grads[n]))
            rows.append({"name": t.name, "rel": _rel(got, want[t.name])})
    missing = sorted(set(want) - {r["name"] for r in rows})
    if missing:
        raise ValueError(f"no glm-jax gradient maps to {', '.join(missing[:3])}")
    worst = max(rows, key=lambda r: r["rel"])
    loss_torch = float(out.loss.detach().float())
    return {"loss_torch": loss_torch, "loss_jax": float(loss), "loss_rel": abs(float(loss) - loss_torch) / abs(loss_torch),
            "params": rows, "max_rel": worst["rel"], "worst": worst["name"], "tolerance": GRAD_TOLERANCE[dtype]}


def run_parity(hf_dir: str | pathlib.Path, *, model_dir: str | pathlib.Path | None = None, dtype: str = "float32",
               seq_len: int = 64, batch: int = 2, seed: int = 0, tolerance: float | None = None,
               grad: bool = False, progress: bool = True) -> ParityReport:
    from .api import load

    hf_dir = pathlib.Path(hf_dir)
    config = GLMConfig.from_hf(hf_dir)
    ids = np.random.default_rng(seed).integers(0, config.vocab_size, (batch, seq_len), dtype=np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch_model, description = torch_reference(hf_dir, dtype, progress)
    ref_logits, ref_hidden = _torch_run(torch_model, ids)
    jax_model = load(model_dir or hf_dir, dtype=dtype)
    logits, hidden = jax_model.hidden_states(ids)
    # transformers reports the embedding, then every layer's output, the last one after the final norm
    names = ["embedding"] + [f"layer {i}" for i in range(config.num_layers)]
    layers = []
    for i, (name, ref) in enumerate(zip(names, ref_hidden)):
        ours = hidden[i]
        if i == config.num_layers and len(ref_hidden) == config.num_layers + 1:
            ours = np.asarray(jax_model.final_norm(hidden[i]))
            name += " (+norm)"
        layers.append({"name": name, "rel": _rel(ours, ref), "max_abs": float(np.abs(ours - ref).max())})
    grads = grad_parity(torch_model, jax_model, ids, dtype) if grad else None
    fp32 = None
    if dtype == "bfloat16":
        del torch_model
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref32, _ = _torch_run(torch_reference(hf_dir, "float32", progress)[0], ids)
        fp32 = {"jax_rel": _rel(logits, ref32), "jax_top1": float((logits.argmax(-1) == ref32.argmax(-1)).mean()),
                "torch_rel": _rel(ref_logits, ref32),
                "torch_top1": float((ref_logits.argmax(-1) == ref32.argmax(-1)).mean())}
    return ParityReport(reference=description, dtype=dtype, batch=batch, seq_len=seq_len, layers=layers,
                        logits_rel=_rel(logits, ref_logits), logits_max_abs=float(np.abs(logits - ref_logits).max()),
                        top1=float((logits.argmax(-1) == ref_logits.argmax(-1)).mean()),
                        tolerance=TOLERANCE[dtype] if tolerance is None else tolerance, fp32_reference=fp32,
                        grad=grads)
