"""`glm-jax finetune` end to end: one SGD step equals torch's, the output folder loads, generates and
exports to a folder transformers runs; resume is bit-identical; bad input exits 2 writing nothing."""

import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

import glm_jax
from glm_jax.cli import main

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from conftest import random_glm  # noqa: E402  (tests/ is on sys.path)

SEQ = 24


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def id_rows(n=4, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        ids = rng.integers(1, 300, int(rng.integers(15, SEQ + 1))).tolist()
        labels = [-100] * 5 + ids[5:] if i % 2 else ids
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def finetune(*args):
    return main(["finetune", "--seq-len", str(SEQ), "--quiet", "--compile-cache", "off", *map(str, args)])


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    random_glm(path, heads=4, kv_heads=2, rope_theta=1e4)
    return path


def test_one_sgd_step_equals_torch(tmp_path, hf):
    rows = id_rows(2)
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    assert finetune("--model", hf, "--data", data, "--out", tmp_path / "out", "--steps", 1, "--batch-size", 2,
                    "--optimizer", "sgd", "--lr", 0.5, "--schedule", "constant", "--warmup-steps", 0,
                    "--clip-norm", 0, "--no-shuffle") == 0

    torch_model = transformers.GlmForCausalLM.from_pretrained(hf).eval()
    before = {n: p.detach().clone() for n, p in torch_model.named_parameters()}
    ids = torch.zeros((2, SEQ), dtype=torch.long)                 # right-padded with id 0, as the batcher pads
    labels = torch.full((2, SEQ), -100)
    for i, r in enumerate(rows):
        ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
        labels[i, : len(r["labels"])] = torch.tensor(r["labels"])
    opt = torch.optim.SGD(torch_model.parameters(), lr=0.5)
    torch_model(ids, labels=labels).loss.backward()
    opt.step()

    metrics = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1] and metrics[0]["lr"] == 0.5
    assert metrics[0]["counted_tokens"] == int((labels[:, 1:] != -100).sum())
    # the output folder is a model: exported to the HF layout, transformers loads it; the update
    # (new - old weights) is torch's
    assert main(["export", str(tmp_path / "out"), str(tmp_path / "hf-out"), "--layout", "glm", "--quiet"]) == 0
    trained = transformers.GlmForCausalLM.from_pretrained(tmp_path / "hf-out").eval()
    for name, p in trained.named_parameters():
        want = dict(torch_model.named_parameters())[name].detach() - before[name]
        got = p.detach() - before[name]
        assert float((got - want).norm() / want.norm()) <= 1e-4, name
    model = glm_jax.load(tmp_path / "out")
    assert len(model.generate([rows[0]["input_ids"][:5]], max_new_tokens=3, temperature=0)[0]) == 3
    assert (tmp_path / "out" / "loss.png").stat().st_size > 1000


