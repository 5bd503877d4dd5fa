"""``evalkit compare A B``: paired differences between two finished runs (report folders or MLflow run
ids), per method and metric, over the items both runs scored, with seeded percentile-bootstrap
intervals (the same statistics as claims; see :mod:`evalkit.stats`). Nothing here imports torch."""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .. import stats
from . import read_items_csv


@dataclass(frozen=True)
class PairedDifference:
    """One (method, metric) both runs have: their statistics over the shared items, A - B and its interval."""

    method: str
    metric: str
    n: int
    a: float
    b: float
    diff: float
    ci: tuple[float, float] | None
    n_only_a: int
    n_only_b: int


def _from_mlflow(run_id: str, tracking_uri: str | None) -> list[dict]:
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from ..tracking import default_tracking_uri

    uri = tracking_uri or default_tracking_uri()
    client = MlflowClient(uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        raise ValueError(f"{run_id!r} is neither a report folder nor a run id in the MLflow store {uri} "
                         f"(pass a reports/<suite>/<timestamp> folder, or --tracking-uri)") from err
    rid = run.data.tags.get("mlflow.parentRunId", run_id)  # a method's run: its suite's parent holds the table
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(run_id=rid, artifact_path="items.csv", dst_path=tmp,
                                                       tracking_uri=uri)
        except (MlflowException, OSError) as err:
            raise ValueError(f"MLflow run {rid} has no items.csv artifact (logged by evalkit since per-item "
                             "values are kept); rerun its suite") from err
        return read_items_csv(Path(path))


def load_run_items(source: str, tracking_uri: str | None = None) -> list[dict]:
    """Per-item rows of a report folder (its items.csv) or an MLflow run id (its items.csv artifact)."""
    p = Path(source)
    if p.is_dir() or p.suffix == ".csv":
        csv = p / "items.csv" if p.is_dir() else p
        if not csv.is_file():
            raise FileNotFoundError(f"{source}: no items.csv; pass a reports/<suite>/<timestamp> folder written "
                                    "by a version of evalkit that keeps per-item values")
        return read_items_csv(csv)
    return _from_mlflow(source, tracking_uri)


def _rows(items: list[dict]) -> dict[tuple[str, str], stats.RowSample]:
    grouped: dict[tuple[str, str], list[dict]] = {}
    for r in items:
        grouped.setdefault((r["method"], r["metric"]), []).append(r)
    out = {}
    for key, rs in grouped.items():
        pooled = all(r.get("reduction") == "pooled" for r in rs) and all(
            r["numerator"] is not None for r in rs if r["value"] is not None)
        vals = [math.nan if r["value"] is None else r["value"] for r in rs]
        num = [math.nan if r["numerator"] is None else r["numerator"] for r in rs] if pooled else None
        den = [math.nan if r["denominator"] is None else r["denominator"] for r in rs] if pooled else None
        out[key] = stats.RowSample.build([r["item"] for r in rs], vals, "pooled" if pooled else "per-sample",
                                         num, den)
    return out


def compare_items(a: list[dict], b: list[dict], *, confidence: float = 0.95,
                  resamples: int = stats.N_RESAMPLES) -> list[PairedDifference]:
    """Paired A - B per (method, metric) both runs have, over their shared valid items; a ValueError
    when the runs share no (method, metric, item) at all."""
    ra, rb = _rows(a), _rows(b)
    out = []
    for key in [k for k in ra if k in rb]:
        va, vb = ra[key].valid(), rb[key].valid()
        shared = [k for k in va if k in vb]
        if not shared:
            continue
        comp = stats.compare_rows(ra[key], rb[key], n_resamples=resamples, seed=stats.seed_for(".".join(key)))
        out.append(PairedDifference(key[0], key[1], comp.n, comp.left, comp.right, comp.diff,
                                    comp.interval(confidence), len(va) - len(shared), len(vb) - len(shared)))
    if not out:
        common = sorted({f"{m}.{k}" for m, k in ra} & {f"{m}.{k}" for m, k in rb})
        what = (f"they have {len(common)} method.metric rows in common but no scored item in common "
                "(different prompts, seeds or words)") if common else "they have no method.metric row in common"
        raise ValueError(f"the two runs share no items to pair: {what}; compare runs of the same suite and data")
    return out


def print_comparison(diffs: list[PairedDifference], label_a: str, label_b: str, confidence: float) -> None:
    """The paired differences as a table."""
    import sys

    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 150)
    table = Table(title=f"A = {label_a}\nB = {label_b}\npaired over shared items, {100 * confidence:.4g}% "
                        "percentile-bootstrap CI of A - B (not corrected for multiplicity)")
    for h in ("method", "metric", "n", "A", "B", "A - B", "CI", "only A", "only B"):
        table.add_column(h, no_wrap=True)
    for d in diffs:
        ci = "–" if d.ci is None else f"[{d.ci[0]:+.4f}, {d.ci[1]:+.4f}]"
        table.add_row(d.method, d.metric, str(d.n), f"{d.a:.4f}", f"{d.b:.4f}", f"{d.diff:+.4f}", ci,
                      str(d.n_only_a), str(d.n_only_b))
    console.print(table)
