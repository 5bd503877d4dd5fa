"""Ray benchmark: the same suite computed by the local executor and by Ray actors, cases per second each.

Run: ``python benchmarks/bench_ray.py [--suite task-a] [--limit 8] [--actors 2]`` (part of ``nox -s bench``).
Both runs start from an empty case cache in one fresh folder, in this process (the Ray cluster is local).
Reported, not asserted. On a 2-core machine two actors cannot beat one process much: each actor runs torch
with the driver's thread count (so CPU results stay bit-identical), the two compete for the same two cores,
and every actor loads its own pipeline; the ratio shows that fixed cost, not the cluster's scaling.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time


def measure(suite: str, limit: int, actors: int) -> dict:
    """Wall time and cases/s of a local run and a Ray run of ``suite`` (first ``limit`` items)."""
    from evalkit.suites import load_suite, run_suite

    spec = load_suite(suite)
    out: dict = {"suite": suite, "limit": limit, "actors": actors}
    with tempfile.TemporaryDirectory(prefix="evalkit-bench-ray-") as tmp:
        t0 = time.perf_counter()
        local = run_suite(spec, cache_dir=f"{tmp}/local", limit=limit, progress=False)
        out["local_s"] = round(time.perf_counter() - t0, 2)
        ray_spec = spec.model_copy(update={"executor": "ray", "ray": spec.ray.model_copy(update={"actors": actors})})
        t0 = time.perf_counter()
        remote = run_suite(ray_spec, cache_dir=f"{tmp}/ray", limit=limit, progress=False)
        out["ray_s"] = round(time.perf_counter() - t0, 2)
    n = local.n_cases
    out["cases"] = n
    out["local_cases_per_s"] = round(n / out["local_s"], 3)
    out["ray_cases_per_s"] = round(n / out["ray_s"], 3)
    out["ray_over_local_speed"] = round(out["ray_cases_per_s"] / out["local_cases_per_s"], 3)
    out["identical"] = all(remote.results[k].per_sample == r.per_sample for k, r in local.results.items())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="task-a")
    parser.add_argument("--limit", type=int, default=8)
    parser.add_argument("--actors", type=int, default=2)
    args = parser.parse_args()
    try:
        import ray  # noqa: F401
    except ImportError:
        print("bench_ray: Ray is not installed (pip install 'evalkit[ray]'); skipped")
        return
    print(json.dumps(measure(args.suite, args.limit, args.actors), indent=1))


if __name__ == "__main__":
    main()
