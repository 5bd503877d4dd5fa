"""Run a suite: expand it into cases, generate and trace each (prompt, seed) once, compute every
method and metric from that one trace, cache each case atomically, reduce, and judge the claims."""

from __future__ import annotations

import functools
import hashlib
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .. import __version__
from ..items import Case, EvalItem
from ..methods import create_method
from ..metrics import MetricResult
from ..protocols import get_protocol
from ..protocols.attribution import compute_case, load_case_attribution, method_files, score_maps  # noqa: F401
from ..protocols.grounding import grounded_sam_stats
from ..trace import Trace
from .cache import CaseCache, content_key
from .claims import ClaimOutcome, judge_spec
from .executors import loaded_plugins, make_executor, progress_map
from .loader import SUITES_DIR
from .schema import TRACE_AUTO_LIMIT_MB, SuiteSpec
from .store import model_fingerprint, path_fingerprint, source_digest

PACKAGE = Path(__file__).resolve().parents[1]


def code_version() -> str:
    """evalkit's version plus a hash of the code that shapes a case's outputs."""
    files = [f for sub in ("trace", "methods", "interventions", "models") for f in (PACKAGE / sub).glob("*.py")]
    return f"{__version__}+{source_digest(files)[:12]}"


@dataclass
class SuiteResult:
    """Everything a suite run produced."""

    spec: SuiteSpec
    results: dict[tuple[str, str], MetricResult]
    claims: list[ClaimOutcome]
    cases: list[Case]
    case_dirs: list[Path]
    n_computed: int
    samples: list[dict] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)  # extra figures of protocol suites (report, MLflow)
    #: Items that belong to no row, with the reason (e.g. a word spaCy cannot tag has no POS group).
    unassigned: dict[str, str] = field(default_factory=dict)
    #: Per case, the maps entry of each method (attribution protocol).
    map_dirs: list[dict[str, Path]] = field(default_factory=list)
    #: Cache entries found corrupt (checksum mismatch) and recomputed.
    n_corrupt: int = 0
    #: Cases whose missing maps came from a stored trace (no generation).
    n_rescored: int = 0

    @property
    def passed(self) -> bool:
        """No claim FAILED (inconclusive claims do not fail a run unless ``--strict``)."""
        return not any(c.failed for c in self.claims)

    @property
    def n_cases(self) -> int:
        return len(self.cases)


def _cases(spec: SuiteSpec, items: list[EvalItem]) -> list[Case]:
    seeds = spec.seeds
    return [Case(item, s) for item in items for s in (seeds if seeds is not None else [item.seed])]


def run_suite(
    spec: SuiteSpec,
    *,
    cache_dir: str | Path = ".cache/evalkit",
    limit: int | None = None,
    progress: bool = True,
    pipe=None,
) -> SuiteResult:
    """Run ``spec``; cases already in the cache are read back, not recomputed."""
    protocol = get_protocol(spec.protocol)
    protocol.check(spec)
    spec = with_ground_truth_cache(spec, cache_dir)
    grounding = grounded_sam_stats() if spec.ground_truth.grounded_sam else None
    try:
        if not protocol.split_cache:
            return run_protocol(spec, cache_dir=cache_dir, limit=limit, progress=progress, pipe=pipe)
        return _run_attribution(spec, protocol, cache_dir=cache_dir, limit=limit, progress=progress, pipe=pipe)
    finally:
        if grounding is not None:
            report_grounding(spec, grounding)


def with_ground_truth_cache(spec: SuiteSpec, cache_dir: str | Path) -> SuiteSpec:
    """``spec`` with Grounded-SAM's mask cache defaulting to ``<cache_dir>/grounded-sam`` (no part of any key)."""
    gt = spec.ground_truth
    if not gt.grounded_sam or gt.cache is not None:
        return spec
    cache = str(Path(cache_dir) / "grounded-sam")
    return spec.model_copy(update={"ground_truth": gt.model_copy(update={"cache": cache})})


