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
