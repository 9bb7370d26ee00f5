#!/usr/bin/env python3
"""Conversion speed and memory on a real-size checkpoint, next to a plain `cp` of the same files.

  python scripts/make_random_checkpoint.py --preset glm-4-9b-chat-1m --out /tmp/full/hf
  python scripts/bench_convert.py --src /tmp/full/hf --work /tmp/full

Both commands run under `/usr/bin/time -v` in the same run: wall time, GB/s of source bytes and
peak RSS. The page cache is dropped before each when this process may do so (root), else noted.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import shutil
import subprocess
import sys

from glm_jax import options


def drop_caches() -> bool:
    subprocess.run(["sync"], check=True)
    try:
        pathlib.Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def timed(cmd: list[str]) -> dict:
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", proc.stderr)
    h, m, s = wall.groups()
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    return {"seconds": int(h or 0) * 3600 + int(m) * 60 + float(s), "peak_rss_gib": rss / 2**20}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=pathlib.Path, required=True, help="HF folder (e.g. a full-size random one)")
    parser.add_argument("--work", type=pathlib.Path, required=True, help="scratch folder for the outputs")
    parser.add_argument("--dtype", choices=options.DTYPES, default=None)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    size = sum(p.stat().st_size for p in args.src.iterdir() if p.suffix == ".safetensors")
    copy_dst, conv_dst = args.work / "bench-cp", args.work / "bench-converted"
    for p in (copy_dst, conv_dst):
        shutil.rmtree(p, ignore_errors=True)
    glm_jax = pathlib.Path(sys.executable).with_name("glm-jax")
    results = {"source_gb": size / 1e9}
    results["cache_dropped"] = drop_caches()
    results["cp"] = timed(["cp", "-r", str(args.src), str(copy_dst)])
    drop_caches()
    convert = [str(glm_jax), "convert", str(args.src), str(conv_dst), "--quiet"]
    results["convert"] = timed(convert + (["--dtype", args.dtype] if args.dtype else []))
    for key in ("cp", "convert"):
        results[key]["gb_per_s"] = size / 1e9 / results[key]["seconds"]
    results["convert_vs_cp"] = results["cp"]["seconds"] / results["convert"]["seconds"]
    shutil.rmtree(copy_dst, ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"source: {size / 1e9:.2f} GB in {args.src} (page cache dropped: {results['cache_dropped']})")
    for key in ("cp", "convert"):
        r = results[key]
        print(f"{key:<8} {r['seconds']:8.1f} s  {r['gb_per_s']:6.2f} GB/s  peak RSS {r['peak_rss_gib']:6.2f} GiB")
    print(f"convert runs at {100 * results['convert_vs_cp']:.0f}% of cp's speed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
