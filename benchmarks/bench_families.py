"""Model-family benchmark: SD 1.5, SD 2.1 and SDXL base at full geometry, random weights, offline.

Run: ``python benchmarks/bench_families.py [--families sd1,sd2,sdxl] [--size 128] [--steps 2] [--check]``
(``nox -s bench``; the slow test in tests/test_families.py runs it too). For each family, one after another
in one process (SDXL in bfloat16 holds ~7 GB while it runs):

1. Configs: the reference configs of :func:`evalkit.models.families.reference_configs` are written as a
   diffusers folder without weights; evalkit's loader reads its family from it, and the UNet's head names
   (built on the meta device) pick the shipped HRVs (``hrv: model``).
2. Weights: the pipeline is built with seeded random weights in ``--dtype``, saved with safetensors and
   loaded back through :func:`evalkit.models.load` (the family's pipeline class), unless ``--no-save``
   (1 GB shards: SDXL's run peaks at 7.7 GB of memory; its round trip takes 17 s on 2 cores).
3. Tracing: one untraced and one traced generation (same seed, ``--size`` px, ``--steps`` steps, guidance
   7.5) give bit-identical images (the untraced one runs first: its time includes paging in the loaded
   weights, so the two times are not an overhead measurement, see bench_trace.py for that); the trace
   covers every attn2 layer (SDXL: 70 layers, 1300 heads, the names of the published SDXL HRVs).
4. Attribution: every registered method maps both words; the maps must be finite. hrv-selective uses the
   shipped vectors that fit (SD 2.1 has none: a ramp over its heads stands in).

Benchmarks report, they do not assert: the exit code is 0 unless ``--check`` is given and a check fails.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from evalkit.methods import (  # noqa: E402
    HeadRelevance,
    available_methods,
    create_method,
    get_method_class,
    hrv_for_model,
)
from evalkit.models import load, model_family, resolve_dtype  # noqa: E402
from evalkit.models.families import FAMILIES, random_pipeline, reference_configs  # noqa: E402
from evalkit.trace import generate, model_head_names  # noqa: E402

PROMPT = "a photo of a cat sitting on a wooden chair"
WORDS = ("cat", "chair")
SEED = 0


def write_config_folder(family: str, folder: Path) -> Path:
    """A diffusers folder holding only configs (model_index.json, component config.json files): enough for
    evalkit to tell the family and the UNet's heads without weights."""
    cls = FAMILIES[family].pipeline
    configs = reference_configs(family)
    index = {"_class_name": cls, "_diffusers_version": "0.42.1"}
    for name, config in configs.items():
        sub = folder / name
        sub.mkdir(parents=True, exist_ok=True)
        kind = "scheduler_config.json" if name == "scheduler" else "config.json"
        (sub / kind).write_text(json.dumps(config, indent=1))
        index[name] = ["diffusers", config.get("_class_name", "?")]
    (folder / "model_index.json").write_text(json.dumps(index, indent=1))
    return folder


def _hrv(source: str | None, heads: list[str]) -> HeadRelevance:
    """The HRVs hrv-selective runs with: the shipped file that fits, else a ramp over the model's heads."""
    if source is not None:
        return HeadRelevance.load(source)
    ramp = tuple(float(i % 7) for i in range(len(heads)))
    return HeadRelevance(model="ramp", heads=tuple(heads), vectors={"Animals": ramp}, words={"Animals": ("cat",)})


def run_family(family: str, *, size: int = 128, steps: int = 2, dtype: str = "bfloat16", save: bool = True) -> dict:
    """Build, (save and load,) trace and attribute one family's reference geometry; returns measurements."""
    out: dict = {"family": family, "size": size, "steps": steps, "dtype": dtype}
    with tempfile.TemporaryDirectory(prefix=f"evalkit-bench-{family}-") as tmp:
        configs = write_config_folder(family, Path(tmp) / "configs")
        t0 = time.perf_counter()
        out["detected"] = model_family(str(configs)).name
        heads = model_head_names(str(configs))
        out["hrv"] = hrv_for_model(str(configs), heads)
        out["config_s"] = round(time.perf_counter() - t0, 3)
        t0 = time.perf_counter()
        pipe = random_pipeline(family, dtype=resolve_dtype(dtype), seed=SEED)
        out["build_s"] = round(time.perf_counter() - t0, 2)
        out["params_m"] = round(sum(p.numel() for p in pipe.unet.parameters()) / 1e6, 1)
        if save:
            t0 = time.perf_counter()
            pipe.save_pretrained(Path(tmp) / "weights", safe_serialization=True, max_shard_size="1GB")
            del pipe
            gc.collect()
            pipe = load(str(Path(tmp) / "weights"), dtype=dtype)
            out["save_load_s"] = round(time.perf_counter() - t0, 2)
            out["loaded_class"] = type(pipe).__name__
        out.update(_trace_and_attribute(pipe, heads, out["hrv"], size, steps))
    del pipe
    gc.collect()
    return out


