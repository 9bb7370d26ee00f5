"""glm-jax ruler: RULER's task generators (with the real tokenizer), its scoring, the summary's
averages, QA files, resume and bad arguments, and a batched run through the engine on a tiny model."""

import json
import pathlib
import re

import numpy as np
import pytest

from glm_jax.cli import main
from glm_jax.evals.ruler import aggregation, niah, plan, qa, results, scoring, tasks
from glm_jax.evals.ruler.build import assistant_start
from glm_jax.tokenizer import Tokenizer

LENGTH = 4096
ESSAY = " ".join(f"Essay sentence number {i} talks about {w} and other things." for i, w in
                 zip(range(3000), np.random.default_rng(0).choice(["rivers", "lamps", "boats", "cities"], 3000)))


@pytest.fixture(scope="module")
def tok(reference):
    return Tokenizer.from_file(reference / "tokenizer.model")


@pytest.fixture(scope="module")
def inputs():
    return plan.Inputs(essay=niah.essay_words(ESSAY))


@pytest.fixture(scope="module")
def built(tok, inputs):
    """Every synthetic task's sample 0 at 4,096 tokens: (sample, decoded prompt)."""
    out = {}
    for name in tasks.SYNTHETIC:
        s = plan.make_sample(tok, name, LENGTH, 0, inputs)
        out[name] = (s, tok.decode(s.ids))
    return out


def split(text: str) -> tuple[str, str]:
    """(the user turn's content, the assistant's opening) of a decoded prompt."""
    head, rest = text.split("<|user|>\n", 1)
    assert head == "[gMASK]<sop>"
    user, assistant = rest.split("<|assistant|>")
    return user, assistant


@pytest.mark.parametrize("name", tasks.SYNTHETIC)
def test_lengths_within_the_last_two_percent_leaving_the_generation_budget(built, name):
    s, _ = built[name]
    total = len(s.ids) + tasks.TASKS[name].tokens_to_generate
    assert 0.98 * LENGTH <= total <= LENGTH, (name, total)


@pytest.mark.parametrize("name", tasks.SYNTHETIC)
def test_answers_recoverable_and_prefix_opens_the_answer(built, name):
    s, text = built[name]
    user, assistant = split(text)
    assert assistant == assistant_start(s.rendered.prefix)
    for answer in s.rendered.answers:
        assert answer in user, (name, answer)
    assert not any(answer in assistant for answer in s.rendered.answers)


NIAH = [n for n in tasks.SYNTHETIC if tasks.TASKS[n].kind == "niah"]


NEEDLE = re.compile(r"One of the special magic \w+ for ([\w-]+) is: ([\w-]+)\.")


@pytest.mark.parametrize("name", NIAH)
def test_needles_sit_at_their_depths_and_answer_the_query(built, name):
    s, text = built[name]
    user, assistant = split(text)
    a = tasks.TASKS[name].args
    start = user.index("afterwards.\n") + len("afterwards.\n")
    context = user[start:user.rindex("\nWhat ")]
    found = list(NEEDLE.finditer(context))
    key_of = {m.group(2): m.group(1) for m in found}
    queried = {key_of[v] for v in s.rendered.answers}
    assert len(queried) == a["num_needle_q"] and all(k in assistant for k in queried)
    assert len(s.rendered.answers) == a["num_needle_q"] * a["num_needle_v"]
    assert sum(m.group(1) in queried for m in found) == len(s.rendered.answers)    # no distractor shares a key
    if a["type_haystack"] == "needle":      # every line a needle; the real ones where their depths say
        lines = context.split("\n")
        assert len(lines) > 40 and len(found) == len(lines)
        n = len(lines) - len(s.rendered.answers)         # the distractors
        for depth, answer in zip(s.rendered.depths, s.rendered.answers):
            index = next(i for i, line in enumerate(lines) if answer in line)
            assert 0 <= depth - 100 * index / n < 100 / n
    else:                                   # the needles alone, in depth order, where their depths say
        assert len(found) == a["num_needle_k"] * a["num_needle_v"] == len(s.rendered.depths)
        for depth, m in zip(s.rendered.depths, found):
            assert abs(100 * m.start() / len(context) - depth) < 3, (depth, m.start() / len(context))
        assert ("Essay sentence number" in context) == (a["type_haystack"] == "essay")


