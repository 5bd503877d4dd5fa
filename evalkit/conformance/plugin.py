"""pytest plugin: ``pytest --evalkit-method NAME_OR_DOTTED_PATH`` checks an attribution method's
invariants (one test per invariant and model). Registered through the ``pytest11`` entry point, or
loaded with ``-p evalkit.conformance.plugin``; inert unless ``--evalkit-method`` is given.

Without explicit test paths only the conformance tests run; with paths they run next to them."""

from __future__ import annotations

from pathlib import Path

import pytest

#: The test module the plugin adds to the collection (its tests are parametrized by pytest_generate_tests).
CHECKS_MODULE = Path(__file__).with_name("collected.py")
_CONFORMANCES = pytest.StashKey[list]()


def _split(values: list[str]) -> list[str]:
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


def pytest_addoption(parser: pytest.Parser) -> None:
    """The conformance options."""
    group = parser.getgroup("evalkit", "evalkit attribution-method conformance")
    group.addoption("--evalkit-method", action="append", default=[], metavar="NAME_OR_PATH",
                    help="check this attribution method: a registered name or pkg.module:Class (repeatable)")
    group.addoption("--evalkit-plugins", action="append", default=[], metavar="MODULES",
                    help="comma-separated modules or .py files to import first, so their @register_method runs")
    group.addoption("--evalkit-model", action="append", default=[], metavar="MODEL",
                    help="check only on these built-in models (repeatable; default: every supported model)")
    group.addoption("--evalkit-param", action="append", default=[], metavar="NAME=VALUE",
                    help="constructor parameter of the checked method (repeatable; JSON values)")


def pytest_configure(config: pytest.Config) -> None:
    """Resolve the methods (a bad name is a usage error) and add the conformance tests to the collection."""
    methods = _split(config.getoption("evalkit_method", default=[]) or [])
    if not methods:
        return
    from .runner import Conformance
    from .subject import import_plugins, parse_params

    try:
        import_plugins(_split(config.getoption("evalkit_plugins")))
        params = parse_params(config.getoption("evalkit_param"))
        models = _split(config.getoption("evalkit_model")) or None
        config.stash[_CONFORMANCES] = [Conformance(m, models, params) for m in methods]
    except (ValueError, KeyError, TypeError) as err:
        raise pytest.UsageError(f"--evalkit-method: {err}") from None
    path = str(CHECKS_MODULE)
    if path not in config.args:
        if config.args_source is pytest.Config.ArgsSource.ARGS:
            config.args.append(path)
        else:  # no paths given: run the conformance tests alone, not the project's testpaths
            config.args[:] = [path]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """One test per (method, model, invariant)."""
    if "evalkit_case" not in metafunc.fixturenames:
        return
    from .checks import INVARIANT_NAMES

    conformances = metafunc.config.stash.get(_CONFORMANCES, [])
    cases = [(c, model, inv) for c in conformances for model in c.models for inv in INVARIANT_NAMES]
    metafunc.parametrize("evalkit_case", cases, ids=[f"{c.label}/{model}/{inv}" for c, model, inv in cases])
