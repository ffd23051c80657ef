"""The mode guard on scripts it has never seen: recall and false alarms per bug kind.

    python benchmarks/guard_study.py [--corpus benchmarks/guard_corpus] [--markdown]

Runs ``python -m harness.guard --report ...`` on every script of the corpus (small training scripts
written like the tutorials people copy, each labelled with its true bugs in a ``# guard-labels:``
line, ``none`` for a correct script, and the options a user would pass in ``# guard-allow:``) and
compares what the guard reports with the labels. Prints a row per script and a table per finding
kind: planted bugs, found, recall, false alarms. Exit status 1 when a bug is missed or a false alarm
is raised, so the table can gate CI.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "benchmarks" / "guard_corpus"
sys.path.insert(0, str(ROOT))

from harness.guard import FINDINGS  # noqa: E402

_LABELS = re.compile(r"^# guard-labels:(.*)$", re.MULTILINE)
_ALLOW = re.compile(r"^# guard-allow:(.*)$", re.MULTILINE)


def labels(script: Path) -> tuple[set[str], list[str]]:
    """The script's true bugs (``# guard-labels:``) and the ``--allow`` kinds it is run with."""
    text = script.read_text()
    found = _LABELS.search(text)
    if found is None:
        raise ValueError(f"{script}: no '# guard-labels:' line")
    kinds = {k.strip() for k in found.group(1).split(",") if k.strip() and k.strip() != "none"}
    unknown = kinds - set(FINDINGS)
    if unknown:
        raise ValueError(f"{script}: unknown labels {sorted(unknown)}")
    allow = _ALLOW.search(text)
    return kinds, [k.strip() for k in allow.group(1).split(",")] if allow else []


def scripts(corpus: Path = CORPUS) -> list[Path]:
    return sorted(corpus.glob("*.py"))


def run_guarded(script: Path, allow: list[str], workdir: Path) -> dict:
    """The command a user would type; its JSON report (with the wall time)."""
    report = workdir / f"{script.stem}.json"
    cmd = [sys.executable, "-m", "harness.guard", "--report", str(report)]
    cmd += ["--allow", ",".join(allow)] if allow else []
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    start = time.perf_counter()
    r = subprocess.run(cmd + [str(script)], cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - start
    if r.returncode != 0 or not report.exists():
        raise RuntimeError(f"{script.name} exited {r.returncode}:\n{r.stderr[-3000:]}")
    return {**json.loads(report.read_text()), "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/guard_study.py", description=__doc__.splitlines()[0])
    p.add_argument("--corpus", type=Path, default=CORPUS)
    args = p.parse_args(argv)
    rows, planted, hits, alarms = [], {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for script in scripts(args.corpus):
            truth, allow = labels(script)
            rep = run_guarded(script, allow, Path(tmp))
            found = {f["kind"] for f in rep["findings"]}
            for k in truth:
                planted[k] = planted.get(k, 0) + 1
                hits[k] = hits.get(k, 0) + (k in found)
            for k in found - truth:
                alarms.setdefault(k, []).append(script.name)
            verdict = "ok" if found == truth else "; ".join(
                ([f"missed {', '.join(sorted(truth - found))}"] if truth - found else [])
                + ([f"false alarm {', '.join(sorted(found - truth))}"] if found - truth else []))
            rows.append((script.name, ", ".join(sorted(truth)) or "none", ", ".join(sorted(found)) or "none",
                         " ".join(allow) or "", verdict, rep["seconds"]))
            print(f"{script.name}: {verdict} ({rep['seconds']:.1f} s)", file=sys.stderr)

    print("| script | true bugs | guard found | --allow | verdict | s |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]} | {r[5]:.1f} |")
    print("\n| finding | planted | found | recall | false alarms |\n|---|---|---|---|---|")
    for kind in FINDINGS:
        n, h, fa = planted.get(kind, 0), hits.get(kind, 0), alarms.get(kind, [])
        recall = f"{h / n:.0%}" if n else "-"
        print(f"| {kind} | {n} | {h} | {recall} | {len(fa)}{' (' + ', '.join(fa) + ')' if fa else ''} |")
    clean = [r for r in rows if r[1] == "none"]
    quiet = sum(r[2] == "none" for r in clean)
    missed = sum(planted.values()) - sum(hits.values())
    n_alarms = sum(len(v) for v in alarms.values())
    print(f"\n{len(rows)} scripts: {sum(hits.values())} of {sum(planted.values())} planted bugs found; "
          f"{quiet} of {len(clean)} correct scripts with no finding; {n_alarms} false alarm(s); "
          f"{sum(r[5] for r in rows):.0f} s in all")
    return 1 if missed or n_alarms else 0


if __name__ == "__main__":
    sys.exit(main())
