"""`glm-jax needle`: exact prompt lengths and needle positions (real tokenizer), seeded planning, scoring,
multi-needle, resume after a kill, the heatmap and summary, bad input."""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import glm_jax
from glm_jax.cli import main
from glm_jax.evals import common as C
from glm_jax.evals.needle import haystack as H
from glm_jax.evals.needle import plan as PL
from glm_jax.evals.needle import prompt as P
from glm_jax.evals.needle import results as R
from glm_jax.tokenizer import Tokenizer

MAX_SEQ_LEN = 4096


@pytest.fixture(scope="module")
def tok(reference):
    return Tokenizer.from_file(reference / "tokenizer.model")


@pytest.fixture(scope="module")
def tiny(reference, tmp_path_factory):
    """A random 1-layer GLM-4 (hidden 64, float32) with the real vocabulary and tokenizer files."""
    from glm_jax.testing import random_config, write_random_model

    config = random_config(hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2, max_seq_len=MAX_SEQ_LEN)
    return write_random_model(tmp_path_factory.mktemp("needle") / "tiny", config, reference=reference)


def corpus_text(sentences: int = 400, seed: int = 0) -> str:
    """Prose-like text: sentences of varied length, quotes, line and paragraph breaks, some Chinese."""
    rng = np.random.default_rng(seed)
    words = ("river", "lantern", "quietly", "north", "merchant", "over", "the", "stone", "bridge", "and",
             "winter", "letters", "of", "an", "old", "captain", "who", "never", "returned", "home", "gardens")
    parts = []
    for i in range(sentences):
        body = " ".join(rng.choice(words, size=int(rng.integers(3, 18))))
        body = body[0].upper() + body[1:]
        kind = i % 11
        sentence = (f'"{body}!"' if kind == 3 else f"{body}?" if kind == 5 else
                    "他们在河边等了很久。" if kind == 7 else f"{body}.")
        parts.append(sentence + ("\n\n" if kind == 9 else "\n" if kind == 4 else "" if kind == 7 else " "))
    return "".join(parts)


@pytest.fixture(scope="module")
def haystacks(tok, tmp_path_factory):
    """The built-in filler, a plain text file and the same text as JSONL records."""
    folder = tmp_path_factory.mktemp("haystacks")
    text = corpus_text()
    (folder / "book.txt").write_text(text, encoding="utf-8")
    paragraphs = text.split("\n\n")
    (folder / "book.jsonl").write_text("".join(json.dumps({"text": p, "id": i}) + "\n"
                                               for i, p in enumerate(paragraphs)), encoding="utf-8")
    return {"filler": H.load_haystack(None, tok), "text": H.load_haystack(folder / "book.txt", tok),
            "jsonl": H.load_haystack(folder / "book.jsonl", tok)}


# -- haystack --------------------------------------------------------------------------------------

def test_sentences_and_haystack_files(tok, haystacks, tmp_path):
    sentences, separators = H.split_sentences('One. "Two!" Three?\n\nFour and\nfive 3.14 x. 六。七！ Eight')
    assert sentences == ["One.", '"Two!"', "Three?", "Four and", "five 3.14 x.", "六。", "七！", "Eight"]
    assert separators == ["", " ", " ", "\n\n", "\n", " ", "", " "]
    text = corpus_text()
    rebuilt = haystacks["text"].sentences[0] + "".join(sep + s for sep, s in zip(haystacks["text"].separators[1:],
                                                                               haystacks["text"].sentences[1:]))
    assert rebuilt == text.strip()
    assert haystacks["jsonl"].sentences == haystacks["text"].sentences   # records joined by blank lines
    folder = tmp_path / "essays"
    folder.mkdir()
    (folder / "b.txt").write_text("Second essay.")
    (folder / "a.txt").write_text("First essay.")
    assert H.load_haystack(folder, tok).sentences == ("First essay.", "Second essay.")
    assert haystacks["filler"].repeat and not haystacks["text"].repeat


# -- prompt: exact by construction -----------------------------------------------------------------

