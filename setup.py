"""The one part of the package layout that pyproject.toml cannot state: evalkit's packages (found, so that a new
subpackage needs no edit here) plus the repo's top-level ``fixtures/`` and ``suites/`` mapped into the wheel as the
data-only packages ``evalkit/_fixtures`` and ``evalkit/_suites``, where :mod:`evalkit.resources` finds them once
installed. Metadata and the package-data globs are in pyproject.toml."""

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py as _build_py

#: Package inside the wheel -> the repo folder it is built from (evalkit.resources.PACKAGED_NAMES names the same).
BUILTIN_DATA = {"evalkit._fixtures": "fixtures", "evalkit._suites": "suites"}


class build_py(_build_py):
    """Copies the data-only packages without their .py files: the fixtures' build and training scripts are for a
    checkout, and as modules of the wheel they would only change evalkit's source digest."""

    def find_package_modules(self, package: str, package_dir: str) -> list[tuple[str, str, str]]:
        """No modules for a data-only package; the usual ones for every other."""
        return [] if package in BUILTIN_DATA else super().find_package_modules(package, package_dir)


setup(
    packages=[*find_packages(include=["evalkit", "evalkit.*"]), *BUILTIN_DATA],
    package_dir=BUILTIN_DATA,
    cmdclass={"build_py": build_py},
)