def ground_truth_key(spec: SuiteSpec) -> dict:
    """What of ``ground_truth`` shapes a case's masks, for its key: nothing for the data's own masks (their digest
    is in the key already); for Grounded-SAM its settings with fingerprints of local model files, not the cache."""
    gt = spec.ground_truth
    if not gt.grounded_sam:
        return {}
    settings = gt.model_dump(exclude={"cache"})
    settings["files"] = {k: path_fingerprint(settings[k]) for k in ("detector", "segmenter")
                         if Path(settings[k]).exists()}
    return {"ground_truth": settings}


def report_grounding(spec: SuiteSpec, before: dict[str, int]) -> None:
    """One line on the Grounded-SAM masks this run needed (cases read from the case cache need none)."""
    now = grounded_sam_stats()
    done = {k: now[k] - before[k] for k in now}
    if done["cache_hits"] or done["computed"]:
        tqdm.write(f"evalkit: grounded-sam ground truth: {done['computed']} word masks computed ({done['no_box']} "
                   f"without a box above the thresholds), {done['cache_hits']} read from its cache "
                   f"{spec.ground_truth.cache}", file=sys.stderr)


def _run_attribution(spec: SuiteSpec, protocol, *, cache_dir: str | Path, limit: int | None, progress: bool,
                     pipe) -> SuiteResult:
    """The attribution protocol's run: split cache entries (case, maps per method, trace), scored from the maps."""
    items = protocol.items(spec, limit, SUITES_DIR)
    cases = _cases(spec, items)
    methods = {m.label: create_method(m.name, **m.params) for m in spec.methods}
    code = code_version()
    # a case entry (image, masks, metadata) does not depend on the methods; each method's maps are an
    # entry of their own, so a subset of methods, or another method next to cached ones, re-scores
    # without generating whatever is cached
    base = {"model": model_fingerprint(spec.model), "dtype": spec.dtype, "sampler": spec.sampler.model_dump(),
            "options": spec.options, "code": code, **ground_truth_key(spec)}
    cache, maps = CaseCache(cache_dir), CaseCache(Path(cache_dir) / "maps")
    traces = CaseCache(Path(cache_dir) / "traces")
    key_cases(cases, base)
    map_keys = {label: {c.key: content_key({"case": c.key, "method": m.name, "params": m.params(), "code": code})
                        for c in cases} for label, m in methods.items()}
    todo = []
    for case in cases:
        missing = [label for label in methods if maps.load(map_keys[label][case.key]) is None]
        have_case = cache.load(case.key) is not None
        if missing or not have_case:
            todo.append((case, missing, have_case))
    # the statistics every method of the suite reads: a trace stored with them serves any of its methods
    suite_stats = set().union(*(m.needs for m in methods.values())) if methods else set()
    rescore = _rescore_from_traces(spec, todo, methods, traces, maps, map_keys, progress)
    todo = [t for t in todo if t[0].key not in rescore]
    jobs = []
    for case, missing, _ in todo:
        stored = traces.load(case.key)
        stats = suite_stats | (Trace.stored_stats(stored) if stored is not None else set())
        jobs.append((case, {m: methods[m] for m in missing}, sorted(stats)))
    executor = make_executor(spec, functools.partial(_load_pipe, spec), pipe, plugins=loaded_plugins())
    try:
        with tqdm(total=len(cases), desc=f"{spec.name}: cases", disable=not progress, unit="case") as bar:
            bar.update(len(cases) - len(todo))
            keep = None
            compute = functools.partial(_attribution_job, spec)
            for i, (files, per_method, trace_files) in progress_map(executor, compute, jobs, bar):
                case, _, have_case = todo[i]
                for label, mfiles in per_method.items():  # maps first: a stored case entry means a complete case
                    maps.store(map_keys[label][case.key], mfiles)
                if trace_files is not None:
                    keep = _keep_trace(spec, trace_files) if keep is None else keep  # one size per suite
                    if keep:
                        traces.store(case.key, trace_files)
                if not have_case:
                    cache.store(case.key, files)
    finally:
        executor.close()
    dirs = [cache.path(c.key) for c in cases]
    map_dirs = [{label: maps.path(map_keys[label][c.key]) for label in methods} for c in cases]
    results, samples = score_maps(spec, cases, dirs, map_dirs)
    return SuiteResult(spec, results, judge_spec(spec, results), cases, dirs, len(todo), samples,
                       map_dirs=map_dirs, n_corrupt=cache.n_corrupt + maps.n_corrupt + traces.n_corrupt,
                       n_rescored=len(rescore))


