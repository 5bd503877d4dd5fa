"""MLflow logging of suite runs: one parent run per suite invocation, one nested run per method
configuration; params, metrics (with CI bounds), tags, and artifacts (tables, figures).

The tracking store defaults to ``sqlite:///mlflow.db`` in the working directory unless
``MLFLOW_TRACKING_URI`` (or ``tracking_uri=``) says otherwise. Run ids are remembered in the
suite's state file, keyed by the invocation, so a resumed or repeated invocation logs into the
same runs instead of creating duplicates.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

from .. import __version__


def default_tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` or a SQLite file in the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def metric_key(label: str) -> str:
    """The MLflow metric name of a label: the label itself (:mod:`evalkit.labels` spells labels MLflow-safe);
    a user-chosen ``id:`` with other characters gets them replaced by ``_``."""
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", label)


def git_commit() -> str:
    """The commit of the source checkout evalkit runs from; "unknown" for an installed wheel (whose folder may sit
    inside some other repository, whose commit says nothing about evalkit), without git, or on any git error."""
    from ..resources import source_checkout

    root = source_checkout()
    if root is None:
        return "unknown"
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False, cwd=root,
                             timeout=30)
        return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class _RunState:
    """Run ids per invocation key, stored as JSON next to the cache."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {}

    def get(self, key: str) -> dict:
        return self.data.get(key, {})

    def put(self, key: str, value: dict) -> None:
        self.data[key] = value
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)


def log_suite(result, *, invocation_key: str, state_file: Path, tracking_uri: str | None = None,
              artifacts: list[Path] = (), samples_table: list[dict] | None = None,
              items: list[dict] | None = None) -> dict:
    """Log ``result`` (a SuiteResult); returns ``{"parent": run_id, "<method>": run_id, ...}``.

    Parent run: claim verdicts (``claims_passed/_failed/_inconclusive``; per claim ``claim<i>.diff``,
    ``.ci_low``, ``.ci_high``, ``.n``, ``.verdict`` = 1 passed / 0 inconclusive / -1 failed, and the
    claim's line as tag ``claim<i>``; a ``claims.json`` table). Child runs: each metric's value, CI,
    n and n_excluded, and an ``items.json`` table of its per-item values. NaN values are logged as NaN."""
    from mlflow.tracking import MlflowClient

    uri = tracking_uri or default_tracking_uri()
    client = MlflowClient(uri)  # not mlflow.set_tracking_uri: that changes the process (and its env) for good
    spec = result.spec
    experiment = f"evalkit/{spec.name}"
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp is not None else client.create_experiment(experiment, tags=EXPERIMENT_TAGS)
    if exp is not None and exp.tags.get(EXPERIMENT_KIND) is None:
        client.set_experiment_tag(exp_id, EXPERIMENT_KIND, EXPERIMENT_TAGS[EXPERIMENT_KIND])
    state = _RunState(state_file)
    known = state.get(invocation_key)

    def run_for(name: str, parent: str | None) -> str:
        rid = known.get(name)
        if rid is not None:
            try:
                client.get_run(rid)
                return rid
            except Exception:  # noqa: BLE001 - deleted or from another store: make a new one
                pass
        tags = {"suite": spec.name, "model": spec.model, "git_commit": git_commit(), "evalkit_version": __version__,
                "evalkit.role": "suite" if parent is None else "method"}
        if parent is not None:
            tags["mlflow.parentRunId"] = parent
            tags["method"] = name
        run = client.create_run(exp_id, run_name=parent_run_name(spec, len(result.cases)) if parent is None else name,
                                tags=tags)
        known[name] = run.info.run_id
        state.put(invocation_key, known)
        return run.info.run_id

    parent = run_for("parent", None)
    sampler = spec.sampler.model_dump()
    params = {"model": spec.model, "data.source": spec.data.source, "data.n": len(result.cases),
              **{f"sampler.{k}": v for k, v in sampler.items()}}
    ids = {"parent": parent}
    batches: dict[str, tuple[dict, dict]] = {parent: (params, {})}
    for m in spec.methods:
        rid = run_for(m.label, parent)
        ids[m.label] = rid
        values: dict[str, float] = {}
        for (method, metric), r in result.results.items():
            if method != m.label:
                continue
            key = metric_key(metric)
            values[key] = r.value
            if r.ci95:
                values[f"{key}.ci95_low"], values[f"{key}.ci95_high"] = r.ci95
            values[f"{key}.n"] = r.n
            values[f"{key}.n_excluded"] = r.n_excluded
        batches[rid] = ({"method": m.name, **{f"param.{k}": v for k, v in m.params.items()}}, values)
    claim_metrics, claim_tags = _claim_metrics(result.claims)
    batches[parent][1].update(claim_metrics)
    # every method's headline numbers on the suite run too, so suite runs of two models line up in the
    # runs table and in the compare view: "<method>/<metric>"
    batches[parent][1].update({f"{method}/{metric_key(metric)}": r.value
                               for (method, metric), r in result.results.items()})
    claim_tags["mlflow.note.content"] = _description(result)
    batches[parent][0].update({"claims.confidence": spec.confidence, "claims.correction": spec.correction,
                               "claims.min_n": spec.min_n, "claims.resamples": spec.resamples})
    for rid, (p, v) in batches.items():
        _log_batch(client, rid, p, v)
    for k, v in claim_tags.items():
        client.set_tag(parent, k, v)
    for path in artifacts:
        if Path(path).is_file():
            client.log_artifact(parent, str(path))
    if samples_table:
        _log_table(client, parent, samples_table, "samples.json")
    if result.claims:
        _log_table(client, parent, [c.to_dict() for c in result.claims], "claims.json")
    for m in spec.methods:
        mine = [r for r in items or [] if r["method"] == m.label]
        if mine:
            _log_table(client, ids[m.label], mine, "items.json")
    for rid in ids.values():  # a re-log into a finished run keeps its end time (and so its duration)
        if client.get_run(rid).info.status != "FINISHED":
            client.set_terminated(rid, "FINISHED")
    state.data.setdefault("_complete", {})[invocation_key] = parent  # everything is logged
    state.put(invocation_key, known)
    return ids


