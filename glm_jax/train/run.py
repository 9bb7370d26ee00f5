"""`glm-jax finetune`: a whole training run, from a model folder and a JSONL file to a model folder.

OUT receives, as the run goes: checkpoints/ (the train state every --save-every steps and at the
end), metrics.jsonl (a line per step); at the end it is a glm-jax model folder (config.json,
params/, the tokenizer and other files of the source, what `export` needs to write the source's HF
layout) with loss.png. Bad input is found before anything is written.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
import time

import numpy as np

from ..options import DEFAULT_REMAT, LOSS_CHUNK, OPTIMIZERS, SCHEDULES

ADAPTERS = "adapters"   # LoRA runs: the adapters alone (Orbax, float32) and adapter_config.json


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    model: pathlib.Path
    data: pathlib.Path
    out: pathlib.Path
    steps: int = 100
    batch_size: int = 1
    seq_len: int = 2048
    grad_accum: int = 1
    learning_rate: float = 1e-5
    optimizer: str = OPTIMIZERS[0]
    schedule: str = SCHEDULES[0]
    warmup_steps: int | None = None      # default: 10% of the steps
    weight_decay: float = 0.0
    clip_norm: float = 1.0               # 0: off
    mesh: str | None = None
    remat: str = DEFAULT_REMAT
    gradient_fence: bool = True          # see Trainer.fence
    loss_chunk: int = LOSS_CHUNK
    lora_rank: int | None = None         # None: full fine-tuning
    lora_alpha: float | None = None      # default 2 x rank
    lora_targets: str | None = None      # default: every attention and MLP projection
    quantize: str | None = None          # the frozen base's quantization (LoRA only), options.Quantization
    save_every: int = 0                  # 0: only at the end
    keep: int = 2
    resume: bool = False
    seed: int = 0
    shuffle: bool = True
    truncate: bool = False
    packing: bool = False
    progress: bool = True

    def check(self) -> None:
        positive = {"--steps": self.steps, "--batch-size": self.batch_size, "--seq-len": self.seq_len,
                    "--grad-accum": self.grad_accum, "--keep": self.keep, "--loss-chunk": self.loss_chunk}
        for flag, value in positive.items():
            if value < 1:
                raise ValueError(f"{flag} must be at least 1, got {value}")
        if self.learning_rate <= 0:
            raise ValueError(f"--lr must be positive, got {self.learning_rate:g}")
        if self.save_every < 0 or self.clip_norm < 0 or self.weight_decay < 0:
            raise ValueError("--save-every, --clip-norm and --weight-decay must not be negative")
        if self.warmup_steps is not None and not 0 <= self.warmup_steps < max(self.steps, 1) + 1:
            raise ValueError(f"--warmup-steps must be in [0, {self.steps}], got {self.warmup_steps}")
        self.lora()                                              # a bad LoRA setup stops here
        if self.quantize is not None:
            from ..options import Quantization

            Quantization.parse(self.quantize)
            if self.lora_rank is None:
                raise ValueError("--quantize needs --lora-rank: a quantized base trains only frozen, under LoRA adapters")
        from ..options import REMATS

        if self.remat not in REMATS:
            raise ValueError(f"--remat must be one of {', '.join(REMATS)}, got {self.remat!r}")
        if not (self.model / "config.json").is_file():
            raise ValueError(f"{self.model}: no config.json (expected a glm-jax or Hugging Face model folder)")
        if self.resume:
            if not (self.out / "checkpoints").is_dir():
                raise ValueError(f"--resume: {self.out} holds no checkpoints")
        elif self.out.exists() and any(self.out.iterdir()):
            raise ValueError(f"{self.out} is not empty (use --resume to continue its run, or another folder)")


    def lora(self):
        from .lora import DEFAULT_TARGETS, LoRAConfig

        if self.lora_rank is None:
            if self.lora_alpha is not None or self.lora_targets is not None:
                raise ValueError("--lora-alpha and --lora-targets need --lora-rank")
            return None
        return LoRAConfig(self.lora_rank, 2.0 * self.lora_rank if self.lora_alpha is None else self.lora_alpha,
                          self.lora_targets or DEFAULT_TARGETS)


def optimizer_config(c: FinetuneConfig):
    from .step import OptimizerConfig

    warmup = c.steps // 10 if c.warmup_steps is None else c.warmup_steps
    return OptimizerConfig(learning_rate=c.learning_rate, steps=c.steps, warmup_steps=warmup, schedule=c.schedule,
                           optimizer=c.optimizer, weight_decay=c.weight_decay, clip_norm=c.clip_norm or None)


def finetune(c: FinetuneConfig) -> dict:
    """Runs the training; returns a summary (steps, last loss, seconds, where the model is)."""
    import jax
    import jax.numpy as jnp

    import glm_jax
    from glm_jax.convert.checkpoint import remember_source
    from glm_jax.params import PARAMS_DIR, flat_params, param_specs, save_params
    from glm_jax.progress import Progress
    from glm_jax.quantize import quantization_of
    from glm_jax.sharding import Layout, make_mesh
    from glm_jax.tokenizer import Tokenizer

    from .checkpoint import Checkpoints
    from .data import Batches, read_examples
    from .loss import counted_budget
    from .lora import trainable_and_frozen
    from .step import Batch, Trainer, make_optimizer, schedule

    c.check()
    opt = optimizer_config(c)
    make_optimizer(opt)                                      # a bad --optimizer / --schedule stops here
    if c.resume and (done := _finished(c)) is not None:
        return done
    tokenizer = Tokenizer.from_file(c.model / "tokenizer.model") if (c.model / "tokenizer.model").is_file() else None
    model = glm_jax.load(c.model, mesh=c.mesh if c.mesh else make_mesh("sequence=1", jax.devices()[:1]),
                         quantize=c.quantize)
    config, layout = model.config, model.layout or Layout(make_mesh("sequence=1", jax.devices()[:1]))
    examples = read_examples(c.data, tokenizer, seq_len=c.seq_len, truncate=c.truncate, vocab_size=config.vocab_size)
    params = flat_params(model.state)
    dtype = model.dtype
    lora = c.lora()
    quantized = str(quantization_of(params)) if quantization_of(params) else None
    if quantized and lora is None:
        raise ValueError(f"{c.model} is stored quantized ({quantized}): it trains only frozen, under LoRA "
                         f"adapters (--lora-rank)")
    trainable, frozen = trainable_and_frozen(lora, params, param_specs(config, dtype), jax.random.key(c.seed),
                                             layout.mesh)
    trainer = Trainer(config, layout, dtype, make_optimizer(opt), remat=c.remat,
                      loss_chunk=c.loss_chunk, lora=lora, fence=c.gradient_fence)
    batches = Batches(examples, batch_size=c.batch_size, seq_len=c.seq_len, pad_id=config.pad_token_id or 0,
                      seed=c.seed, shuffle=c.shuffle, packing=c.packing)
    record = {"model": config.to_dict(), "lora": lora and lora.to_dict(), "quantize": quantized, "seq_len": c.seq_len,
              "batch_size": c.batch_size, "grad_accum": c.grad_accum, "packing": c.packing,
              "optimizer": dataclasses.asdict(opt)}

    state = trainer.init(trainable)
    del params, trainable, model
    ckpt = Checkpoints(c.out, keep=c.keep, create=not c.resume)
    start = 0
    if c.resume:
        start = ckpt.latest()
        if start is None:
            raise ValueError(f"--resume: {c.out / 'checkpoints'} holds no finished checkpoint")
        saved = ckpt.record(start)
        for key in ("model", "lora", "quantize", "seq_len", "batch_size", "grad_accum", "packing"):
            if saved.get(key) != record[key]:
                raise ValueError(f"--resume: the checkpoint was made with another {key.replace('_', ' ')} "
                                 f"({saved.get(key)!r}, now {record[key]!r})")
        state = ckpt.restore(start, state)
        batches.restore(saved["data"])
        if saved.get("optimizer", record["optimizer"]) != record["optimizer"]:
            _announce_new_schedule(saved["optimizer"], opt, start)

    # the state comes back with the shardings it went in with: one compile, not a second at step 2
    replicated = jax.sharding.NamedSharding(layout.mesh, jax.sharding.PartitionSpec())
    state = jax.tree.map(lambda x: x if isinstance(x.sharding, jax.sharding.NamedSharding)
                         else jax.device_put(x, replicated), state)              # the step and Adam's count
    step_fn = jax.jit(trainer.step, donate_argnums=0, static_argnames="counted",
                      out_shardings=(jax.tree.map(lambda x: x.sharding, state), None))
    lr = schedule(opt)
    metrics_path = c.out / "metrics.jsonl"
    if c.resume and metrics_path.is_file():   # steps after the checkpoint are run again: their lines go
        kept = [line for line in metrics_path.read_text().splitlines() if line and json.loads(line)["step"] <= start]
        metrics_path.write_text("".join(line + "\n" for line in kept))
    metrics_file = metrics_path.open("a")
    summary = {"first_step": start, "steps": c.steps}
    began = time.perf_counter()
    with Progress("finetune", c.steps - start, unit="steps", scale=1, enabled=c.progress) as bar:
        for step in range(start, c.steps):
            parts = [next(batches) for _ in range(c.grad_accum)]
            arrays = [np.stack([getattr(p, f) for p in parts]) for f in ("tokens", "labels", "positions", "segment_ids")]
            batch = Batch(*(jnp.asarray(a, jnp.int32) for a in arrays))
            counted = counted_budget(arrays[1], c.seq_len)      # answer-only data: the output layer on those alone
            tic = time.perf_counter()
            state, metrics = step_fn(state, frozen, batch, counted=counted)
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            seconds = time.perf_counter() - tic
            tokens = int(sum((p.segment_ids > 0).sum() for p in parts))
            line = {"step": step + 1, "loss": metrics["loss"], "lr": float(lr(step)), "grad_norm": metrics["grad_norm"],
                    "tokens": tokens, "counted_tokens": int(metrics["tokens"]), "tokens_per_s": tokens / seconds,
                    "seconds": seconds}
            metrics_file.write(json.dumps(line) + "\n")
            metrics_file.flush()
            bar.desc = f"finetune loss {line['loss']:.4f} {line['tokens_per_s']:,.0f} tok/s"
            bar.update(1)
            if c.save_every and (step + 1) % c.save_every == 0 or step + 1 == c.steps:
                ckpt.save(step + 1, state, {**record, "data": batches.state()})
            summary["loss"] = line["loss"]
    metrics_file.close()
    ckpt.close()
    summary["seconds"] = time.perf_counter() - began

    tmp = c.out / ".final.tmp"                       # written whole, then renamed into place
    shutil.rmtree(tmp, ignore_errors=True)
    save_params(tmp / PARAMS_DIR, [trainer.merged(state["params"], frozen)])       # the (merged) model
    written = [PARAMS_DIR]
    if lora:                                        # adapters/: adapter_config.json and params/
        save_params(tmp / ADAPTERS / PARAMS_DIR, [state["params"]])
        (tmp / ADAPTERS / "adapter_config.json").write_text(json.dumps(
            {**lora.to_dict(), "scale": lora.scale, "base_model": str(c.model), "dtype": "float32"}, indent=1) + "\n")
        written.append(ADAPTERS)
    for folder in written:
        shutil.rmtree(c.out / folder, ignore_errors=True)
        (tmp / folder).rename(c.out / folder)
    tmp.rmdir()
    config.replace(dtype=jnp.dtype(dtype).name).save(c.out / "config.json")
    remember_source(c.model, c.out)         # `export` gives back the source's HF layout, shards and files
    summary["plot"] = plot_losses(c.out / "metrics.jsonl", c.out / "loss.png")
    summary["out"] = str(c.out)
    return summary


def _finished(c: FinetuneConfig) -> dict | None:
    """--resume of a run whose last checkpoint is at --steps and whose model folder is written: the
    summary of a run with nothing to do (None: there is work). A checkpoint past --steps is refused."""
    from glm_jax.params import PARAMS_DIR

    from .checkpoint import Checkpoints

    ckpt = Checkpoints(c.out, keep=c.keep, create=False)
    start = ckpt.latest()
    ckpt.close()
    if start is not None and start > c.steps:
        raise ValueError(f"--resume: {c.out} has trained {start} steps, more than --steps {c.steps}")
    if start == c.steps and (c.out / PARAMS_DIR).is_dir():
        return {"first_step": start, "steps": c.steps, "seconds": 0.0, "out": str(c.out), "already_finished": True}
    return None


def _announce_new_schedule(saved: dict, opt, start: int) -> None:
    """A resume whose schedule flags differ from the checkpoint's run recomputes the learning-rate schedule
    from the new flags (as transformers' Trainer and MaxText do on resume), and says so."""
    import sys

    from .step import OptimizerConfig, schedule

    now = dataclasses.asdict(opt)
    changes = ", ".join(f"{k} {saved[k]} -> {now[k]}" for k in now if saved.get(k) != now[k])
    before = float(schedule(OptimizerConfig(**saved))(start))
    print(f"glm-jax finetune: resuming after step {start} with a new learning-rate schedule ({changes}): step "
          f"{start + 1} runs at lr {float(schedule(opt)(start)):.3g} (the checkpoint's schedule: {before:.3g})",
          file=sys.stderr)


def plot_losses(metrics: pathlib.Path, png: pathlib.Path) -> str | None:
    """The loss curve of metrics.jsonl as a PNG (None when matplotlib is not installed)."""
    try:
        import matplotlib
    except ModuleNotFoundError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows])
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean over counted tokens)")
    ax.set_title(f"{png.parent.name}: loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return str(png)
