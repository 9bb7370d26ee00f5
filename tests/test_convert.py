"""HF -> glm-jax -> HF round trips, and every bad input the converter must refuse cleanly."""

import filecmp
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.flax import save_file

from glm_jax.cli import main

FIXTURES = ("chatglm-f32", "glm-hf-f32", "chatglm-bf16")


@pytest.mark.parametrize("name", FIXTURES)
def test_round_trip_is_bit_exact(reference, tmp_path, name):
    src = reference / "fixtures" / name
    assert main(["convert", str(src), str(tmp_path / "model"), "--quiet"]) == 0
    assert main(["export", str(tmp_path / "model"), str(tmp_path / "hf"), "--quiet"]) == 0
    weights = sorted(p.name for p in src.iterdir() if p.suffix == ".safetensors")
    assert weights == sorted(p.name for p in (tmp_path / "hf").iterdir() if p.suffix == ".safetensors")
    for file in weights:
        assert filecmp.cmp(src / file, tmp_path / "hf" / file, shallow=False), file
    if (src / "model.safetensors.index.json").is_file():
        assert json.loads((src / "model.safetensors.index.json").read_text()) == \
            json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert json.loads((src / "config.json").read_text()) == json.loads((tmp_path / "hf" / "config.json").read_text())


def test_converted_folder_contents(reference, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(reference / "fixtures" / "chatglm-bf16", src)
    for name in ("tokenizer_config.json", "generation_config.json"):
        shutil.copy(reference / "models" / "glm-4-9b-chat-1m" / name, src / name)
    shutil.copy(reference / "tokenizer.model", src / "tokenizer.model")
    assert main(["convert", str(src), str(tmp_path / "m"), "--dtype", "float32", "--quiet"]) == 0
    out = tmp_path / "m"
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    for name in ("tokenizer.model", "tokenizer_config.json", "generation_config.json"):
        assert filecmp.cmp(src / name, out / name, shallow=False)
    assert (out / "params").is_dir() and not list(tmp_path.glob(".m.*"))


def test_export_of_a_quantized_folder_is_dequantized(reference, tmp_path):
    """`export` of a `convert --quantize` folder writes the float weights it stands for (the source's
    layout and dtype): the HF folder's logits are the quantized model's."""
    import glm_jax

    src = reference / "fixtures" / "chatglm-f32"
    assert main(["convert", str(src), str(tmp_path / "q"), "--quantize", "int4:32", "--quiet"]) == 0
    assert main(["export", str(tmp_path / "q"), str(tmp_path / "hf"), "--quiet"]) == 0
    ids = np.load(src / "reference.npz")["input_ids"]
    np.testing.assert_allclose(glm_jax.load(tmp_path / "hf").logits(ids), glm_jax.load(tmp_path / "q").logits(ids),
                               rtol=1e-5, atol=1e-5)
    weights = sorted(p.name for p in src.iterdir() if p.suffix == ".safetensors")
    assert weights == sorted(p.name for p in (tmp_path / "hf").iterdir() if p.suffix == ".safetensors")


# -- bad input ------------------------------------------------------------------------------------

def _rewrite(path, change):
    with safe_open(path, framework="flax") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    change(tensors)
    save_file(tensors, str(path), metadata=meta)


def _drop(name):
    return lambda t: t.pop(name)


def _add(t):
    t["transformer.encoder.layers.9.mlp.extra.weight"] = t["transformer.encoder.final_layernorm.weight"]


def _reshape(t):
    name = "transformer.encoder.layers.1.mlp.dense_4h_to_h.weight"
    t[name] = t[name][:, :-1]


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])


def _garble(path):
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + path.read_bytes()[24:])


def _config(**changes):
    def apply(folder):
        cfg = json.loads((folder / "config.json").read_text())
        cfg.update(changes)
        (folder / "config.json").write_text(json.dumps(cfg))
    return apply