_VERDICT_CODE = {"PASSED": 1.0, "INCONCLUSIVE": 0.0, "FAILED": -1.0}
#: MLflow 3 shows an experiment of this kind with its runs table (not the GenAI overview).
EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_TAGS = {EXPERIMENT_KIND: "custom_model_development"}


def parent_run_name(spec, n_cases: int) -> str:
    """What tells suite runs apart in the runs table: suite, model, cases and a short UTC time."""
    from datetime import datetime, timezone

    model = spec.model if len(spec.model) <= 40 else "..." + spec.model[-37:]
    return f"{spec.name} | {model} | n={n_cases} | {datetime.now(timezone.utc):%m-%d %H:%M}"


def _description(result) -> str:
    """The suite run's description (markdown): the verdict summary and every claim's line."""
    from ..suites.claims import summary_line

    lines = [f"**{result.spec.name}** on `{result.spec.model}`, {len(result.cases)} cases: "
             f"{summary_line(result.claims) if result.claims else 'no claims'}", ""]
    lines += [f"- `{c.line()}`" for c in result.claims]
    return "\n".join(lines)[:4900]


def _claim_metrics(claims) -> tuple[dict[str, float], dict[str, str]]:
    """Parent-run metrics and tags of the claims' verdicts (see :func:`log_suite`)."""
    counts = {v: sum(c.verdict == v for c in claims) for v in _VERDICT_CODE}
    metrics: dict[str, float] = {"claims_passed": counts["PASSED"], "claims_failed": counts["FAILED"],
                                 "claims_inconclusive": counts["INCONCLUSIVE"]}
    tags = {}
    for i, c in enumerate(claims):
        metrics.update({f"claim{i}.verdict": _VERDICT_CODE[c.verdict], f"claim{i}.diff": c.diff,
                        f"claim{i}.ci_low": c.ci[0] if c.ci else float("nan"),
                        f"claim{i}.ci_high": c.ci[1] if c.ci else float("nan"), f"claim{i}.n": c.n})
        tags[f"claim{i}"] = c.line()[:4000]
    return metrics, tags


def _log_table(client, run_id: str, rows: list[dict], name: str) -> None:
    """A table artifact in MLflow's table layout (``columns`` + ``data`` rows), written whole: unlike
    ``log_table``, which appends to an existing table, re-logging a run never duplicates rows."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    client.log_dict(run_id, {"columns": keys, "data": [[_plain(r.get(k)) for k in keys] for r in rows]}, name)


def _plain(v):
    if isinstance(v, float) and v != v:
        return None  # JSON has no NaN
    return v if isinstance(v, (str, int, float, bool, type(None))) else json.dumps(v, default=str)


def _log_batch(client, run_id: str, params: dict, metrics: dict) -> None:
    """Log params and metrics in one request, skipping what the run already holds (so a resumed
    or repeated invocation adds no duplicate points)."""
    import math
    import time

    from mlflow.entities import Metric, Param

    data = client.get_run(run_id).data
    now = int(time.time() * 1000)
    new_params = [Param(k, str(v)[:500]) for k, v in params.items() if k not in data.params]
    def same(old, new: float) -> bool:
        return old is not None and (old == new or (math.isnan(old) and math.isnan(new)))

    new_metrics = [Metric(k, float(v), now, 0) for k, v in metrics.items()
                   if v is not None and not same(data.metrics.get(k), float(v))]  # NaN is logged as NaN
    if new_params or new_metrics:
        client.log_batch(run_id, metrics=new_metrics, params=new_params)