def test_single_value_template_is_singular_as_ruler_rewrites_it(built):
    _, text = built["niah_single_1"]
    assert text.split("<|user|>\n")[1].startswith("A special magic number is hidden within the following text.")
    assert "What is the special magic number for" in text
    assert text.endswith("mentioned in the provided text is")
    _, text = built["niah_multivalue"]
    assert "Some special magic numbers are hidden" in text and text.endswith("mentioned in the provided text are")
    _, text = built["niah_multikey_3"]
    assert "special magic uuid for" in text


def test_variable_tracking_chain_leads_from_the_value_to_every_answer(built):
    s, text = built["vt"]
    user, _ = split(text)
    main_part = user[user.rindex("Memorize and track"):]
    value = re.search(r"assigned the value (\d+) in the text above", main_part).group(1)
    assigned = dict(re.findall(r"VAR (\w+) = (VAR \w+|\d+)", main_part))
    holders, frontier = set(), {value}
    while frontier:
        new = {v for v, src in assigned.items() if src.removeprefix("VAR ") in frontier} - holders
        holders |= new
        frontier = new
    assert holders == set(s.rendered.answers) and len(holders) == 5
    assert user.count("Memorize and track") == 2        # RULER's solved example first
    assert len(s.rendered.depths) == 5 and s.rendered.depths == tuple(sorted(s.rendered.depths))


def test_common_words_repeat_thirty_times_and_the_rest_three(built):
    s, text = built["cwe"]
    user, _ = split(text)
    listing = user[user.rindex("Below is a numbered list"):]
    words = re.findall(r"\d+\. ([^\d]+?)(?= \d+\. |\nQuestion)", listing)
    counts = {w: words.count(w) for w in set(words)}
    assert all(counts[w] == 30 for w in s.rendered.answers)
    assert set(counts.values()) == {30, 3}


def test_frequent_words_are_the_three_after_the_noise(built):
    s, text = built["fwe"]
    user, _ = split(text)
    coded = user[user.index("coded words. ") + len("coded words. "):user.index("\nQuestion")].split(" ")
    ranked = sorted(set(coded), key=lambda w: -coded.count(w))
    assert ranked[0] == "..." and tuple(ranked[1:4]) == s.rendered.answers
    assert len({coded.count(w) for w in ranked[:4]}) == 4


def test_reproducible_and_seeded_per_sample(tok, inputs):
    a = plan.make_sample(tok, "niah_multikey_2", 1024, 3, inputs, seed=5)
    assert plan.make_sample(tok, "niah_multikey_2", 1024, 3, inputs, seed=5).ids == a.ids
    assert plan.make_sample(tok, "niah_multikey_2", 1024, 4, inputs, seed=5).ids != a.ids
    assert plan.make_sample(tok, "niah_multikey_2", 1024, 3, inputs, seed=6).ids != a.ids


def test_longer_length_and_overridden_budget(tok, inputs):
    s = plan.make_sample(tok, "niah_single_2", 8192, 0, inputs, max_new_tokens=16)
    assert 0.98 * 8192 <= len(s.ids) + 16 <= 8192


def test_length_too_short_for_the_template(tok, inputs):
    with pytest.raises(ValueError, match="cwe at length 300: the template"):
        plan.make_sample(tok, "cwe", 300, 0, inputs)


def test_scorer_hand_worked():
    refs = ["123", "Apple-Pie", "789"]
    assert scoring.string_match_all("The numbers are 123 and apple-pie.", refs) == pytest.approx(2 / 3)
    assert scoring.string_match_all("nothing", refs) == 0.0
    assert scoring.string_match_all(" 789\x00123 APPLE-PIE ", refs) == 1.0
    assert scoring.string_match_part("It was 789.", refs) == 1.0
    assert scoring.string_match_part("It was 78.", refs) == 0.0
    assert scoring.clean("  a\x01b\n ") == "a\nb"


