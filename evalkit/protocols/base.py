"""The protocol API and registry. A protocol says how one case (an item at one seed) is generated and
stored, and how the stored cases become a result table; the suite runner (``evalkit.suites``) does the
rest: cache keys, resume, claims, MLflow and reports. Built-ins register with :func:`register_protocol`;
other packages add theirs through the ``evalkit.protocols`` entry-point group, loaded when first named."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ..registry import Registry, UnknownNameError

if TYPE_CHECKING:
    from ..items import Case, EvalItem
    from ..methods import AttributionMethod
    from ..metrics import MetricResult

ENTRY_POINT_GROUP = "evalkit.protocols"


@dataclass
class Scores:
    """What scoring a protocol's cases gives: results keyed by (row id, metric label), per-item rows
    for the samples table, extra figures, and items that belong to no row (with the reason)."""

    results: dict[tuple[str, str], MetricResult]
    samples: list[dict]
    figures: list[Path] = field(default_factory=list)
    unassigned: dict[str, str] = field(default_factory=dict)


class Protocol:
    """One kind of suite. Subclasses set the class attributes and implement :meth:`compute` and
    :meth:`score`; ``spec`` is the suite (:class:`evalkit.suites.SuiteSpec`)."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    #: ``options:`` keys the protocol reads.
    options: ClassVar[tuple[str, ...]] = ("masks",)
    #: Metric names the protocol defines itself (scored by :meth:`score`).
    metrics: ClassVar[frozenset[str]] = frozenset()
    #: Whether any metric that scores one attribution map against a mask is accepted as well.
    single_map_metrics: ClassVar[bool] = False
    #: Where the rows come from: ``"variants"`` (``variants:``) or ``"methods"`` (``methods:``).
    rows: ClassVar[str] = "variants"
    #: Trace statistics recorded besides what the suite's methods need.
    extra_stats: ClassVar[frozenset[str]] = frozenset()
    #: The suite runner stores a case as split entries (case, maps per method, trace) and scores the maps
    #: itself (the attribution protocol); otherwise one entry per case from :meth:`compute`.
    split_cache: ClassVar[bool] = False
    #: The ``ground_truth:`` sources whose masks the protocol scores against (empty: it reads no masks). A suite
    #: that names another one is rejected: nothing would read it. ``grounded-sam`` items get their masks from
    #: the generated image through ``EvalItem.ground`` (see :func:`evalkit.protocols.grounding.with_ground_truth`).
    ground_truths: ClassVar[frozenset[str]] = frozenset({"exact", "coco"})

    def check_layout(self, spec: Any) -> None:
        """Reject options the protocol does not read, rows it does not take and a ground truth it would not use (one
        line naming the fix)."""
        bad = sorted(set(spec.options) - set(self.options))
        if bad:
            known = list(self.options) or "none"
            raise ValueError(f"protocol {self.name!r} has no option(s) {bad}; its options: {known}")
        if self.rows == "methods" and spec.variants:
            raise ValueError(f"suite {spec.name!r}: protocol {self.name!r} compares its `methods:`; "
                             "it takes no `variants:`")
        if self.rows == "variants" and not spec.variants:
            raise ValueError(f"suite {spec.name!r}: protocol {self.name!r} needs `variants:` (its rows)")
        self._check_ground_truth(spec)

    def _check_ground_truth(self, spec: Any) -> None:
        """``ground_truth:`` is one the protocol reads, and is not overruled by ``options.masks`` or the data."""
        source = spec.ground_truth.source
        if source not in self.ground_truths and (source == "grounded-sam" or "ground_truth" in spec.model_fields_set):
            reads = f"reads only {sorted(self.ground_truths)}" if self.ground_truths else "scores no masks"
            raise ValueError(f"suite {spec.name!r}: protocol {self.name!r} {reads}, so `ground_truth: {source}` would "
                             "never be used; remove it (Grounded-SAM masks: protocol attribution)")
        if source == "grounded-sam" and spec.options.get("masks") == "reference":
            raise ValueError(f"suite {spec.name!r}: options.masks: reference scores against the data's own masks, so "
                             "`ground_truth: grounded-sam` would never be used; remove one of them")
        if self.ground_truths and spec.data.source == "prompts" and source != "grounded-sam":
            raise ValueError(f"suite {spec.name!r}: data.source prompts has no masks for protocol {self.name!r} to "
                             "score against; set `ground_truth: {source: grounded-sam, ...}`")

    def check(self, spec: Any) -> None:
        """Reject a suite this protocol cannot run: options, rows, metrics (one line naming the fix)."""
        from ..metrics import create_metric

        self.check_layout(spec)

        for m in spec.metrics:
            if m.name in self.metrics:
                continue
            if self.single_map_metrics:
                cls = create_metric(m.name, **m.params)
                if "heat" in inspect.signature(cls.update).parameters:
                    continue
            also = " and single-map metrics" if self.single_map_metrics else ""
            raise ValueError(f"suite {spec.name!r}: protocol {self.name!r} does not define metric {m.name!r}; it "
                             f"defines {sorted(self.metrics)}{also}")

    def items(self, spec: Any, limit: int | None, suites_dir: Path) -> list[EvalItem]:
        """The suite's items (at most ``limit``) with the suite's ground truth; ``suites_dir`` resolves relative data
        paths."""
        from ..items import load_items
        from .grounding import with_ground_truth

        return with_ground_truth(spec, load_items(spec.data, limit, suites_dir))

    def compute(self, pipe: Any, spec: Any, case: Case, methods: dict[str, AttributionMethod],
                stats: list[str]) -> dict[str, Any]:
        """Generate and measure one case; returns the files of its cache entry (json/npz/png)."""
        raise NotImplementedError(f"protocol {self.name!r} does not implement compute(): subclass Protocol and "
                                  "return the case entry's files")

    def score(self, spec: Any, cases: list[Case], dirs: list[Path], figures_dir: Path) -> Scores:
        """Score the stored cases (``dirs[i]`` is the entry of ``cases[i]``)."""
        raise NotImplementedError(f"protocol {self.name!r} does not implement score(): subclass Protocol and "
                                  "return Scores from the stored cases")

    def cache_key(self, spec: Any) -> dict:
        """What, besides model, sampler, options and code, shapes a case of this protocol."""
        return {"variants": [v.model_dump() for v in spec.variants]}


class UnknownProtocolError(UnknownNameError):
    """A protocol name that is neither registered nor an entry point."""


PROTOCOLS: Registry[Protocol] = Registry("protocol", Protocol, ENTRY_POINT_GROUP, UnknownProtocolError)
_REGISTRY = PROTOCOLS.classes  # the registered classes by name


def register_protocol(name: str) -> Callable[[type[Protocol]], type[Protocol]]:
    """Class decorator: register a :class:`Protocol` subclass under ``name``."""
    return PROTOCOLS.register(name)


def get_protocol(name: str) -> Protocol:
    """The protocol registered as ``name``; unknown names raise with a "did you mean" suggestion."""
    return PROTOCOLS.get(name)()


def available_protocols() -> dict[str, str]:
    """Every known protocol name with its one-line summary (loads entry points)."""
    return {name: cls.summary for name, cls in PROTOCOLS.all().items()}
