"""The `glm-jax` command: defaults shared with `model.generate`, start-up, compilation cache, bad configs."""

import json
import os
import shutil
import subprocess
import sys

import pytest

import glm_jax
from glm_jax.cli import main
from glm_jax.config import PRESETS
from glm_jax.runtime import compile_cache_dir, default_platforms


@pytest.fixture(scope="module")
def greedy(tiny_chat_model):  # noqa: F811
    return glm_jax.load(tiny_chat_model).generate(["hi"], max_new_tokens=8, temperature=0, stop_ids=())[0]


@pytest.mark.parametrize("generation", [
    {"do_sample": False},                                   # transformers' switch for greedy search
    {"do_sample": True, "temperature": 1.5, "top_k": 1},    # sampling from one candidate
])
def test_generation_config_is_the_default_of_generate_and_cli(tiny_chat_model, greedy, tmp_path, capsys,  # noqa: F811
                                                              generation):
    folder = tmp_path / "model"
    shutil.copytree(tiny_chat_model, folder)
    stops = [greedy[3], 7]                                  # a custom eos list, one of them produced
    want = greedy[:min(i for i, t in enumerate(greedy) if t in stops) + 1]
    (folder / "generation_config.json").write_text(json.dumps({**generation, "eos_token_id": stops}))
    assert glm_jax.load(folder).generate(["hi"], max_new_tokens=8)[0] == want
    assert main(["generate", "--model", str(folder), "--prompt", "hi", "--max-new-tokens", "8", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["ids"] == want and result["stopped"] and result["stop_ids"] == stops


def _glm_jax_generate(model, cache):
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}   # as a user starts it
    env["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"   # an installed libtpu, if started, talks even while another process holds it
    return subprocess.run([sys.executable, "-m", "glm_jax.cli", "generate", "--model", str(model), "--prompt", "hi",
                           "--max-new-tokens", "4", "--temperature", "0", "--json", "--compile-cache", str(cache)],
                          env=env, capture_output=True, text=True, timeout=300)


def test_second_run_compiles_nothing_and_start_up_is_quiet(tiny_chat_model, tmp_path):  # noqa: F811
    cache = tmp_path / "cache"
    first = _glm_jax_generate(tiny_chat_model, cache)
    assert first.returncode == 0 and first.stderr == ""    # no accelerator start-up messages
    entries = sorted(p.name for p in cache.iterdir())
    assert any(name.startswith("jit_decode_burst") for name in entries)
    second = _glm_jax_generate(tiny_chat_model, cache)
    assert second.returncode == 0 and second.stderr == ""
    assert sorted(p.name for p in cache.iterdir()) == entries   # every program came from the cache
    assert json.loads(second.stdout)["ids"] == json.loads(first.stdout)["ids"]


@pytest.mark.parametrize("nodes, platforms", [
    ((), "cpu"),                       # no accelerator: JAX must not start an installed libtpu
    (("accel0",), None), (("vfio",), None), (("nvidiactl", "nvidia0"), None), (("kfd",), None),
])
def test_default_platforms(tmp_path, nodes, platforms):
    for node in nodes:
        (tmp_path / node).touch()
    assert default_platforms(tmp_path) == platforms


def test_compile_cache_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("GLM_JAX_COMPILE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_cache_dir(None) == tmp_path / "glm-jax" / "jax"
    monkeypatch.setenv("GLM_JAX_COMPILE_CACHE", str(tmp_path / "env"))
    assert compile_cache_dir(None) == tmp_path / "env"
    assert compile_cache_dir(str(tmp_path / "flag")) == tmp_path / "flag"
    assert compile_cache_dir("off") is None


@pytest.mark.parametrize("source, key, command", [
    ("chatglm-f32", "num_attention_heads", "generate"),
    ("glm-hf-f32", "num_attention_heads", "convert"),
    ("glm-hf-f32", "vocab_size", "generate"),
    (None, "hidden_size", "generate"),                       # a converted (glm_jax) folder
])
def test_config_missing_a_key(reference, tmp_path, capsys, source, key, command):
    folder = tmp_path / "model"
    folder.mkdir()
    config = json.loads((reference / "fixtures" / source / "config.json").read_text()) if source else \
        PRESETS["glm-4-9b"].to_dict()
    del config[key]
    (folder / "config.json").write_text(json.dumps(config))
    args = ["--model", str(folder), "--prompt", "x"] if command == "generate" else [str(folder), str(tmp_path / "out")]
    assert main([command, *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing key" in err and repr(key) in err


def test_help_imports_no_jax():
    """`glm-jax --help` (and every command's) answers without starting JAX."""
    code = ("import sys\nfrom glm_jax.cli import build_parser\nbuild_parser()\n"
            "assert not {'jax', 'flax', 'numpy'} & set(sys.modules), sorted(m for m in sys.modules if 'jax' in m)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stderr == ""


def test_library_start_up_is_quiet_without_an_accelerator(tiny_chat_model):  # noqa: F811
    """`glm_jax.load` makes the command line's platform choice: no libtpu errors off a TPU."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}   # as a user starts it
    env["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"   # an installed libtpu, if started, talks even while another process holds it
    code = f"import glm_jax\nprint(glm_jax.load({str(tiny_chat_model)!r}).logits([[1, 2]]).shape)"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert (run.returncode, run.stdout, run.stderr) == (0, "(1, 2, 151552)\n", "")


def test_library_keeps_a_started_backend():
    """...but not once JAX's backends have started."""
    import jax

    from glm_jax.runtime import select_platforms

    jax.devices()
    before = jax.config.jax_platforms
    jax.config.update("jax_platforms", None)
    try:
        select_platforms()
        assert jax.config.jax_platforms is None
    finally:
        jax.config.update("jax_platforms", before)


def test_serve_extra_missing_says_how_to_install_it(tiny_chat_model, monkeypatch, capsys):  # noqa: F811
    import glm_jax.serve

    monkeypatch.setitem(sys.modules, "glm_jax.serve.server", None)   # as if uvicorn were missing
    monkeypatch.delattr(glm_jax.serve, "server", raising=False)
    assert main(["serve", "--model", str(tiny_chat_model)]) == 2
    err = capsys.readouterr().err
    root = os.path.dirname(os.path.dirname(os.path.abspath(glm_jax.__file__)))
    assert err.count("\n") == 1 and err.startswith("glm-jax serve: error: needs the serve extra (")
    assert err.endswith(f"install it with: {sys.executable} -m pip install -e '{root}[serve]'\n")


def _chat(model, lines, *flags):
    return subprocess.run([sys.executable, "-m", "glm_jax.cli", "chat", "--model", str(model), "--max-new-tokens", "8",
                           "--temperature", "0", *flags], input="".join(f"{line}\n" for line in lines),
                          capture_output=True, text=True, timeout=300)


TURNS = ["hello there how are you", "and another message that is long enough", "third message here please", "fourth",
         "fifth"]


def test_chat_refuses_a_turn_past_max_model_len_and_keeps_the_conversation(tiny_chat_model):  # noqa: F811
    run = _chat(tiny_chat_model, [*TURNS, "word " * 80, "/reset", "hi"], "--max-model-len", "64")
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("assistant> ") == 5                     # the first four and "hi" after /reset
    refused = [line for line in run.stderr.splitlines() if "not sent" in line]
    assert len(refused) == 2 and "the conversation takes" in refused[0] and "this message" not in refused[0]
    assert "--max-model-len is 64 (the conversation is kept" in refused[0]
    assert "glm-jax chat: the reply stopped at --max-model-len 64" in run.stderr   # the fourth reply filled it


def test_chat_truncate_history_drops_the_oldest_turns(tiny_chat_model):  # noqa: F811
    run = _chat(tiny_chat_model, [*TURNS, "sixth", "word " * 80], "--max-model-len", "64", "--truncate-history")
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("assistant> ") == 6
    assert run.stderr.count("glm-jax chat: dropped the 1 oldest turn to fit --max-model-len 64\n") == 2
    assert "glm-jax chat: not sent: this message takes" in run.stderr    # alone too long: still refused


def test_chat_max_model_len_above_the_context_is_refused(tiny_chat_model):  # noqa: F811
    run = _chat(tiny_chat_model, ["hi"], "--max-model-len", "2000000")
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr == ("glm-jax chat: error: --max-model-len must be in 1-1048576 (the model's context length), "
                          "got 2000000\n")