def test_ruler_averages_on_the_papers_glm4_row():
    scores = [94.7, 92.8, 92.1, 89.9, 86.7, 83.1]     # RULER's README, GLM4 (9B): wAvg 88.0 / 91.7
    inc, dec = results.weighted_averages(scores)       # (from the rounded scores: 88.01 / 91.75)
    assert inc == pytest.approx(88.0, abs=0.06) and dec == pytest.approx(91.7, abs=0.06)
    lengths = [4096, 8192, 16384, 32768, 65536, 131072]
    assert results.effective_length(lengths, scores) == 65536
    assert results.effective_length(lengths, [80.0] + scores[1:]) is None


def test_summary_of_rows(tmp_path):
    config = {"model": "m", "tasks": ["niah_single_1", "vt"], "lengths": [100, 200], "samples": 2, "haystack": None}
    rows = [{"task": t, "length": n, "sample": s, "score": x} for t, n, s, x in
            [("niah_single_1", 100, 0, 1.0), ("niah_single_1", 100, 1, 0.5), ("vt", 100, 0, 0.2), ("vt", 100, 1, 0.0),
             ("niah_single_1", 200, 0, 1.0)]]
    summary = results.summarize(rows, config)
    assert summary["scores"]["niah_single_1"]["100"] == 75.0 and summary["scores"]["vt"]["100"] == 10.0
    assert summary["average_by_length"] == {"100": 42.5, "200": None}    # 200 incomplete: no average
    assert summary["average"] is None and not summary["complete"]


def squad_file(path: pathlib.Path) -> pathlib.Path:
    paragraphs = [{"context": f"Paragraph {i} says the river of town {i} is called River{i}x.",
                   "qas": [{"question": f"What is the river of town {i} called?", "is_impossible": False,
                            "answers": [{"text": f"River{i}x"}]},
                           {"question": "Unanswerable?", "is_impossible": True, "answers": []}]}
                  for i in range(60)]
    path.write_text(json.dumps({"version": "v2.0", "data": [{"title": "T", "paragraphs": paragraphs}]}))
    return path


def hotpot_file(path: pathlib.Path) -> pathlib.Path:
    data = [{"question": f"Who founded company {i}?", "answer": f"Founder{i}",
             "context": [[f"Company {i}", [f"Company {i} was founded by Founder{i}. ", "It makes lamps."]],
                         [f"Town {i}", [f"Town {i} is small."]]]} for i in range(40)]
    path.write_text(json.dumps(data))
    return path


def test_qa_files_and_their_prompts(tok, tmp_path):
    squad, hotpot = qa.load_qa(squad_file(tmp_path / "s.json")), qa.load_qa(hotpot_file(tmp_path / "h.json"))
    assert (squad.dataset, len(squad.questions)) == ("squad", 60)
    assert (hotpot.dataset, len(hotpot.questions)) == ("hotpotqa", 40)
    inputs = plan.Inputs(qa={"squad": squad, "hotpotqa": hotpot})
    for name, data in (("qa_1", squad), ("qa_2", hotpot)):
        s = plan.make_sample(tok, name, 2048, 7, inputs)
        text = tok.decode(s.ids)
        assert s.rendered.answers == data.questions[7].outputs
        assert all(data.documents[g] in text for g in data.questions[7].gold)
        assert text.endswith("<|assistant|>\nAnswer:") and "Document 1:\n" in text
        assert len(s.ids) + 32 <= 2048
    (tmp_path / "bad.json").write_text('{"x": 1}')
    with pytest.raises(ValueError, match="not a SQuAD v2 or HotpotQA file"):
        qa.load_qa(tmp_path / "bad.json")
    assert tasks.parse_tasks(None, {"squad": squad})[-1] == "qa_1"
    with pytest.raises(ValueError, match="qa_2 needs --qa-data"):
        tasks.parse_tasks("vt,qa_2", {"squad": squad})


def test_zeta():
    assert aggregation.zeta(2.0) == pytest.approx(np.pi ** 2 / 6, rel=1e-9)