def _attribution_job(spec: SuiteSpec, pipe, job: tuple) -> tuple[dict, dict[str, dict], dict | None]:
    """Compute one attribution case (``job``: case, methods still missing, statistics to record) on ``pipe``:
    the case entry's files, each method's maps entry, and the trace's files (None when nothing was traced).
    Files only, so that a Ray actor can send them back."""
    case, methods, stats = job
    files, per_method, trace = compute_case(pipe, spec, case, methods, set(stats))
    return files, per_method, (trace.to_files() if trace.stats else None)


def _keep_trace(spec: SuiteSpec, trace_files: dict) -> bool:
    """Whether the suite's traces go into the cache (``store_traces``); ``auto`` skips large traces and
    says so."""
    if spec.store_traces != "auto":
        return bool(spec.store_traces)
    mb = len(trace_files["trace.safetensors"]) / 2**20
    if mb <= TRACE_AUTO_LIMIT_MB:
        return True
    tqdm.write(f"evalkit: traces are not cached ({mb:.0f} MB per case > {TRACE_AUTO_LIMIT_MB:.0f} MB); set "
               "`store_traces: true` in the suite to keep them (a method added later then re-scores without "
               "generating)", file=sys.stderr)
    return False


def _rescore_from_traces(spec: SuiteSpec, todo: list, methods: dict, traces: CaseCache, maps: CaseCache,
                         map_keys: dict, progress: bool) -> set[str]:
    """Compute the missing maps of cached cases from their stored traces, without generating: every case
    whose trace holds what its missing methods read. Returns the keys of the cases served this way."""
    served: dict[str, Path] = {}
    for case, missing, have_case in todo:
        if not have_case:
            continue
        stored = traces.load(case.key)
        if stored is not None and set().union(*(methods[m].needs for m in missing)) <= Trace.stored_stats(stored):
            served[case.key] = stored
    if not served:
        return set()
    from ..trace.joint import model_tokenizer

    tokenizer = model_tokenizer(spec.model)
    with tqdm(total=len(served), desc=f"{spec.name}: re-scoring stored traces", disable=not progress,
              unit="case") as bar:
        for case, missing, _ in todo:
            if case.key not in served:
                continue
            trace = Trace.load(served[case.key], tokenizer)
            for label in missing:
                maps.store(map_keys[label][case.key], method_files(methods[label], trace, case.item.words))
            bar.update(1)
    return set(served)


def key_cases(cases: list[Case], base: dict) -> None:
    """Key every case: ``base`` + prompt, seed, words and a digest of its masks."""
    for case in cases:
        digests = {w: hashlib.sha256(np.packbits(m).tobytes()).hexdigest()[:16] for w, m in case.item.masks.items()}
        case.key = content_key({**base, "prompt": case.item.prompt, "seed": case.seed, "words": case.item.words,
                                "masks": digests})


def _load_pipe(spec: SuiteSpec):
    from ..models import load

    return load(spec.model, scheduler=spec.sampler.scheduler, dtype=spec.dtype, device=spec.device)


def run_cases(spec: SuiteSpec, cases: list[Case], base: dict, cache_dir: str | Path, pipe, progress: bool,
              compute) -> tuple[int, list[Path], int]:
    """Key every case (``base`` + prompt, seed, words and a digest of its masks), compute the
    missing ones with ``compute(pipe, case) -> files`` and store each atomically; the pipeline is
    loaded only when something is missing. Returns (number computed, entry folders, corrupt entries
    found and recomputed)."""
    cache = CaseCache(cache_dir)
    key_cases(cases, base)
    todo = [c for c in cases if cache.load(c.key) is None]
    executor = make_executor(spec, functools.partial(_load_pipe, spec), pipe, plugins=loaded_plugins())
    try:
        with tqdm(total=len(cases), desc=f"{spec.name}: cases", disable=not progress, unit="case") as bar:
            bar.update(len(cases) - len(todo))
            for i, files in progress_map(executor, compute, todo, bar):
                cache.store(todo[i].key, files)
    finally:
        executor.close()
    return len(todo), [cache.path(c.key) for c in cases], cache.n_corrupt


