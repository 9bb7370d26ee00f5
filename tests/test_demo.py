"""scripts/demo.sh, the README's first command, run whole: every step succeeds and the last one shows
the fine-tuned random model answering the two questions it was trained on."""

import os
import pathlib
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_runs_and_its_fine_tune_teaches_the_answers(tmp_path):
    env = {**os.environ, "DEMO_DIR": str(tmp_path)}
    run = subprocess.run(["bash", "scripts/demo.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    answers = [line for line in run.stdout.splitlines() if "before: [" in line]
    assert len(answers) == 2, run.stdout[-2000:]
    assert answers[0].split("after: [")[1].strip() == "4 ]", answers
    assert answers[1].split("after: [")[1].strip() == "Blue. ]", answers