def check_prompt(tok, haystack, length, needles, question, offset, prompt):
    ids = prompt.ids
    assert len(ids) <= length                                               # never over
    assert tok.decode(ids) == prompt.text                                   # the ids are the rendered prompt
    content = P.render(haystack, offset, prompt.haystack_sentences, sorted(needles, key=lambda x: x.depth),
                        question, np.concatenate([[0], np.cumsum(H.window(
                            haystack, offset, prompt.haystack_sentences, haystack.counts))]))[0]
    assert ids == C.prompt_ids(tok, content)
    more = H.available_sentences(haystack, offset)
    if more is None or prompt.haystack_sentences < more:                   # one more sentence is over
        n = prompt.haystack_sentences + 1
        longer = P.render(haystack, offset, n, needles, question,
                           np.concatenate([[0], np.cumsum(H.window(haystack, offset, n, haystack.counts))]))[0]
        assert len(C.prompt_ids(tok, longer)) > length
    assert prompt.text.startswith("[gMASK]<sop><|user|>\n") and prompt.text.endswith(question + "<|assistant|>")
    raw = prompt.text.encode()
    for needle, index in zip(sorted(needles, key=lambda x: x.depth), prompt.needle_token_indices):
        start = raw.index(needle.text.encode())
        # the token at needle_token_index holds the needle's first byte
        assert len(tok.decode_bytes(ids[:index])) <= start < len(tok.decode_bytes(ids[:index + 1]))
        assert tok.decode(ids[index:index + 30]).lstrip().startswith(needle.text)


@pytest.mark.parametrize("kind", ["filler", "text", "jsonl"])
@pytest.mark.parametrize("length", [300, 517, 1000])
@pytest.mark.parametrize("depth", [0, 33, 100])
def test_prompt_length_and_needle_position_are_exact(tok, haystacks, kind, length, depth):
    haystack = haystacks[kind]
    needle = P.Needle("Lisbon", 4821937, float(depth))
    question = needle.question()
    offset = 3 if kind == "filler" else 17
    prompt = P.build_prompt(tok, haystack, length, [needle], question, offset)
    check_prompt(tok, haystack, length, [needle], question, offset, prompt)
    assert length - len(prompt.ids) < 40                               # a sentence short at most
    head = len(tok.encode("[gMASK]<sop><|user|>\n"))                       # 4 tokens
    body = len(prompt.ids) - head - len(tok.encode("\n\n" + question)) - 1   # haystack and needle
    index = prompt.needle_token_indices[0]
    if depth == 0:
        assert index == head and prompt.text.startswith("[gMASK]<sop><|user|>\n" + needle.text)
    elif depth == 100:
        assert needle.text + "\n\n" + question + "<|assistant|>" in prompt.text
    else:   # the sentence boundary nearest to a third of the haystack
        assert abs((index - head) / body - depth / 100) < 0.02 + haystack.counts.max() / body


def test_exact_for_every_length_never_over(tok, haystacks):
    for kind in ("filler", "text"):
        haystack = haystacks[kind]
        for length in range(90, 1400, 53):
            needle = P.Needle("Oslo", 1000000 + length, 50.0)
            prompt = P.build_prompt(tok, haystack, length, [needle], needle.question(), 5)
            check_prompt(tok, haystack, length, [needle], needle.question(), 5, prompt)


def test_multi_needle_positions_follow_depth(tok, haystacks):
    assert P.needle_depths(0, 4) == [0, 25, 50, 75]
    assert P.needle_depths(75, 4) == [25, 50, 75, 100]
    assert P.needle_depths(100, 2) == [50, 100]
    assert P.needle_depths(40, 1) == [40]
    for kind in ("filler", "text"):
        needles = [P.Needle(city, 2000000 + i, d) for i, (city, d) in
                   enumerate(zip(("Rome", "Cairo", "Lima"), P.needle_depths(25, 3)))][::-1]   # any order in
        question = needles[1].question()
        prompt = P.build_prompt(tok, haystacks[kind], 900, needles, question, 0)
        check_prompt(tok, haystacks[kind], 900, needles, question, 0, prompt)
        indices = prompt.needle_token_indices
        assert len(indices) == 3 and list(indices) == sorted(indices) and len(set(indices)) == 3
        starts = [prompt.text.index(n.text) for n in sorted(needles, key=lambda x: x.depth)]
        assert starts == sorted(starts)


# -- plan: the grid and its cases ------------------------------------------------------------------

