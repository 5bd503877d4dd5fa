"""The suite file schema (pydantic): what a YAML suite may say, with defaults and validation."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..labels import metric_label


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SamplerSpec(_Strict):
    """How images are generated: scheduler, steps, guidance and size (None: the model's default); on MM-DiT
    models (SD3, Flux) ``reading`` says how the joint attention's image-query x text-key block is read:
    ``joint`` probabilities as computed, or ``text``: renormalized over the text keys (see evalkit.trace.joint)."""

    scheduler: str | None = None
    steps: int = Field(20, ge=1)
    guidance: float = Field(7.5, ge=0.0)
    height: int | None = Field(None, ge=8)
    width: int | None = Field(None, ge=8)
    reading: Literal["joint", "text"] = "joint"


class DataSpec(_Strict):
    """Where prompts, seeds and masks come from.

    ``shapesworld``: ``n`` generated scenes (``seed``, ``n_objects``, ``size``) with exact masks.
    ``coco``: a COCO-format JSON (``path``) whose images carry ``prompt`` and ``seed``.
    ``daam``: a DAAM experiment folder (``path``), converted to COCO on the fly.
    ``prompts``: a text file (``path``) of prompts, one a line (``#`` starts a comment line), item ``i`` at seed
    ``seed + i``; it has no masks, so a suite scoring masks needs ``ground_truth: grounded-sam``.
    """

    source: Literal["shapesworld", "coco", "daam", "prompts"] = "shapesworld"
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


#: Grounded-SAM's default models: hub ids, read from the Hugging Face cache (``hf download <id>`` once).
DEFAULT_DETECTOR = "IDEA-Research/grounding-dino-tiny"
DEFAULT_SEGMENTER = "facebook/sam-vit-huge"
#: The keys only ``source: grounded-sam`` reads.
GROUNDED_SAM_KEYS = ("detector", "segmenter", "sam_type", "box_threshold", "text_threshold", "keep", "cache")


class GroundTruthSpec(_Strict):
    """Where the masks a case is scored against come from (``ground_truth:``; a bare string is the source).

    ``exact``: the data's exact masks (ShapesWorld); ``coco``: the masks of the data file (COCO / DAAM).
    ``grounded-sam``: every evaluated word is detected in the case's *generated* image by Grounding DINO
    (``detector``: hub id or ``save_pretrained`` folder) and segmented by SAM (``segmenter``: hub id or folder of
    transformers' ``SamModel``, or a segment-anything ``.pth`` checkpoint with ``sam_type``, by default read from
    its file name); masks are cached as COCO RLE in ``cache`` (default ``<cache dir>/grounded-sam``), keyed by
    image hash, models and thresholds. ``cache`` is no part of any key: it changes where masks are kept, not what
    they are.
    """

    source: Literal["exact", "coco", "grounded-sam"] = "exact"
    detector: str = DEFAULT_DETECTOR
    segmenter: str = DEFAULT_SEGMENTER
    sam_type: str | None = None
    box_threshold: float = Field(0.35, ge=0.0, le=1.0)
    text_threshold: float = Field(0.25, ge=0.0, le=1.0)
    keep: Literal["all", "best"] = "all"
    cache: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, value: Any) -> Any:
        """``ground_truth: coco`` is ``{source: coco}``."""
        return {"source": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _only_grounded_sam_reads_models(self) -> GroundTruthSpec:
        """A Grounded-SAM key under another source would be read by nothing: an error, not ignored."""
        unread = [k for k in GROUNDED_SAM_KEYS if k in self.model_fields_set]
        if self.source != "grounded-sam" and unread:
            raise ValueError(f"ground_truth.{unread[0]} is read only by `source: grounded-sam` (source is "
                             f"{self.source!r}); remove it or set ground_truth.source: grounded-sam")
        return self

    @property
    def grounded_sam(self) -> bool:
        """Whether masks come from Grounded-SAM on the generated image."""
        return self.source == "grounded-sam"


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
    #: ``exact`` / ``coco``: the data's own masks; a mapping ``{source: grounded-sam, ...}``: Grounded-SAM masks of
    #: the generated images (:class:`GroundTruthSpec`).
    ground_truth: GroundTruthSpec = Field(default_factory=GroundTruthSpec)
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

    @model_validator(mode="after")
    def _ground_truth_fits_data(self) -> SuiteSpec:
        """An explicit ``exact``/``coco`` must name the masks the data source has (else nothing reads it)."""
        source, data = self.ground_truth.source, self.data.source
        if "ground_truth" not in self.model_fields_set or source == "grounded-sam":
            return self
        fits = {"exact": ("shapesworld",), "coco": ("coco", "daam")}[source]
        if data not in fits:
            has = {"shapesworld": "exact", "coco": "coco", "daam": "coco"}.get(data)
            fix = f"use `ground_truth: {has}`" if has else "use `ground_truth: {source: grounded-sam, ...}`"
            raise ValueError(f"ground_truth {source!r} names masks data.source {data!r} does not have; {fix}")
        return self

    def row_labels(self) -> list[str]:
        """The row ids of results and claims: the variants' ids when there are variants, else the methods'."""
        return [v.id for v in self.variants] if self.variants else [m.label for m in self.methods]
