"""scripts/bench_paged.py's bookkeeping (not speed): requests running at once, TTFT percentiles,
greedy outputs compared side by side, the batching bound; first on scripted engine replies (no JAX,
fast), then end to end on a tiny random model (--small, the row side in this process: slow here,
every engine shape compiles)."""

import importlib.util
import json
import sys

import numpy as np
import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
spec = importlib.util.spec_from_file_location("bench_paged", ROOT / "scripts" / "bench_paged.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

CFG = bench.SMALL


class Scripted:
    """A side answering the script's ops from canned figures; `calls` records them."""

    def __init__(self, running: int, ttft: float, flip: int | None = None, rate: float = 100.0):
        self.running, self.ttft, self.flip, self.rate, self.calls = running, ttft, flip, rate, []

    def __call__(self, op, **args):
        self.calls.append((op, args))
        if op == "engine":
            return {"slots": 544, "kv_bytes": 1 << 20, "max_batch": args["max_batch"]}
        if op == "serve":
            n = len(args["prompts"])
            outputs = [[i] * args["new"] for i in range(n)]
            if self.flip is not None:
                outputs[self.flip] = [-1] * args["new"]
            steps = [[1.0, self.running, None], [3.0, self.running + 2, None]]   # mean running + 1.5
            return {"wall_s": 4.0, "steps": steps, "ttft_s": [self.ttft * (i + 1) for i in range(n)],
                    "outputs": outputs, "cached": [0] * n, "finish": ["length"] * n,
                    "delta": {"preemptions": 1, "prefix_hits": 0}}
        if op == "alone":
            return [0.5] * len(args["prompts"])
        if op == "step_time":
            return {"rows": args["rows"], "step_s": 0.01 * (1 + args["rows"] / 4), "tokens": 8, "all_rows_ran": True}
        if op == "decode":
            tokens = [1, 2, 3] if self.flip is None else [1, 2, 4]
            return {"ttft_s": 1.0, "cached": 0, "tokens": tokens, "bursts": 3, "decode_tokens_per_s": self.rate}
        return None


def test_summary_weights_running_by_step_time():
    run = {"wall_s": 8.0, "steps": [[1.0, 2, 5], [3.0, 6, 9]], "ttft_s": [0.1, 0.2, 0.3, 4.0],
           "outputs": [[1, 2]] * 4, "cached": [0, 0, 16, 0], "delta": {"preemptions": 2, "prefix_hits": 1}}
    s = bench.summary(run, new=2)
    assert s["running_mean"] == pytest.approx((1 * 2 + 3 * 6) / 4) and s["running_max"] == 6
    assert s["ttft_p50_s"] == pytest.approx(np.percentile(run["ttft_s"], 50))
    assert s["ttft_p99_s"] == pytest.approx(np.percentile(run["ttft_s"], 99)) and s["ttft_p99_s"] <= 4.0
    assert s["output_tokens"] == 8 and s["complete"] and s["output_tokens_per_s"] == 1.0
    assert (s["preemptions"], s["prefix_hit_pages"], s["cached_tokens"]) == (2, 1, 16)
    assert not bench.summary({**run, "outputs": [[1]] * 4}, new=2)["complete"]


def test_mix_is_long_tailed_and_seeded():
    full = bench.FULL
    lengths = [len(p) for p in bench.mix(full)]
    assert len(lengths) == 64 and lengths.count(16384) == 4
    assert all(256 <= n <= 2048 for n in lengths if n != 16384)
    assert bench.mix(CFG) == bench.mix(CFG) and bench.mix(CFG, seed=1) != bench.mix(CFG)


def test_concurrency_bookkeeping_on_scripted_sides():
    row, paged = Scripted(running=1, ttft=2.0), Scripted(running=10, ttft=0.5, flip=3)
    r = bench.part_concurrency(paged, row, CFG, rounds=2)
    assert r["mean"]["row"]["running_mean"] == pytest.approx(2.5)
    assert r["mean"]["paged"]["running_mean"] == pytest.approx(11.5) and r["mean"]["paged"]["running_max"] == 12
    assert r["ratios"]["running_mean"] == pytest.approx(11.5 / 2.5)
    assert r["ratios"]["ttft_p50"] == pytest.approx(0.25)
    assert r["greedy_identical_requests"] == [CFG["requests"] - 1] * 2
    assert r["deterministic"] == {"row": True, "paged": True}
    # the paged pool gets the row engine's slots; rounds alternate which side goes first
    engine = next(a for op, a in paged.calls if op == "engine")
    assert engine["pool"] == {"page_size": CFG["page"], "kv_cache_tokens": 544}
    b = r["bound"]
    assert b["rows"] == 12 and b["prefill_alone_s"] == pytest.approx(0.5 * CFG["requests"])
    step_b = 0.01 * (1 + 12 / 4)
    bound_s = 0.5 * CFG["requests"] + CFG["requests"] * (CFG["new"] - 1) * step_b / 12
    assert b["bound_s"] == pytest.approx(bound_s)
    assert b["paged_fraction_of_bound"] == pytest.approx(
        r["mean"]["paged"]["output_tokens_per_s"] / (CFG["requests"] * CFG["new"] / bound_s))
    assert bench.table({"command": "c", "date": "d", "cpu_count": 2, "baseline": "b", "concurrency": r})


def test_decode_compares_greedy_tokens_and_rates():
    same = bench.part_decode(Scripted(1, 1.0, rate=90.0), Scripted(1, 1.0, rate=100.0), CFG, rounds=2)
    ctx = same["contexts"][0]
    assert ctx["greedy_identical"] and ctx["paged_vs_row"] == pytest.approx(0.9)
    assert len(ctx["paged"]["runs"]) == len(ctx["row"]["runs"]) == 2
    assert not bench.part_decode(Scripted(1, 1.0, flip=0), Scripted(1, 1.0), CFG, rounds=1)["contexts"][0][
        "greedy_identical"]


@pytest.mark.slow
def test_small_run_end_to_end(tmp_path, capsys):
    out = tmp_path / "paged.json"
    assert bench.main(["--small", "--baseline", "self", "--rounds", "1", "--out", str(out)]) == 0
    assert "paged/row: running" in capsys.readouterr().out
    r = json.loads(out.read_text())
    c = r["concurrency"]
    assert c["engines"]["row"]["kv_bytes"] == c["engines"]["paged"]["kv_bytes"]
    assert c["mean"]["row"]["running_max"] <= CFG["rows"] < c["mean"]["paged"]["running_max"] <= CFG["max_batch"]
    assert all(x["complete"] for side in c["rounds"].values() for x in side)
    assert c["greedy_identical_requests"] == [CFG["requests"]]
    p = r["prefix"]
    assert p["cached"][0] == 0 and all(n == CFG["system"] for n in p["cached"][1:])
    assert p["peak"]["pages_used"] < p["peak"]["pages_unshared"]
    assert r["decode"]["contexts"][0]["greedy_identical"] and r["page_size"]["greedy_identical"]
