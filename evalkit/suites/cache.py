"""Content-addressed, crash-safe storage of per-case outputs.

Each case lives in ``<root>/<key[:2]>/<key>/`` and is written to a temporary folder first, then
renamed into place (atomic on POSIX), so a run killed at any point leaves either a complete entry
or none. ``entry.json`` lists every file with its sha256; an entry whose files do not match is
treated as corrupt, removed, and recomputed. Only safe formats are stored (json, npz, png,
safetensors): nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ..npz import save_npz

SAFE_SUFFIXES = {".json", ".npz", ".png", ".safetensors"}


def content_key(payload: Any) -> str:
    """sha256 of a canonical JSON rendering of ``payload``."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class CaseCache:
    """Read and write per-case entries under ``root``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)  # created by the first store(): looking entries up writes nothing
        self.n_corrupt = 0  # entries found corrupt by load() (and removed, to be recomputed)

    def path(self, key: str) -> Path:
        return self.root / key[:2] / key

    def load(self, key: str) -> Path | None:
        """The entry's folder if it exists and is intact; a corrupt entry is removed (None)."""
        d = self.path(key)
        manifest = d / "entry.json"
        if not manifest.is_file():
            return None
        try:
            files = json.loads(manifest.read_text())["files"]
            if all((d / name).is_file() and _sha(d / name) == digest for name, digest in files.items()):
                return d
        except (OSError, ValueError, KeyError):
            pass
        self.n_corrupt += 1
        print(f"evalkit: cache entry {key[:12]} in {self.root} is corrupt (checksum mismatch); recomputing it",
              file=sys.stderr)
        shutil.rmtree(d, ignore_errors=True)
        return None

    def store(self, key: str, files: dict[str, Any]) -> Path:
        """Write ``files`` (name -> dict for json, dict of arrays for npz, PIL image for png, bytes)
        atomically as entry ``key``."""
        final = self.path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=final.parent))
        try:
            digests = {}
            for name, content in files.items():
                target = tmp / name
                suffix = target.suffix
                if suffix not in SAFE_SUFFIXES:
                    raise ValueError(f"refusing to cache {name!r}: only {sorted(SAFE_SUFFIXES)} are stored")
                if isinstance(content, bytes):
                    target.write_bytes(content)
                elif suffix == ".json":
                    target.write_text(json.dumps(content, indent=1, default=_json_default))
                elif suffix == ".npz":
                    save_npz(target, content, compress=True)
                elif suffix == ".png":
                    content.save(target)
                else:
                    raise ValueError(f"cannot cache {name!r}: pass bytes for {suffix} files")
                digests[name] = _sha(target)
            (tmp / "entry.json").write_text(json.dumps({"key": key, "files": digests}, indent=1))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final


def _json_default(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON serializable: {type(x)}")


def read_json(path: Path) -> Any:
    """Load a JSON file written by the cache."""
    return json.loads(Path(path).read_text())