def _trace_and_attribute(pipe, heads: list[str], hrv: str | None, size: int, steps: int) -> dict:
    """Untraced vs traced images, layer/head counts, and every method's maps of both words."""
    out: dict = {}
    t0 = time.perf_counter()
    plain = pipe(PROMPT, num_inference_steps=steps, guidance_scale=7.5, height=size, width=size,
                 generator=torch.Generator(device="cpu").manual_seed(SEED), output_type="pil").images[0]
    out["untraced_s"] = round(time.perf_counter() - t0, 2)
    methods = [create_method(name, **({"hrv": _hrv(hrv, heads)} if name == "hrv-selective" else {}))
               for name in available_methods() if get_method_class(name).__module__.startswith("evalkit.")
               and "unet" in get_method_class(name).backbones]
    stats = set().union(*(m.needs for m in methods))
    t0 = time.perf_counter()
    gen = generate(pipe, PROMPT, seeds=SEED, steps=steps, guidance=7.5, height=size, width=size, stats=stats)
    out["traced_s"] = round(time.perf_counter() - t0, 2)
    trace = gen.traces[0]
    out["identical"] = bool(np.array_equal(np.asarray(plain), np.asarray(gen.images[0])))
    out["layers"] = len(trace.layers)
    out["heads"] = len(trace.head_names())
    out["heads_match_config"] = trace.head_names() == heads
    t0 = time.perf_counter()
    finite = {}
    for m in methods:
        maps = m.attribute(trace, list(WORDS)).maps
        finite[m.name] = all(bool(torch.isfinite(maps[w]).all()) and maps[w].abs().sum() > 0 for w in WORDS)
    out["methods_s"] = round(time.perf_counter() - t0, 2)
    out["finite"] = finite
    return out


#: What each family's reference geometry must show.
EXPECTED = {"sd1": {"layers": 16, "heads": 128, "hrv": "sd14"}, "sd2": {"layers": 16, "heads": 195, "hrv": None},
            "sdxl": {"layers": 70, "heads": 1300, "hrv": "sdxl"}}


def problems(result: dict) -> list[str]:
    """The checks a family's result fails (empty: all passed)."""
    fam, want = result["family"], EXPECTED[result["family"]]
    bad = [f"{k} {result[k]!r} != {v!r}" for k, v in want.items() if result[k] != v]
    if result["detected"] != fam:
        bad.append(f"detected family {result['detected']!r}")
    if "loaded_class" in result and result["loaded_class"] != FAMILIES[fam].pipeline:
        bad.append(f"loaded as {result['loaded_class']}")
    if not result["identical"]:
        bad.append("traced image differs from the untraced one")
    if not result["heads_match_config"]:
        bad.append("traced heads differ from the config's")
    bad += [f"{name}: non-finite or empty map" for name, ok in result["finite"].items() if not ok]
    return bad


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    unets = [name for name, fam in FAMILIES.items() if fam.backbone == "unet"]  # full-size T5-XXL: too big on CPU
    ap.add_argument("--families", default=",".join(unets), help=f"comma-separated (default {','.join(unets)})")
    ap.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16", help="weights' dtype (default bfloat16: SDXL fits in ~7 GB)")
    ap.add_argument("--no-save", action="store_true", help="skip the save / evalkit.models.load round trip")
    ap.add_argument("--check", action="store_true", help="exit 1 when a check fails")
    args = ap.parse_args(argv)
    import diffusers.utils.logging as dlog

    dlog.disable_progress_bar()  # save_pretrained's shard bar
    failed = False
    for family in args.families.split(","):
        res = run_family(family, size=args.size, steps=args.steps, dtype=args.dtype, save=not args.no_save)
        bad = problems(res)
        failed |= bool(bad)
        print(json.dumps(res))
        print(f"{family}: {res['layers']} attn2 layers, {res['heads']} heads, hrv {res['hrv']}; build "
              f"{res['build_s']} s, save+load {res.get('save_load_s', '-')} s, untraced {res['untraced_s']} s, "
              f"traced {res['traced_s']} s, methods {res['methods_s']} s; "
              f"{'OK' if not bad else 'FAILED: ' + '; '.join(bad)}", flush=True)
    return 1 if failed and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
