import json
import subprocess
import sys

import pytest

from glm_jax.cli import main

pytest.importorskip("transformers")


def test_parity_report_on_the_chatglm_fixture(reference, capsys):
    assert main(["parity", str(reference / "fixtures" / "chatglm-f32"), "--seq-len", "19"]) == 0
    out = capsys.readouterr().out
    assert "GlmForCausalLM on the weights mapped from the chatglm layout" in out
    assert "layer 1 (+norm)" in out and "top-1 agreement: 100.00%" in out and "PASS" in out


def test_parity_json_and_failing_tolerance(reference, capsys):
    assert main(["parity", str(reference / "fixtures" / "glm-hf-f32"), "--json", "--batch", "1",
                 "--seq-len", "11", "--tolerance", "1e-9"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and 0 < report["logits_rel"] < 1e-5 and report["top1"] == 1.0
    assert [row["name"] for row in report["layers"]] == ["embedding", "layer 0", "layer 1 (+norm)"]


def test_parity_json_is_json_only(reference):
    """--json: stdout is the report, parseable; no progress bar on stderr (transformers' weight loading)."""
    run = subprocess.run([sys.executable, "-m", "glm_jax.cli", "parity", str(reference / "fixtures" / "glm-hf-f32"),
                          "--json", "--batch", "1", "--seq-len", "8"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["ok"] is True
    assert "\r" not in run.stderr and "it/s" not in run.stderr, run.stderr


def test_parity_bfloat16_reports_rounding_noise(reference, capsys):
    assert main(["parity", str(reference / "fixtures" / "chatglm-bf16"), "--dtype", "bfloat16", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    noise = report["fp32_reference"]
    assert report["logits_rel"] < 5e-2 and noise["jax_rel"] < 1.2 * noise["torch_rel"]


def test_parity_grad_reports_loss_and_every_gradient(reference, capsys):
    """--grad: glm-jax's train-step gradients against PyTorch's backward, every tensor named as the
    reference names it; float32 within 1e-4."""
    assert main(["parity", str(reference / "fixtures" / "glm-hf-f32"), "--json", "--seq-len", "23", "--grad"]) == 0
    report = json.loads(capsys.readouterr().out)
    g = report["grad"]
    assert report["ok"] and g["loss_rel"] < 1e-6 and 0 < g["max_rel"] < 1e-4
    names = [row["name"] for row in g["params"]]
    assert "lm_head.weight" in names and "model.layers.1.mlp.gate_up_proj.weight" in names
    assert "model.embed_tokens.weight" in names and len(names) == len(set(names))