def test_plan_is_seeded_and_cells_are_independent(tok, haystacks):
    haystack = haystacks["text"]
    a = PL.plan_cases(tok, haystack, [300, 1000], [0, 50], 3, 2, seed=1)
    assert a == PL.plan_cases(tok, haystack, [300, 1000], [0, 50], 3, 2, seed=1)
    assert a != PL.plan_cases(tok, haystack, [300, 1000], [0, 50], 3, 2, seed=2)
    assert [c for c in a if c.context_length == 1000] == PL.plan_cases(tok, haystack, [1000], [0, 50], 3, 2, seed=1)
    assert len(a) == 2 * 2 * 3
    for case in a:
        cities = [n.city for n in case.needles]
        assert len(set(cities)) == 2 and all(1_000_000 <= n.number <= 9_999_999 for n in case.needles)
        assert [n.depth for n in case.needles] == P.needle_depths(case.depth_percent, 2)
    samples = [c for c in a if c.context_length == 1000 and c.depth_percent == 0]
    assert len({c.needles for c in samples}) == 3 and len({c.offset for c in samples}) > 1
    # offsets leave the haystack enough sentences for the length
    for case in a:
        prompt = P.build_prompt(tok, haystack, case.context_length, case.needles, case.needles[0].question(),
                                case.offset)
        assert case.context_length - len(prompt.ids) < 60


def test_grid_arguments():
    assert C.parse_lengths("8000, 1000,1000") == [1000, 8000]
    assert C.parse_lengths(None, 1000, 2000, 3) == [1000, 1500, 2000]
    assert PL.parse_depths(None) == [0, 25, 50, 75, 100]
    assert PL.parse_depths(None, 4) == [0, 33.3, 66.7, 100]
    assert PL.parse_depths("100,0,12.5") == [0, 12.5, 100]


# -- results: scoring ------------------------------------------------------------------------------

def test_scoring_is_substring():
    assert R.is_correct("4821937", "The special magic Lisbon number is: 4821937.")
    assert R.is_correct("4821937", "48219370")
    assert not R.is_correct("4821937", "482193")
    assert not R.is_correct("4821937", "4,821,937")
    assert not R.is_correct("4821937", "")


# -- runner ----------------------------------------------------------------------------------------

def test_model_config_of_either_folder(tiny, reference):
    assert C.model_config(tiny).max_seq_len == MAX_SEQ_LEN
    assert C.model_config(reference / "models" / "glm-4-9b-chat-1m").max_seq_len == 1048576


# -- runner and results: the command, with a model that reads the prompt ---------------------------

class Oracle:
    """Stands in for a model: answers the asked city's number when that needle lies in the first 40% of
    the prompt's text, a wrong number otherwise; streams its tokens through on_token."""

    def __init__(self, folder):
        self.tokenizer = Tokenizer.from_file(folder)
        self.calls = []

    def generate(self, prompts, *, max_new_tokens, temperature, on_token=None, progress=False, **speculative):
        assert temperature == 0 and len(prompts) == 1 and on_token is not None
        assert speculative.get("speculative") is None                     # the runner's default: off
        text = self.tokenizer.decode(prompts[0])
        city = re.search(r"What is the special magic (\w+) number\?", text).group(1)
        found = re.search(rf"The special magic {city} number is: (\d+)\.", text)
        answer = found.group(1) if found.start() < 0.4 * len(text) else "1111111"
        ids = self.tokenizer.encode(f"\nThe number is {answer}.")[:max_new_tokens - 1] + [151336]
        for token in ids:
            on_token(0, token)
        self.calls.append(len(prompts[0]))
        return [ids]


@pytest.fixture
def oracle(tiny, monkeypatch):
    model = Oracle(tiny)
    monkeypatch.setattr(glm_jax, "load", lambda *args, **kwargs: model)
    return model


def needle_cli(tiny, out, *extra):
    return main(["needle", "--model", str(tiny), "--out", str(out), "--quiet", *extra])


