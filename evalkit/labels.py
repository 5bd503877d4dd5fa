"""The one spelling of a metric configuration's label, used everywhere a metric is named: result tables,
claims (``daam.miou-inf_tau0.4``), items.csv, reports, MLflow metric keys and ``evalkit compare``. It must
be a valid MLflow key (letters, digits, ``_ - . /`` and spaces), so it has no ``@``, ``[`` or ``=``."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

_UNSAFE = re.compile(r"[^A-Za-z0-9_\-.]")


def _value(v: Any) -> str:
    text = "-".join(str(x) for x in v) if isinstance(v, list | tuple) else str(v)
    return _UNSAFE.sub("-", text)


def metric_label(name: str, params: Mapping[str, Any] | None = None) -> str:
    """``name`` plus its parameters in sorted order, each as key and value: ``miou-inf_tau0.4``,
    ``pointing-game_tolerance2``; the bare name without parameters."""
    if not params:
        return name
    return name + "".join(f"_{k}{_value(v)}" for k, v in sorted(params.items()))
