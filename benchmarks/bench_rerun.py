"""Rerun benchmark: wall time of a suite's first run vs an identical second run (read from the store).

Run: ``python benchmarks/bench_rerun.py [--suite task-a] [--limit N] [--check]`` (``nox -s bench``).
Both runs are ``evalkit run`` subprocesses in one fresh temporary folder (empty case cache, empty
SQLite MLflow store), measured in the same invocation. #6's target: the rerun under 5 % of the first.
Benchmarks report, they do not assert: the exit code is 0 unless ``--check`` is given and the target
is missed (or the rerun recomputed something).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET = 0.05


def run_twice(suite: str, limit: int | None = None) -> dict:
    """Run ``suite`` twice in a fresh folder; returns the two wall times, their ratio and whether the
    second run was served from the store."""
    with tempfile.TemporaryDirectory(prefix="evalkit-bench-rerun-") as tmp:
        cmd = [sys.executable, "-m", "evalkit.cli", "run", suite, "--cache-dir", f"{tmp}/cache", "--reports-dir",
               f"{tmp}/reports", "--tracking-uri", f"sqlite:///{tmp}/mlflow.db", "--quiet"]
        if limit is not None:
            cmd += ["--limit", str(limit)]
        times, outs = [], []
        for _ in range(2):
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
            times.append(time.perf_counter() - t0)
            if proc.returncode not in (0, 1):  # 1: a claim failed, which is a result, not an error
                raise RuntimeError(f"evalkit run {suite} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
            outs.append(proc.stdout)
    return {"suite": suite, "limit": limit, "first_s": round(times[0], 3), "rerun_s": round(times[1], 3),
            "ratio": round(times[1] / times[0], 4), "rerun_from_store": "nothing recomputed" in outs[1]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--suite", default="task-a", help="suite name or YAML path")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--check", action="store_true", help=f"exit 1 unless rerun/first < {TARGET}")
    args = ap.parse_args(argv)
    res = run_twice(str(Path(args.suite).resolve()) if args.suite.endswith((".yaml", ".yml")) else args.suite,
                    args.limit)
    print(json.dumps(res))
    print(f"rerun / first run: {res['ratio']:.4f} ({res['rerun_s']:.2f} s / {res['first_s']:.1f} s; "
          f"target < {TARGET}; rerun from store: {res['rerun_from_store']})")
    ok = res["ratio"] < TARGET and res["rerun_from_store"]
    return 0 if ok or not args.check else 1


if __name__ == "__main__":
    sys.exit(main())
