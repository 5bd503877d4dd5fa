"""``.npz`` archives keyed by arbitrary strings (prompt words): ``numpy.savez(file, **arrays)`` takes its keys as
keyword arguments, so a word named ``file`` raises and one named ``allow_pickle`` is silently dropped; this writer
puts every name into the archive, readable by ``numpy.load`` as usual, with fixed member timestamps (the same
arrays give the same bytes)."""

from __future__ import annotations

import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np


def save_npz(path: str | Path, arrays: Mapping[str, np.ndarray], compress: bool = False) -> Path:
    """Write ``arrays`` to ``path`` (``.npz`` appended when missing, as numpy does); returns the path written."""
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")
    mode = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w", compression=mode, allowZip64=True) as archive:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))  # same arrays, same bytes
            info.compress_type = mode
            with archive.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)
    return path