def protocol_code_version() -> str:
    """Hash of the protocols and the analysis code they use (part of every protocol case key)."""
    return source_digest([*(PACKAGE / "protocols").glob("*.py"), *(PACKAGE / "analysis").glob("*.py")])[:12]


def run_protocol(spec: SuiteSpec, *, cache_dir: str | Path = ".cache/evalkit", limit: int | None = None,
                 progress: bool = True, pipe=None) -> SuiteResult:
    """Run a suite whose protocol stores one entry per case (every protocol but attribution); cases
    already in the cache are read back. The result's ``spec`` lists the rows as methods (one MLflow child
    run per row) and its ``figures`` are the protocol's figures."""
    from .schema import MethodSpec

    protocol = get_protocol(spec.protocol)
    protocol.check(spec)
    methods = {m.label: create_method(m.name, **m.params) for m in spec.methods}
    stats = sorted(set(protocol.extra_stats).union(*(m.needs for m in methods.values())))
    items = protocol.items(spec, limit, SUITES_DIR)
    cases = _cases(spec, items)
    base = {
        "protocol": spec.protocol,
        "model": model_fingerprint(spec.model),
        "dtype": spec.dtype,
        "sampler": spec.sampler.model_dump(),
        "stats": stats,
        "methods": {m.label: {"name": m.name, "params": methods[m.label].params()} for m in spec.methods},
        **protocol.cache_key(spec),
        **ground_truth_key(spec),
        "options": spec.options,
        "code": code_version(),
        "protocol_code": protocol_code_version(),
    }
    n_computed, dirs, n_corrupt = run_cases(spec, cases, base, cache_dir, pipe, progress,
                                            lambda p, case: protocol.compute(p, spec, case, methods, stats))
    scores = protocol.score(spec, cases, dirs, Path(cache_dir) / "figures" / spec.name)
    result_spec = spec
    if protocol.rows == "variants":
        name = spec.methods[0].name
        result_spec = spec.model_copy(update={"methods": [MethodSpec(name=name, id=v.id, params=v.params)
                                                          for v in spec.variants]})
    return SuiteResult(result_spec, scores.results, judge_spec(spec, scores.results), cases, dirs, n_computed,
                       scores.samples, figures=list(scores.figures), unassigned=scores.unassigned,
                       n_corrupt=n_corrupt)


def result_rows(result: SuiteResult) -> list[dict]:
    """The result table as rows: method, metric, direction, value, CI95, n, excluded (with reasons)."""
    rows = []
    for (method, metric), r in result.results.items():
        rows.append({"method": method, "metric": metric, "direction": r.direction, "value": r.value,
                     "ci95_low": r.ci95[0] if r.ci95 else None, "ci95_high": r.ci95[1] if r.ci95 else None,
                     "n": r.n, "excluded": r.n_excluded, "reduction": r.reduction,
                     "excluded_reasons": r.reason_counts()})
    return rows


def item_rows(result: SuiteResult) -> list[dict]:
    """Every per-item value of every (row, metric): item key, value (None when excluded), the
    numerator and denominator of pooled metrics, and the reason an excluded item was left out."""
    out = []
    for (method, metric), r in result.results.items():
        pooled = len(r.numerators) == len(r.per_sample) and r.reduction == "pooled"
        for i, (key, v) in enumerate(zip(r.item_keys(), r.per_sample)):
            ok = math.isfinite(v)
            out.append({"method": method, "metric": metric, "item": key, "value": v if ok else None,
                        "numerator": r.numerators[i] if pooled and ok else None,
                        "denominator": r.denominators[i] if pooled and ok else None,
                        "reduction": r.reduction, "excluded": "" if ok else r.reasons.get(key, "undefined")})
    return out


def save_image_grid(result: SuiteResult, path: Path, max_cases: int = 8) -> Path:
    """The overlay grid of the first ``max_cases`` cases (every evaluated word, each method's map with the
    ground-truth outline, full prompts) as one PNG; drawn by :func:`evalkit.reports.overlays.save_overlay_grid`."""
    from ..reports.overlays import save_overlay_grid

    return save_overlay_grid(result, path, max_cases)


def dump_json(obj, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=1, default=str))