# -- the command ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(reference, tmp_path_factory):
    from glm_jax.testing import random_config, write_random_model

    config = random_config(hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2, max_seq_len=1024)
    return write_random_model(tmp_path_factory.mktemp("ruler") / "tiny", config, reference=reference)


RUN = ["--lengths", "320", "--tasks", "niah_single_1,niah_multikey_2,niah_multikey_3,vt", "--samples", "2",
       "--max-new-tokens", "4", "--batch-size", "4", "--quiet"]


@pytest.fixture(scope="module")
def ran(tiny, tmp_path_factory):
    """One batched run; the engine's calls recorded (the prompts of each)."""
    import glm_jax.api

    calls = []
    generate = glm_jax.api.Model.generate

    def spy(self, prompts, **kw):
        calls.append([len(p) for p in prompts])
        return generate(self, prompts, **kw)

    mp = pytest.MonkeyPatch()
    mp.setattr(glm_jax.api.Model, "generate", spy)
    out = tmp_path_factory.mktemp("ruler-run") / "out"
    try:
        assert main(["ruler", "--model", str(tiny), "--out", str(out), *RUN]) == 0
    finally:
        mp.undo()
    return out, calls


def test_batched_run_writes_results_summary_and_picture(ran):
    out, calls = ran
    assert len(calls) == 2 and all(len(c) == 4 and all(280 <= n <= 316 for n in c) for c in calls)  # 2 x 4 rows
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and {r["task"] for r in rows} == {"niah_single_1", "niah_multikey_2", "niah_multikey_3", "vt"}
    for r in rows:
        assert {"task", "length", "sample", "prompt_tokens", "answers", "response", "score", "seconds"} <= set(r)
        assert r["prompt_tokens"] + 4 <= 320 and r["batch_rows"] == 4 and 0 <= r["score"] <= 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"]
    assert set(summary["scores"]) == {"niah_single_1", "niah_multikey_2", "niah_multikey_3", "vt"}
    assert summary["weighted_average_inc"] == summary["average"]       # one length
    assert (out / "heatmap.png").stat().st_size > 1000


def test_rerun_skips_what_is_done_and_refuses_changed_arguments(ran, tiny, monkeypatch, capsys):
    import glm_jax

    out, _ = ran
    lines = (out / "results.jsonl").read_text().splitlines(keepends=True)
    (out / "results.jsonl").write_text("".join(lines[:-3]) + lines[-3][:20])      # a kill mid-line
    loaded = []
    real_load = glm_jax.load
    monkeypatch.setattr(glm_jax, "load", lambda *a, **k: loaded.append(1) or real_load(*a, **k))
    assert main(["ruler", "--model", str(tiny), "--out", str(out), *RUN, "--batch-size", "8"]) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and len({(r["task"], r["sample"]) for r in rows}) == 8 and loaded == [1]
    assert [r["batch_rows"] for r in rows[-3:]] == [3, 3, 3]
    assert main(["ruler", "--model", str(tiny), "--out", str(out), *RUN]) == 0 and loaded == [1]   # all done
    capsys.readouterr()
    assert main(["ruler", "--model", str(tiny), "--out", str(out), *RUN, "--seed", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds results of other arguments (seed)" in err


@pytest.mark.parametrize("args, message", [
    (["--lengths", "512", "--tasks", "niah_single_1,nope"], "unknown task 'nope'"),
    (["--lengths", "512", "--samples", "0"], "--samples must be at least 1"),
    (["--lengths", "512", "--batch-size", "0"], "--batch-size must be at least 1"),
    (["--tasks", "vt"], "give the context lengths"),
    (["--lengths", "4096"], "above the model's context"),
    (["--lengths", "512", "--tasks", "qa_1"], "qa_1 needs --qa-data"),
    (["--lengths", "512", "--tasks", "cwe"], "cwe at length 512"),
    (["--lengths", "512", "--qa-data", "/nonexistent.json"], "cannot read /nonexistent.json"),
])
def test_bad_arguments_one_line_exit_2(tiny, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    assert main(["ruler", "--model", str(tiny), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("glm-jax ruler: error:") and message in err, err
    assert not out.exists()