BF16 = "chatglm-bf16"
SINGLE = "model.safetensors"
CASES = {
    "missing tensor": (BF16, lambda d: _rewrite(d / SINGLE, _drop("transformer.output_layer.weight")),
                       "missing tensor transformer.output_layer.weight"),
    "unexpected tensor": (BF16, lambda d: _rewrite(d / SINGLE, _add),
                          "unexpected tensor transformer.encoder.layers.9.mlp.extra.weight"),
    "wrong shape": (BF16, lambda d: _rewrite(d / SINGLE, _reshape),
                    r"dense_4h_to_h.weight: shape \[128, 255\] in the weights contradicts config.json"),
    "truncated file": (BF16, lambda d: _truncate(d / SINGLE), "truncated safetensors file"),
    "corrupt file": (BF16, lambda d: _garble(d / SINGLE), "corrupt safetensors file"),
    "index names missing file": ("chatglm-f32", lambda d: (d / "model-00002-of-00002.safetensors").unlink(),
                                 "names missing file model-00002-of-00002.safetensors"),
    "config contradicts weights": (BF16, _config(num_attention_heads=8), "contradicts config.json"),
    "unknown model_type": (BF16, _config(model_type="llama"), "unknown model_type 'llama'"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input(reference, tmp_path, capsys, case):
    fixture, damage, message = CASES[case]
    src = tmp_path / "src"
    shutil.copytree(reference / "fixtures" / fixture, src)
    damage(src)
    dst = tmp_path / "dst"
    assert main(["convert", str(src), str(dst), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("glm-jax convert: error: ")
    assert __import__("re").search(message, err), err
    assert not dst.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_existing_destination_needs_force(reference, tmp_path, capsys):
    src, dst = reference / "fixtures" / "glm-hf-f32", tmp_path / "dst"
    dst.mkdir()
    (dst / "keep").write_text("x")
    assert main(["convert", str(src), str(dst), "--quiet"]) == 2
    assert "already exists (use --force" in capsys.readouterr().err
    assert (dst / "keep").is_file()
    assert main(["convert", str(src), str(dst), "--quiet", "--force"]) == 0
    assert not (dst / "keep").exists() and (dst / "params").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]


def test_failure_mid_conversion_leaves_nothing(reference, tmp_path, monkeypatch):
    """A read that fails after writing has begun (the last tensor) keeps the old DST and leaves no temp."""
    from glm_jax.convert.hf import ConversionError, HFCheckpoint

    read = HFCheckpoint.read

    def failing_read(self, name, *rows):
        if name == "transformer.output_layer.weight":
            raise ConversionError(f"cannot read {name} (simulated I/O error)")
        return read(self, name, *rows)

    monkeypatch.setattr(HFCheckpoint, "read", failing_read)
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "old").write_text("previous model")
    assert main(["convert", str(reference / "fixtures" / "chatglm-bf16"), str(tmp_path / "dst"), "--quiet",
                 "--force"]) == 2
    assert (tmp_path / "dst" / "old").read_text() == "previous model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]


def test_export_gives_back_the_sources_other_files(reference, tmp_path):
    """Remote code, README and licence travel through convert -> export; other weight formats,
    hidden files and subfolders stay behind."""
    src = tmp_path / "src"
    shutil.copytree(reference / "fixtures" / "chatglm-bf16", src)
    carried = {"modeling_chatglm.py": "class ChatGLMForConditionalGeneration: ...\n",
               "configuration_chatglm.py": "class ChatGLMConfig: ...\n", "README.md": "# the model card\n",
               "LICENSE": "licence text\n", "tokenizer_config.json": "{}\n"}
    for name, text in {**carried, "pytorch_model.bin": "weights", ".gitattributes": "*.bin lfs"}.items():
        (src / name).write_text(text)
    (src / "original").mkdir()
    (src / "original" / "notes.txt").write_text("x")
    assert main(["convert", str(src), str(tmp_path / "m"), "--quiet"]) == 0
    assert main(["export", str(tmp_path / "m"), str(tmp_path / "hf"), "--quiet"]) == 0
    fixture = [p.name for p in (reference / "fixtures" / "chatglm-bf16").iterdir()]   # config, weights, npz
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == sorted({*carried, *fixture})
    for name in carried:
        assert filecmp.cmp(src / name, tmp_path / "hf" / name, shallow=False), name


# -- interrupts -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def large(tmp_path_factory):
    """A random `glm`-layout folder of 190 MB (float32, 4 shards): converting it takes seconds."""
    from glm_jax.config import GLMConfig
    from glm_jax.convert.hf import default_shards, write_hf
    from glm_jax.convert.layout import GLM, hf_tensors

    config = GLMConfig(vocab_size=300, hidden_size=512, intermediate_size=1536, num_layers=16, num_heads=8,
                       num_kv_heads=2, head_dim=64, max_seq_len=8192, dtype="float32")
    rng, path = np.random.default_rng(0), tmp_path_factory.mktemp("large")
    write_hf(path, config, GLM, lambda t: rng.standard_normal(t.shape, np.float32),
             default_shards(hf_tensors(config, GLM), 4, 4))
    return path


@pytest.fixture(scope="module")
def large_converted(large, tmp_path_factory):
    path = tmp_path_factory.mktemp("large-converted") / "model"
    assert main(["convert", str(large), str(path), "--quiet"]) == 0
    return path


@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
@pytest.mark.parametrize("command", ["convert", "export"])
def test_interrupted_command_removes_its_temporary_folder(request, tmp_path, command, sig, status):
    """Signalled while it writes (convert: Orbax's saves; export: Orbax's reads), a command exits with
    one line and leaves nothing behind."""
    src = request.getfixturevalue("large" if command == "convert" else "large_converted")
    proc = subprocess.Popen([sys.executable, "-m", "glm_jax.cli", command, str(src), str(tmp_path / "dst"), "--quiet"],
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".dst.tmp-*/params*" if command == "convert" else ".dst.tmp-*/*.safetensors")):
        assert proc.poll() is None and time.monotonic() < deadline          # writing has begun
        time.sleep(0.01)
    proc.send_signal(sig)
    err = proc.communicate(timeout=120)[1]
    assert err.strip() == f"glm-jax {command}: interrupted ({sig.name}); the unfinished output was removed"
    assert proc.returncode == status
    assert list(tmp_path.iterdir()) == []


def test_the_next_run_removes_what_a_killed_run_left(reference, tmp_path, capsys):
    """A killed run's .DST.tmp-PID goes (one line says so); a live process's stays; a previous DST that
    a killed --force run had moved aside (.DST.old-PID) comes back."""
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    stale, live = tmp_path / f".dst.tmp-{dead.pid}", tmp_path / f".dst.tmp-{os.getppid()}"
    for folder in (stale / "params", live):
        folder.mkdir(parents=True)
    src = reference / "fixtures" / "glm-hf-f32"
    assert main(["convert", str(src), str(tmp_path / "dst"), "--quiet"]) == 0
    assert capsys.readouterr().err.strip() == f"removed {stale}, left by an interrupted run"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["dst", live.name])

    (tmp_path / "dst").rename(tmp_path / f".dst.old-{dead.pid}")
    assert main(["convert", str(src), str(tmp_path / "dst"), "--quiet"]) == 2
    assert capsys.readouterr().err.splitlines()[0] == f"restored {tmp_path / 'dst'} from .dst.old-{dead.pid}, " \
                                                      "left by an interrupted run"
    assert (tmp_path / "dst" / "params").is_dir() and sorted(p.name for p in tmp_path.iterdir()) == \
        sorted(["dst", live.name])