def rows(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def untimed(results):
    return [{k: v for k, v in r.items() if k not in ("seconds", "prefill_tokens_per_s")} for r in results]


def colour_share(png, rgb):
    import matplotlib.image

    image = matplotlib.image.imread(png)[..., :3]
    return float(np.mean(np.all(np.abs(image - np.array(rgb) / 255) < 0.03, axis=-1)))


def test_run_summary_heatmap_and_resume(tiny, oracle, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--lengths", "600,300", "--depths", "0,50,100", "--samples", "2", "--json"]
    assert needle_cli(tiny, out, *args) == 0
    summary = json.loads(capsys.readouterr().out)
    results = rows(out)
    assert len(results) == len(oracle.calls) == 2 * 3 * 2
    assert [(r["context_length"], r["depth_percent"], r["sample"]) for r in results] == \
        [(n, d, s) for n in (300, 600) for d in (0, 50, 100) for s in (0, 1)]
    for r in results:
        assert r["prompt_tokens"] <= r["context_length"] and r["correct"] == (r["depth_percent"] == 0)
        assert r["answer"] in r["response"] or not r["correct"]
        assert r["haystack"] == "built-in filler" and r["seconds"] >= 0 and r["prefill_tokens_per_s"] > 0
        assert r["needle_token_index"] == r["needle_token_indices"][0] and r["needles"] == 1
    assert len({(r["city"], r["answer"]) for r in results}) == len(results)
    # the summary and the heatmap are those of the results
    assert summary == json.loads((out / "summary.json").read_text())
    assert summary["accuracy"] == pytest.approx(np.mean([r["correct"] for r in results])) == pytest.approx(1 / 3)
    assert summary["by_length"] == {"300": pytest.approx(1 / 3), "600": pytest.approx(1 / 3)}
    assert summary["by_depth"] == {"0": 1.0, "50": 0.0, "100": 0.0} and summary["complete"]
    assert "built-in filler" in summary["haystack"] and summary["done"] == summary["prompts"] == 12
    assert R.accuracy_grid(summary).tolist() == [[1, 1], [0, 0], [0, 0]]
    png = out / "heatmap.png"
    assert summary["heatmap"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    green, red = colour_share(png, (0x0C, 0xD7, 0x9F)), colour_share(png, (0xF0, 0x49, 0x6E))
    assert red > 1.5 * green > 0.03                                         # 2 cells green, 4 red
    # rerun: nothing to do
    assert needle_cli(tiny, out, *args) == 0 and len(oracle.calls) == 12
    # an interrupted run: the last lines missing, one cut short by the kill
    lines = (out / "results.jsonl").read_text().splitlines(keepends=True)
    (out / "results.jsonl").write_text("".join(lines[:9]) + lines[9][:40])
    assert needle_cli(tiny, out, *args) == 0
    assert len(oracle.calls) == 15 and untimed(rows(out)) == untimed(results)
    # other arguments are refused; --force starts afresh
    before = snapshot(out)
    capsys.readouterr()
    assert needle_cli(tiny, out, *args[:-3], "--samples", "1") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "other arguments (samples)" in err and "--force" in err and snapshot(out) == before
    assert needle_cli(tiny, out, *args[:-3], "--samples", "1", "--force") == 0
    assert len(rows(out)) == 6 and json.loads((out / "config.json").read_text())["samples"] == 1
    assert "accuracy 0.333 over 6/6 prompts" in capsys.readouterr().out


def test_multi_needle_asks_each_in_turn(tiny, oracle, tmp_path):
    out = tmp_path / "multi"
    assert needle_cli(tiny, out, "--lengths", "600", "--depths", "0,50", "--multi-needle", "2", "--seed", "3") == 0
    results = rows(out)
    assert [(r["depth_percent"], r["needle"], r["needle_depth_percent"]) for r in results] == \
        [(0, 0, 0), (0, 1, 50), (50, 0, 50), (50, 1, 100)]
    for cell in (results[:2], results[2:]):
        assert cell[0]["city"] != cell[1]["city"] and cell[0]["answer"] != cell[1]["answer"]
        assert cell[0]["city"] in cell[0]["question"] and cell[1]["city"] in cell[1]["question"]
    for r in results:
        indices = r["needle_token_indices"]
        assert len(indices) == 2 and indices[0] < indices[1] and r["needle_token_index"] == indices[r["needle"]]
    assert [r["correct"] for r in results] == [True, False, False, False]   # scored separately
    summary = json.loads((out / "summary.json").read_text())
    assert summary["by_depth"] == {"0": 0.5, "50": 0.0} and summary["by_needle_depth"] == {"0": 1.0, "50": 0.0,
                                                                                         "100": 0.0}


# -- a real run, killed between cells, then resumed ------------------------------------------------

@pytest.mark.slow
def test_resume_after_kill(tiny, tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    command = [sys.executable, "-m", "glm_jax.cli", "needle", "--model", str(tiny), "--out", str(out),
               "--lengths", "200,300", "--depths", "0,50,100", "--max-new-tokens", "3", "--compile-cache", str(cache)]
    results = out / "results.jsonl"
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (results.is_file() and b"\n" in results.read_bytes()) and process.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, process.stderr.read()[-3000:]
    first = results.read_text()
    done = first.count("\n")
    assert 1 <= done < 6
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"6 prompts, {done} done" in again.stderr
    final = results.read_text()
    assert final.startswith(first[:first.rindex("\n") + 1])                 # finished lines kept as they were
    keys = [R.result_key(r) for r in rows(out)]
    assert sorted(keys) == [(n, d, 0, 0) for n in (200, 300) for d in (0.0, 50.0, 100.0)]   # no duplicates
    for r in rows(out):
        assert 0 < r["prompt_tokens"] <= r["context_length"] and 1 <= r["new_tokens"] <= 3
        assert r["correct"] == (r["answer"] in r["response"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and (out / "heatmap.png").is_file() and "accuracy" in again.stdout
    # other arguments: refused, one line, nothing written
    before = snapshot(out)
    refused = subprocess.run(command[:-2] + ["--seed", "1"], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert refused.stderr.startswith("glm-jax needle: error:") and "seed" in refused.stderr
    assert snapshot(out) == before


# -- bad input -------------------------------------------------------------------------------------

def snapshot(folder: pathlib.Path):
    if not folder.exists():
        return None
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("extra, message", [
    (["--haystack", "{tmp}/missing.txt"], "cannot read haystack"),
    (["--haystack", "{tmp}/empty.txt"], "is empty"),
    (["--haystack", "{tmp}/latin1.txt"], "cannot read haystack"),
    (["--haystack", "{tmp}/bad.jsonl"], "bad.jsonl:2: expected an object with a string 'text' field"),
    (["--haystack", "{tmp}/short.txt"], "has 12 tokens; context length 300 needs 255 (or repeat it: "
                                        "--repeat-haystack)"),
    (["--lengths", "300,4090"], "above the model's context (4,096 tokens)"),
    (["--lengths", "20"], "context length 20 is too short"),
    (["--depths", "0,101"], "depths are percentages in 0..100, got 101"),
    (["--depths", "-5"], "depths are percentages in 0..100, got -5"),
    (["--lengths", "300", "--min-length", "100"], "not both"),
    (["--lengths", "3x0"], "'3x0' is not an integer"),
    (["--samples", "0"], "--samples must be at least 1"),
    (["--multi-needle", "51"], "at most 50 needles"),
    (["--out", "{other}"], "holds results of other arguments"),
    (["--out", "{foreign}"], "not empty and holds no needle run"),
])
def test_bad_input_is_one_line_and_writes_nothing(tiny, oracle, tmp_path, capsys, extra, message):
    (tmp_path / "empty.txt").write_text("  \n\n ")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait.".encode("latin-1"))
    (tmp_path / "bad.jsonl").write_text('{"text": "One."}\n["Two."]\n')
    (tmp_path / "short.txt").write_text("A short haystack. It has two sentences and no more.")
    other, foreign = tmp_path / "other", tmp_path / "foreign"
    if "{other}" in extra:
        assert needle_cli(tiny, other, "--lengths", "300", "--depths", "50") == 0   # a run of other arguments
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    extra = [e.format(tmp=tmp_path, other=other, foreign=foreign) for e in extra]
    out = pathlib.Path(extra[extra.index("--out") + 1]) if "--out" in extra else tmp_path / "out"
    args = [] if "--lengths" in extra else ["--lengths", "300"]
    args += [] if "--out" in extra else ["--out", str(out)]
    before, calls = snapshot(out), len(oracle.calls)
    capsys.readouterr()
    code = main(["needle", "--model", str(tiny), "--quiet", *args, *extra])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("glm-jax needle: error: "), err
    assert message in err
    assert snapshot(out) == before and len(oracle.calls) == calls


def test_short_haystack_can_repeat(tiny, oracle, tmp_path):
    (tmp_path / "short.txt").write_text("A short haystack. It has two sentences and no more.")
    out = tmp_path / "out"
    assert needle_cli(tiny, out, "--lengths", "300", "--depths", "50", "--haystack", str(tmp_path / "short.txt"),
                      "--repeat-haystack") == 0
    (r,) = rows(out)
    assert 290 < r["prompt_tokens"] <= 300 and r["haystack"] == str(tmp_path / "short.txt")


def test_json_into_a_closed_pipe_exits_quietly(tiny, tmp_path):
    """`glm-jax needle --json | head -c 0`: the reader gone, the command ends quietly with 141 (as a
    Unix tool killed by SIGPIPE), no BrokenPipeError traceback; the results are written all the same."""
    command = [sys.executable, "-m", "glm_jax.cli", "needle", "--model", str(tiny), "--out", str(tmp_path / "out"),
               "--lengths", "100", "--depths", "50", "--max-new-tokens", "2", "--json", "--quiet",
               "--compile-cache", "off"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    process.stdout.close()                                      # the reader goes before the answer comes
    err = process.stderr.read()
    assert process.wait(timeout=300) == 141, err
    assert err == ""
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["complete"]
