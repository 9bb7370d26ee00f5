"""scripts/bench_finetune.py: --quick writes a loadable model folder and a sane JSON summary (it does not
check that the model learned: that is the full run's business); bad input is one line and exit 2."""

import importlib.util
import json
import math
import re
import shlex

import pytest

from conftest import ROOT

spec = importlib.util.spec_from_file_location("bench_finetune", ROOT / "scripts" / "bench_finetune.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


@pytest.mark.slow
def test_quick_run_writes_model_and_summary(tmp_path, capsys):
    import glm_jax

    out, results = tmp_path / "needle-tiny", tmp_path / "results.json"
    assert bench.main(["--quick", "--out", str(out), "--results", str(results)]) == 0
    printed = capsys.readouterr().out
    assert "step     1  loss" in printed and "held-out accuracy" in printed

    r = json.loads(results.read_text())
    assert r["command"].startswith("python scripts/bench_finetune.py --quick")
    assert r["args"]["quick"] is True and r["args"]["seed"] == 0
    curve = r["train"]["loss_curve"]
    assert [s for s, _ in curve] == list(range(1, bench.QUICK["steps"] + 1))
    # a random model over 151,552 tokens starts near ln(151552) = 11.93 on the answer tokens
    assert all(math.isfinite(loss) and 0 < loss < 20 for _, loss in curve)
    assert abs(curve[0][1] - math.log(151552)) < 1.0
    assert r["data"]["examples"] == bench.QUICK["train_examples"]
    assert r["data"]["prompt_tokens_max"] <= bench.QUICK["max_len"]
    ev = r["eval"]
    assert ev["cases"] == len(ev["rows"]) == bench.QUICK["eval_cases"]
    assert 0 <= ev["accuracy"] <= 1 and ev["correct"] == sum(row["correct"] for row in ev["rows"])
    assert all(len(str(row["number"])) == 7 and row["prompt_tokens"] <= bench.QUICK["max_len"] for row in ev["rows"])
    assert r["seconds"] > 0 and r["out"] == str(out)

    # the trained folder is a glm-jax model folder with the tokenizer, as `glm-jax needle` needs
    for name in ("config.json", "params", "tokenizer.model", "generation_config.json", "metrics.jsonl"):
        assert (out / name).exists(), name
    config = json.loads((out / "config.json").read_text())
    assert config["num_layers"] == bench.QUICK["layers"] and config["hidden_size"] == bench.QUICK["hidden"]
    model = glm_jax.load(out)
    assert model.tokenizer is not None
    assert len(model.generate(["The special magic Paris number is"], max_new_tokens=2, temperature=0)[0]) <= 2

    # the README's try-it commands: its quick run is this one, its `glm-jax needle` grid runs on the folder
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n([^`]*bench_finetune\.py --quick[^`]*)```", readme).group(1)
    make, grid = (shlex.split(c) for c in block.replace("\\\n", " ").strip().splitlines())
    assert make[1:5] == ["scripts/bench_finetune.py", "--quick", "--out", make[make.index("--out") + 1]]
    assert grid[:2] == ["glm-jax", "needle"] and grid[grid.index("--model") + 1] == make[make.index("--out") + 1]
    grid[grid.index("--model") + 1], grid[grid.index("--out") + 1] = str(out), str(tmp_path / "needle-run")
    from glm_jax.cli import main

    assert main([*grid[1:], "--quiet", "--compile-cache", "off"]) == 0
    summary = json.loads((tmp_path / "needle-run" / "summary.json").read_text())
    assert summary["complete"] and (tmp_path / "needle-run" / "heatmap.png").is_file()

    # an existing OUT is refused without --force (nothing touched), replaced with it
    before = sorted(p.name for p in out.iterdir())
    assert bench.main(["--quick", "--out", str(out), "--results", str(results)]) == 2
    assert sorted(p.name for p in out.iterdir()) == before


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps must be at least 1"),
    (["--lr", "-1"], "--lr must be a positive number"),
    (["--lr", "nan"], "--lr must be a positive number"),
    (["--hidden", "60"], "--hidden must be a positive multiple of 8"),
    (["--min-len", "300", "--max-len", "200"], "--max-len 200 is below --min-len 300"),
    (["--min-len", "10"], "--min-len must be at least 48"),
    (["--max-len", "1024", "--seq-len", "1024"], "--seq-len 1024 must be at least --max-len + 16"),
    (["--warmup-steps", "5000"], "--warmup-steps must be in"),
    (["--eval-cases", "0"], "--eval-cases must be at least 1"),
    (["--ruler-share", "1"], "--ruler-share must be in [0, 1)"),
    (["--ruler-tasks", "niah_single_1,vt"], "--ruler-tasks must be of niah_single_1"),
    (["--ruler-share", "0.5", "--ruler-max-len", "500"], "RULER lengths 224..500 must lie in 200..--seq-len - 48"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, message):
    assert bench.main([*argv, "--out", str(tmp_path / "out"), "--results", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bench_finetune: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists() and not (tmp_path / "r.json").exists()


def test_non_empty_out_is_refused(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert bench.main(["--quick", "--out", str(tmp_path / "out"), "--results", str(tmp_path / "r.json")]) == 2
    assert "--force replaces it" in capsys.readouterr().err
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"



def test_ruler_examples_are_the_evaluations_prompts_with_other_seeds(tmp_path):
    """--ruler-share's examples: `glm-jax ruler`'s own prompts (seed RULER_SEED, never its default 0),
    every needle task in turn, within the lengths; finetune counts exactly the answer after them."""
    from glm_jax.evals import needle as N
    from glm_jax.evals.ruler import Inputs, make_sample
    from glm_jax.evals.ruler.niah import NOISE, essay_words
    from glm_jax.tokenizer import Tokenizer

    tok = Tokenizer.from_file(ROOT / "tests" / "data" / "tokenizer.model")
    examples = bench.ruler_examples(tok, 16, 224, 384, seed=0)
    inputs = Inputs(essay_words(NOISE))
    for i, (content, answer, ids) in enumerate(examples):
        task = bench.RULER_TASKS[i % len(bench.RULER_TASKS)]
        assert 200 < len(ids) <= 384
        evaluated = make_sample(tok, task, len(ids), i, inputs, seed=0, max_new_tokens=0)
        assert evaluated.ids != ids                                          # held out: another seed
        numbers = [a for a in answer.replace(",", " ").rstrip(".").split() if a[0].isdigit() or "-" in a]
        assert numbers and all(n in content for n in numbers)               # every value is in the prompt
        assert answer.startswith("The special magic ")
    data = tmp_path / "train.jsonl"
    lengths = bench.write_data(data, tok, None, [], examples)
    assert lengths == [len(ids) for _, _, ids in examples]
    for i, (content, _, ids) in enumerate(examples):
        bench.check_data(data, tok, ids, 512, i, len(N.prompt_ids(tok, content)))
    with pytest.raises(AssertionError):     # a prompt that is not the one trained on
        bench.check_data(data, tok, examples[1][2], 512, 0, len(N.prompt_ids(tok, examples[0][0])))


def test_a_ruler_length_a_template_does_not_fit_is_one_line(tmp_path, capsys, monkeypatch):
    def too_short(*args, **kwargs):
        raise ValueError("niah_multiquery at length 200: the template, question and answer prefix alone take 210 tokens")

    monkeypatch.setattr(bench, "ruler_examples", too_short)
    argv = ["--quick", "--seq-len", "512", "--ruler-share", "0.5", "--out", str(tmp_path / "out"),
            "--results", str(tmp_path / "r.json")]
    assert bench.main(argv) == 2
    err = capsys.readouterr().err
    assert err == "bench_finetune: error: niah_multiquery at length 200: the template, question and answer prefix " \
                  "alone take 210 tokens\n"
    assert not (tmp_path / "out").exists() and not (tmp_path / "r.json").exists()
