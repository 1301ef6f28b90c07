#!/usr/bin/env python3
"""How reproducible is a sweep on this machine, and does `ringlab diff` stay quiet on noise?

Runs TRIALS pairs of same-revision sweeps back to back (`ringlab sweep -n N --repeat R`), diffs
each pair with `ringlab diff --fail-below 0.95`, and reports per trial how many cells were flagged
as worse beyond noise, and per cell the spread of the new/base ratio of medians over all pairs.

Usage: scripts/reproducibility.py [--trials 10] [-n 1000] [--repeat 3]
Writes results/<UTC date-time>-reproducibility/{README.md,trials.json} and each pair's diff.md.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from datetime import datetime, timezone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "ringlab")


def sweep(out, label, n, repeat):
    subprocess.run([BIN, "sweep", "-n", str(n), "--repeat", str(repeat), "--out", out, "--label", label],
                   check=True, capture_output=True, text=True, timeout=1800)
    return next(os.path.join(out, d) for d in os.listdir(out) if d.endswith("-" + label))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("-n", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(ROOT, "results"))
    args = ap.parse_args()
    subprocess.run(["cargo", "build", "--release", "-q"], cwd=ROOT, check=True)
    folder = os.path.join(args.out, datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S") + "-reproducibility")
    os.makedirs(folder)
    version = subprocess.run([BIN, "--version"], capture_output=True, text=True).stdout.strip()
    trials, ratios = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for t in range(1, args.trials + 1):
            out = os.path.join(tmp, str(t))
            os.makedirs(out)
            a = sweep(out, "a", args.n, args.repeat)
            b = sweep(out, "b", args.n, args.repeat)
            d = subprocess.run([BIN, "diff", a, b, "--fail-below", "0.95"], capture_output=True, text=True)
            with open(os.path.join(folder, f"diff-{t}.md"), "w") as f:
                f.write(d.stdout)
            flagged = re.findall(r"^\| (.+?) \|.*\| \*\*worse\*\* \|$", d.stdout, re.M)
            failing = [c for c in flagged
                       if float(re.search(r"^\| " + re.escape(c) + r" \|(?:[^|]*\|){4} ([\d.]+)×", d.stdout, re.M).group(1)) < 0.95]
            for m in re.finditer(r"^\| ([^|]+?) \| \d+ \| \d+ \|[^|]*\|[^|]*\| ([\d.]+)× \|", d.stdout, re.M):
                ratios.setdefault(m.group(1), []).append(float(m.group(2)))
            trials.append({"trial": t, "exit": d.returncode, "failing": failing, "worse_beyond_noise": flagged})
            print(f"trial {t}: exit {d.returncode}, failing {failing}", file=sys.stderr)
    quiet = sum(1 for t in trials if t["exit"] == 0)
    o = [f"# Reproducibility: same-revision sweeps back to back, {datetime.now(timezone.utc):%Y-%m-%dT%H:%M:%SZ}\n",
         "| | |\n| --- | --- |",
         f"| ringlab | {version} |",
         f"| Kernel | {' '.join(os.uname()[2:5:2])} |",
         f"| Method | {args.trials} trials; each two `ringlab sweep -n {args.n} --repeat {args.repeat}` back to back "
         f"(the default lab and placement), then `ringlab diff A B --fail-below 0.95` |",
         f"| Command | `{' '.join(sys.argv)}` |\n",
         f"**`ringlab diff` stayed quiet (exit 0) in {quiet} of {args.trials} trials.**\n",
         "| trial | exit | cells worse beyond noise | of those below 0.95× |", "| ---: | ---: | --- | --- |"]
    for t in trials:
        o.append(f"| {t['trial']} | {t['exit']} | {', '.join(t['worse_beyond_noise']) or '—'} | {', '.join(t['failing']) or '—'} |")
    o += ["", "Per cell, the ratio of medians (B/A) over the trials: how far two same-revision sweeps drift.\n",
          "| cell | min | median | max | trials outside ±5% |", "| --- | ---: | ---: | ---: | ---: |"]
    for cell, rs in sorted(ratios.items()):
        rs_sorted = sorted(rs)
        outside = sum(1 for r in rs if abs(r - 1) > 0.05)
        o.append(f"| {cell} | {rs_sorted[0]:.3f} | {rs_sorted[len(rs) // 2]:.3f} | {rs_sorted[-1]:.3f} | {outside} of {len(rs)} |")
    o.append("\n`diff-N.md` holds each trial's diff; `trials.json` the same numbers.\n")
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write("\n".join(o))
    with open(os.path.join(folder, "trials.json"), "w") as f:
        json.dump({"trials": trials, "ratios": ratios, "n": args.n, "repeat": args.repeat, "ringlab": version}, f, indent=1)
    print("\n".join(o))
    print(f"wrote {folder}")


if __name__ == "__main__":
    main()
