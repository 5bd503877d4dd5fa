"""Registry: decorator, lazy entry points, "did you mean", parameter errors, a user's method end to end."""

from __future__ import annotations

import importlib
import sys
import textwrap

import pytest

from evalkit.methods import AttributionMethod, UnknownMethodError, available_methods, create_method, register_method
from evalkit.methods.registry import _REGISTRY


def test_builtins_are_listed_with_summaries():
    methods = available_methods()
    for name in ("daam", "raw-attn", "norm", "norm-sq", "hrv-selective"):
        assert name in methods and methods[name]


def test_unknown_method_suggests_the_closest_name():
    with pytest.raises(UnknownMethodError, match="did you mean 'daam'"):
        create_method("daaam")
    with pytest.raises(UnknownMethodError, match="known: "):
        create_method("zzzzzz")


def test_wrong_parameter_is_one_line_error():
    with pytest.raises(ValueError, match="has no parameter\\(s\\) \\['kk'\\]; its parameters are"):
        create_method("hrv-selective", kk=3)


def test_decorator_rejects_non_methods():
    with pytest.raises(TypeError, match="AttributionMethod subclass"):
        register_method("bad")(object)


def test_readme_example_method_registers_and_attributes(tiny_pipe, monkeypatch):
    monkeypatch.syspath_prepend("examples")
    sys.modules.pop("up_attn", None)
    importlib.import_module("up_attn")
    try:
        assert "up-attn" in available_methods()
        from evalkit.trace import generate

        trace = generate(tiny_pipe, "a red bird", seeds=0, steps=1, height=128, width=128).traces[0]
        att = create_method("up-attn").attribute(trace, ["bird"])
        assert att.method == "up-attn" and att.maps["bird"].shape == trace.latent_hw
        assert float(att.maps["bird"].min()) >= 0.0
    finally:
        _REGISTRY.pop("up-attn", None)


def test_entry_point_is_loaded_lazily_by_name(tmp_path, monkeypatch):
    (tmp_path / "ext_methods_pkg.py").write_text(textwrap.dedent('''
        from evalkit.methods import AttributionMethod, aggregate

        class Ext(AttributionMethod):
            needs = frozenset({"attn"})
            summary = "ext method from an entry point"

            def token_maps(self, trace, positions):
                return aggregate(trace, "attn", positions)
    '''))
    dist = tmp_path / "ext_methods_pkg-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ext-methods-pkg\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[evalkit.methods]\next-method = ext_methods_pkg:Ext\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert "ext_methods_pkg" not in sys.modules
        cls = type(create_method("ext-method"))
        assert issubclass(cls, AttributionMethod) and cls.name == "ext-method"
        assert "ext_methods_pkg" in sys.modules
        assert available_methods()["ext-method"] == "ext method from an entry point"
    finally:
        _REGISTRY.pop("ext-method", None)
        sys.modules.pop("ext_methods_pkg", None)


def _entry_point_package(tmp_path, monkeypatch, module: str, group: str, name: str, source: str) -> None:
    """An installed-looking distribution in ``tmp_path`` whose entry point ``name`` in ``group`` is ``module:Ext``."""
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(source))
    dist = tmp_path / f"{module}-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module.replace('_', '-')}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[{group}]\n{name} = {module}:Ext\n")
    monkeypatch.syspath_prepend(str(tmp_path))


def test_a_metric_from_an_entry_point_is_loaded_lazily_and_its_declaration_checked(tmp_path, monkeypatch):
    from evalkit.metrics import available_metrics, create_metric
    from evalkit.metrics.registry import _REGISTRY as metrics

    _entry_point_package(tmp_path, monkeypatch, "ext_metrics_pkg", "evalkit.metrics", "ext-metric", '''
        from evalkit.metrics import Metric

        class Ext(Metric):
            category = "map-statistics"
            direction = "lower"
            summary = "ext metric from an entry point"

            def update(self, value):
                self._record(float(value))
    ''')
    try:
        assert "ext_metrics_pkg" not in sys.modules
        metric = create_metric("ext-metric")
        assert type(metric).name == "ext-metric" and "ext_metrics_pkg" in sys.modules
        assert available_metrics()["ext-metric"]["direction"] == "lower"
        with pytest.raises(ValueError, match="has no parameter"):
            create_metric("ext-metric", tau=0.5)
    finally:
        metrics.pop("ext-metric", None)
        sys.modules.pop("ext_metrics_pkg", None)


def test_a_misdeclared_metric_entry_point_fails_when_loaded(tmp_path, monkeypatch):
    from evalkit.metrics import get_metric_class

    _entry_point_package(tmp_path, monkeypatch, "bad_metrics_pkg", "evalkit.metrics", "bad-metric", '''
        from evalkit.metrics import Metric

        class Ext(Metric):
            category = "map-statistics"
            direction = "sideways"
    ''')
    try:
        with pytest.raises(ValueError, match="direction must be one of"):
            get_metric_class("bad-metric")
    finally:
        sys.modules.pop("bad_metrics_pkg", None)


def test_one_registry_shape_for_methods_metrics_and_protocols():
    """The three registries share evalkit.registry: the same errors (a KeyError printing its message), the same
    duplicate rule, and names set by the decorator."""
    from evalkit.metrics import UnknownMetricError, get_metric_class
    from evalkit.protocols import UnknownProtocolError, get_protocol
    from evalkit.registry import Registry, UnknownNameError

    for error, lookup, wrong in ((UnknownMethodError, create_method, "dam"),
                                 (UnknownMetricError, get_metric_class, "miou8"),
                                 (UnknownProtocolError, get_protocol, "seed-contrl")):
        with pytest.raises(error) as info:
            lookup(wrong)
        assert isinstance(info.value, UnknownNameError) and isinstance(info.value, KeyError)
        assert str(info.value).startswith("unknown ") and "did you mean" in str(info.value)

    class Base:
        name = ""

    reg = Registry("widget", Base, None)

    @reg.register("a")
    class A(Base):
        def __init__(self, size: int = 1) -> None:
            self.size = size

    assert A.name == "a" and reg.get("a") is A and reg.all() == {"a": A} and reg.create("a", size=3).size == 3
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a")(type("Other", (Base,), {}))
    with pytest.raises(TypeError, match="expects a Base subclass"):
        reg.register("b")(int)
    with pytest.raises(UnknownNameError, match="unknown widget 'b'"):
        reg.get("b")