@pytest.mark.slow
def test_resume_is_bit_identical(tmp_path, hf):
    """(Packed rows.) A run stopped after its step-2 checkpoint (its later checkpoint removed) and resumed ends
    with the very bytes of an uninterrupted run: same data order, same optimizer state."""
    data = write_jsonl(tmp_path / "data.jsonl", id_rows(6, seed=1))
    args = ("--model", hf, "--data", data, "--steps", 4, "--save-every", 2, "--lr", 1e-2, "--keep", 3, "--packing")
    assert finetune(*args, "--out", tmp_path / "a") == 0
    assert finetune(*args, "--out", tmp_path / "b") == 0
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "4")
    shutil.rmtree(tmp_path / "b" / "params")
    assert finetune(*args, "--out", tmp_path / "b", "--resume") == 0
    a, b = (glm_jax.load(tmp_path / x) for x in ("a", "b"))
    from glm_jax.params import flat_params

    fa, fb = flat_params(a.state), flat_params(b.state)
    assert all(np.array_equal(np.asarray(fa[n]), np.asarray(fb[n])) for n in fa)
    lines = lambda x: [json.loads(line) for line in (tmp_path / x / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines("b")] == [1, 2, 3, 4]
    assert [m["loss"] for m in lines("a")] == [m["loss"] for m in lines("b")]
    assert lines("a")[0]["loss"] > lines("a")[-1]["loss"] > 0


@pytest.mark.parametrize("rows, extra, message", [
    (['{"input_ids": [1, 2, 3]'], (), r"data\.jsonl:1: "),
    ([{"input_ids": [1, 2, 3]}, {"input_ids": [1, 2], "colour": 1}], (), r"data\.jsonl:2: .*colour"),
    ([{"input_ids": list(range(1, 40))}], (), r"data\.jsonl:1: .*39.*24"),
    ([{"input_ids": [1, 2, 3]}], ("--steps", 0), r"--steps must be at least 1, got 0"),
    ([{"input_ids": [1, 2, 3]}], ("--resume",), r"--resume: .* holds no checkpoints"),
])
def test_bad_input_exits_2_writing_nothing(tmp_path, hf, capsys, rows, extra, message):
    data = tmp_path / "data.jsonl"
    data.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    assert finetune("--model", hf, "--data", data, "--out", tmp_path / "out", *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("glm-jax finetune: error: ")
    assert __import__("re").search(message, err[0]), err[0]
    assert not (tmp_path / "out").exists()


def test_refuses_a_used_folder_and_another_models_checkpoint(tmp_path, hf, capsys):
    data = write_jsonl(tmp_path / "data.jsonl", id_rows(2))
    assert finetune("--model", hf, "--data", data, "--out", tmp_path / "out", "--steps", 1) == 0
    before = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert finetune("--model", hf, "--data", data, "--out", tmp_path / "out", "--steps", 2) == 2
    assert "is not empty (use --resume" in capsys.readouterr().err
    other = tmp_path / "other"
    random_glm(other, heads=4, kv_heads=4, rope_theta=1e4)
    assert finetune("--model", other, "--data", data, "--out", tmp_path / "out", "--steps", 2, "--resume") == 2
    assert "--resume: the checkpoint was made with another model" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == before


def test_lora_trains_adapters_only(tmp_path, hf):
    """LoRA: only the adapted projections change, by exactly scale x B A of the saved adapters;
    embedding, norms and output layer stay bit for bit; a resume with another LoRA setup is refused."""
    from orbax.checkpoint import v1 as ocp

    from glm_jax.params import PARAMS_DIR, flat_params, unnest

    data = write_jsonl(tmp_path / "data.jsonl", id_rows(4, seed=2))
    assert finetune("--model", hf, "--data", data, "--out", tmp_path / "out", "--steps", 3, "--lr", 5e-2,
                    "--lora-rank", 2, "--lora-alpha", 8, "--lora-targets", r"\.(q|down)_proj$") == 0
    base, tuned = (flat_params(glm_jax.load(p).state) for p in (hf, tmp_path / "out"))
    config = json.loads((tmp_path / "out" / "adapters" / "adapter_config.json").read_text())
    assert config["rank"] == 2 and config["scale"] == 4.0
    adapters = unnest(ocp.load(tmp_path / "out" / "adapters" / PARAMS_DIR))
    targets = sorted(n for n in base if n.endswith(("attn.q_proj", "mlp.down_proj")))
    assert sorted(adapters) == sorted(f"{n}.lora_{x}" for n in targets for x in "ab")
    changed = sorted(n for n in base if not np.array_equal(np.asarray(base[n]), np.asarray(tuned[n])))
    assert changed == targets
    for n in targets:
        a, b = np.asarray(adapters[f"{n}.lora_a"]), np.asarray(adapters[f"{n}.lora_b"])
        assert np.abs(b).max() > 0                                   # B left zero: it trained
        want = np.asarray(base[n]) + 4.0 * np.tensordot(b, a, axes=([-1], [0]))
        np.testing.assert_allclose(np.asarray(tuned[n]), want, rtol=1e-5, atol=1e-6)
    assert main(["finetune", "--model", str(hf), "--data", str(data), "--out", str(tmp_path / "out"), "--seq-len",
                 str(SEQ), "--steps", "4", "--resume", "--lora-rank", "4", "--quiet", "--compile-cache", "off"]) == 2


def test_lora_on_a_quantized_base_merges_into_a_float_model(tmp_path, hf):
    """--quantize int8 --lora-rank: the base is frozen in int8, the adapters train; OUT is a float model
    whose adapted weights are the dequantized base + scale x B A, the others the dequantized base."""
    from orbax.checkpoint import v1 as ocp

    from glm_jax.params import PARAMS_DIR, flat_params, unnest
    from glm_jax.quantize import Quantized, dequantize

    data = write_jsonl(tmp_path / "data.jsonl", id_rows(4, seed=2))
    assert finetune("--model", hf, "--data", data, "--out", tmp_path / "out", "--steps", 2, "--lr", 5e-2,
                    "--lora-rank", 2, "--lora-alpha", 8, "--lora-targets", r"\.q_proj$", "--quantize", "int8") == 0
    base = flat_params(glm_jax.load(hf, quantize="int8").state)
    tuned = flat_params(glm_jax.load(tmp_path / "out").state)
    assert not any(isinstance(w, Quantized) for w in tuned.values())
    adapters = unnest(ocp.load(tmp_path / "out" / "adapters" / PARAMS_DIR))
    for n, w in base.items():
        want = np.asarray(dequantize(w, np.float32)) if isinstance(w, Quantized) else np.asarray(w)
        if n.endswith("q_proj"):
            a, b = np.asarray(adapters[f"{n}.lora_a"]), np.asarray(adapters[f"{n}.lora_b"])
            assert np.abs(b).max() > 0
            want = want + 4.0 * np.tensordot(b, a, axes=([-1], [0]))
        np.testing.assert_allclose(np.asarray(tuned[n]), want, rtol=1e-5, atol=1e-6, err_msg=n)


@pytest.mark.parametrize("extra, message", [
    (("--lora-rank", 0), "--lora-rank must be positive, got 0"),
    (("--lora-alpha", 4), "--lora-alpha and --lora-targets need --lora-rank"),
    (("--lora-rank", 2, "--lora-targets", "embed"), "--lora-targets 'embed' matches no projection weight"),
    (("--quantize", "int8"), "--quantize needs --lora-rank: a quantized base trains only frozen, under LoRA adapters"),
])
def test_bad_lora_setups(tmp_path, hf, capsys, extra, message):
    data = write_jsonl(tmp_path / "data.jsonl", id_rows(2))
    assert finetune("--model", hf, "--data", data, "--out", tmp_path / "out", *extra) == 2
    assert capsys.readouterr().err.strip() == f"glm-jax finetune: error: {message}"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("source", ["hf", "converted"])
def test_export_of_a_tuned_model_keeps_the_source_layout(tmp_path, hf, source):
    """A model tuned from a transformers-native folder (directly or converted) exports, with no --layout,
    as that folder again: the `glm` layout transformers loads, the same shard names, its other files."""
    src = tmp_path / "src"
    shutil.copytree(hf, src)
    (src / "README.md").write_text("# model card\n")
    if source == "converted":
        assert main(["convert", str(src), str(tmp_path / "m"), "--quiet"]) == 0
    data = write_jsonl(tmp_path / "data.jsonl", id_rows(2))
    assert finetune("--model", src if source == "hf" else tmp_path / "m", "--data", data, "--out", tmp_path / "out",
                    "--steps", 1, "--lr", 0.1) == 0
    assert main(["export", str(tmp_path / "out"), str(tmp_path / "hf-out"), "--quiet"]) == 0
    assert json.loads((tmp_path / "hf-out" / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    assert sorted(p.name for p in (tmp_path / "hf-out").iterdir()) == sorted(p.name for p in src.iterdir())
    trained = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf-out")
    assert isinstance(trained, transformers.GlmForCausalLM)
    base = dict(transformers.GlmForCausalLM.from_pretrained(src).named_parameters())
    assert any(not torch.equal(p, base[n]) for n, p in trained.named_parameters())    # the tuned weights


# -- the first hour (#27) ---------------------------------------------------------------------------

def cli(*args, cwd=None):
    """`glm-jax` in a subprocess: what a user sees on stdout and stderr, and the exit status."""
    return subprocess.run([sys.executable, "-m", "glm_jax.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def test_warmup_first_step_trains(tmp_path, hf):
    """Step k of W warmup steps runs at k/W x the peak: with --warmup-steps 1 the one step runs at the
    peak (it ran at 0 and left the weights as they were)."""
    data = write_jsonl(tmp_path / "data.jsonl", id_rows(2))
    assert finetune("--model", hf, "--data", data, "--out", tmp_path / "out", "--steps", 1, "--optimizer", "sgd",
                    "--lr", 0.5, "--schedule", "constant", "--warmup-steps", 1, "--clip-norm", 0) == 0
    metrics = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["lr"] == 0.5
    from glm_jax.params import flat_params

    base, tuned = (flat_params(glm_jax.load(p).state) for p in (hf, tmp_path / "out"))
    assert any(not np.array_equal(np.asarray(base[n]), np.asarray(tuned[n])) for n in base)


def test_resume_of_a_finished_run_and_of_more_steps(tmp_path, hf, capsys):
    """--resume with nothing left to train says so and exits 0, touching nothing; fewer --steps than the
    checkpoint's is refused; more --steps trains on with the schedule recomputed for them, announced."""
    data = write_jsonl(tmp_path / "data.jsonl", id_rows(4))
    args = ("--model", hf, "--data", data, "--out", tmp_path / "out", "--lr", 1e-2)
    assert finetune(*args, "--steps", 2) == 0
    capsys.readouterr()
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*")}

    done = cli("finetune", *args, "--steps", 2, "--resume", "--seq-len", SEQ, "--quiet", "--compile-cache", "off")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{tmp_path / 'out'} already finished its 2 steps; raise --steps to train more\n"
    assert done.stderr == ""
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*")} == before

    assert finetune(*args, "--steps", 1, "--resume") == 2
    assert "has trained 2 steps, more than --steps 1" in capsys.readouterr().err

    assert finetune(*args, "--steps", 3, "--resume") == 0
    out, err = capsys.readouterr()
    from glm_jax.train.run import FinetuneConfig, optimizer_config
    from glm_jax.train.step import schedule

    lr3 = float(schedule(optimizer_config(FinetuneConfig(hf, data, tmp_path, steps=3, learning_rate=1e-2)))(2))
    assert err == (f"glm-jax finetune: resuming after step 2 with a new learning-rate schedule (steps 2 -> 3): "
                   f"step 3 runs at lr {lr3:.3g} (the checkpoint's schedule: 0.001)\n")
    assert "trained steps 3-3" in out
    metrics = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3] and metrics[2]["lr"] == pytest.approx(lr3)


def test_compile_cache_typo_is_refused(tmp_path, hf):
    """`--compile-cache of` (meaning off) is refused in one line, no folder ./of made; a path is taken."""
    data = write_jsonl(tmp_path / "data.jsonl", id_rows(2))
    run = cli("finetune", "--model", hf, "--data", data, "--out", tmp_path / "out", "--steps", 1, "--seq-len", SEQ,
              "--quiet", "--compile-cache", "of", cwd=tmp_path)
    assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr
    assert run.stderr.startswith("glm-jax finetune: error: --compile-cache 'of': no such folder")
    assert not (tmp_path / "of").exists() and not (tmp_path / "out").exists()
    from glm_jax.runtime import compile_cache_dir

    assert compile_cache_dir("./of") == pathlib.Path("of") and compile_cache_dir("off") is None
    assert compile_cache_dir(str(tmp_path)) == tmp_path
    with pytest.raises(ValueError, match="not a folder"):
        compile_cache_dir(str(data))
