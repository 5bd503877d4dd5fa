"""The suite file schema (pydantic): what a YAML suite may say, with defaults and validation."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..labels import metric_label


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SamplerSpec(_Strict):
    """How images are generated: scheduler, steps, guidance and size (None: the model's default)."""

    scheduler: str | None = None
    steps: int = Field(20, ge=1)
    guidance: float = Field(7.5, ge=0.0)
    height: int | None = Field(None, ge=8)
    width: int | None = Field(None, ge=8)


class DataSpec(_Strict):
    """Where prompts, seeds and masks come from.

    ``shapesworld``: ``n`` generated scenes (``seed``, ``n_objects``, ``size``) with exact masks.
    ``coco``: a COCO-format JSON (``path``) whose images carry ``prompt`` and ``seed``.
    ``daam``: a DAAM experiment folder (``path``), converted to COCO on the fly.
    """

    source: Literal["shapesworld", "coco", "daam"] = "shapesworld"
    path: str | None = None
    n: int = Field(20, ge=1)
    seed: int = 0
    size: int = 64
    n_objects: int | list[int] | None = None
    phrasing: Literal["random", "plain"] = "random"
    words: Literal["nouns", "all"] = "nouns"


class MethodSpec(_Strict):
    """One method configuration: a registered method ``name`` with ``params``; ``id`` labels it in
    results and claims (default: the name)."""

    name: str
    id: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)

    @property
    def label(self) -> str:
        """The id used in tables, claims and MLflow run names."""
        return self.id or self.name


class MetricSpec(_Strict):
    """One metric configuration: a registered metric ``name`` with ``params`` (e.g. ``tau``); ``id``
    names it in claims (default: name plus parameters, e.g. ``miou-inf_tau0.4``)."""

    name: str
    id: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)

    @property
    def label(self) -> str:
        """The id, else :func:`evalkit.labels.metric_label` (``miou-inf_tau0.4``), the one spelling."""
        return self.id or metric_label(self.name, self.params)


# -- protocol suites (evalkit.protocols) ---------------------------------------------------------
class RaySpec(_Strict):
    """The Ray executor's settings: cluster ``address`` (None: start a local cluster), number of ``actors``
    (each holds one loaded pipeline), CPUs and GPUs reserved per actor, cases per batch, and torch threads
    per actor (None: the driver's count, so that CPU results equal a local run's bit for bit)."""

    address: str | None = None
    actors: int = Field(2, ge=1)
    num_cpus: float = Field(1.0, ge=0.0)
    num_gpus: float = Field(0.0, ge=0.0)
    batch_size: int = Field(4, ge=1)
    threads: int | None = Field(None, ge=1)


class VariantSpec(_Strict):
    """One row of a protocol suite (e.g. ``fixed-seed``, ``top-5``, ``NOUN``): ``id`` names it in results
    and claims; ``params`` configure it (see the protocol's documentation)."""

    id: str
    params: dict[str, Any] = Field(default_factory=dict)


#: Largest trace (MB per case) that ``store_traces: auto`` keeps.
TRACE_AUTO_LIMIT_MB = 16.0


class SuiteSpec(_Strict):
    """A whole suite after ``include:`` resolution."""

    name: str
    description: str = ""
    #: A registered protocol (``evalkit protocols`` lists them; plugins add theirs). Checked with its options
    #: and rows by :func:`evalkit.suites.load_suite` (not here: validating a stored suite imports no torch).
    protocol: str = "attribution"
    variants: list[VariantSpec] = Field(default_factory=list)
    options: dict[str, Any] = Field(default_factory=dict)
    model: str = "shapesworld"
    device: str = "cpu"
    dtype: str = "float32"
    sampler: SamplerSpec = Field(default_factory=SamplerSpec)
    seeds: list[int] | None = None
    data: DataSpec = Field(default_factory=DataSpec)
    ground_truth: Literal["exact", "coco", "grounded-sam"] = "exact"
    methods: list[MethodSpec]
    metrics: list[MetricSpec]
    expect: list[str] = Field(default_factory=list)
    #: How claims are decided (docs/suites.md, "Verdicts"): interval confidence, multiplicity
    #: correction over the suite's claims, fewest valid items a claim needs, bootstrap resamples.
    confidence: float = Field(0.95, gt=0.5, lt=1.0)
    correction: Literal["holm", "none"] = "holm"
    min_n: int = Field(10, ge=2)
    resamples: int = Field(10_000, ge=10_000)
    #: Keep each case's trace statistics (float32 safetensors) in the cache, so a method added later whose
    #: statistics were recorded re-scores without generating. ``auto``: only traces of at most
    #: ``TRACE_AUTO_LIMIT_MB`` per case (built-in models: ~3.5 MB; SD 1.5 at 512 px: ~70 MB per statistic).
    #: Not part of any cache key.
    store_traces: bool | Literal["auto"] = "auto"
    #: Where cases are computed (:mod:`evalkit.suites.executors`): this process, or actors on a Ray cluster.
    #: Neither changes a result, so neither is part of a cache key.
    executor: Literal["local", "ray"] = "local"
    ray: RaySpec = Field(default_factory=RaySpec)

    @field_validator("methods", "metrics")
    @classmethod
    def _unique_labels(cls, value: list) -> list:
        labels = [v.label for v in value]
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise ValueError(f"labels must be unique, repeated: {dup}; give each configuration an `id:`")
        return value

    @field_validator("variants")
    @classmethod
    def _unique_variants(cls, value: list) -> list:
        ids = [v.id for v in value]
        dup = sorted({x for x in ids if ids.count(x) > 1})
        if dup:
            raise ValueError(f"variant ids must be unique, repeated: {dup}")
        return value

    def row_labels(self) -> list[str]:
        """The row ids of results and claims: the variants' ids when there are variants, else the methods'."""
        return [v.id for v in self.variants] if self.variants else [m.label for m in self.methods]
