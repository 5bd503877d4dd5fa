"""Finished suite invocations: their table, claims and figures, stored under a key of everything that
shapes them (resolved suite, limit, method filter, evalkit source, model, data files, library versions,
plugin source). Repeating an invocation reads the record back: nothing is recomputed, and neither
torch nor MLflow is imported, so a rerun costs a fraction of a second instead of a re-score.

Keys are deliberately broad: any change to evalkit's code or to a plugin's source file gives a new key
(the per-case cache still spares the generations), so a stored result can never hide a code change.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sqlite3
import sys
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, entry_points, version
from pathlib import Path

from .cache import CaseCache, content_key

PACKAGE = Path(__file__).resolve().parents[1]

#: Methods and metrics defined inside evalkit (covered by :func:`package_digest`); any other name
#: must resolve to a source file (plugin module or entry point) or the invocation is not stored.
BUILTIN_METHODS = frozenset({"daam", "raw-attn", "norm", "norm-sq", "hrv-selective", "concept-attention",
                             "norm-heads-only", "norm-timesteps-only"})
BUILTIN_METRICS = frozenset({
    "iou", "miou80", "miou-inf", "miou-best-tau", "pointing-game", "relevance-mass", "relevance-rank",
    "top-k-intersection", "specificity", "shift", "stability", "variance", "noise", "grounding-loss",
    "clip-full-prompt", "clip-min-object", "clip-score", "aesthetic", "avg-kl", "checker-full-prompt",
    "checker-mos",
})
#: Libraries whose versions can change a number.
LIBRARIES = ("torch", "diffusers", "transformers", "numpy", "scipy", "pycocotools", "open_clip_torch", "spacy")
RECORD = "result.json"


def source_digest(files) -> str:
    """sha256 over source files (package-relative name and bytes), in sorted order."""
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(str(Path(f).relative_to(PACKAGE)).encode())
        h.update(Path(f).read_bytes())
    return h.hexdigest()


def package_digest() -> str:
    """:func:`source_digest` of every evalkit source file."""
    return source_digest(PACKAGE.rglob("*.py"))


#: Model files up to this size are fingerprinted by content; larger ones (hub checkpoints of GBs) by
#: size and modification time, so that a retrained model with the same shapes never reuses stale cases.
CONTENT_HASH_LIMIT = 256 * 2**20


def model_fingerprint(model: str) -> str:
    """A model id plus, for local folders, a hash of its files (content; size + mtime for huge ones)."""
    from ..builtin_models import BUILTIN_MODELS

    path = Path(BUILTIN_MODELS.get(model, model))
    if not path.is_dir():
        return model
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        if f.is_file() and f.suffix != ".png" and f.name not in ("MODEL_CARD.md", "train_log.jsonl"):
            st = f.stat()
            h.update(str(f.relative_to(path)).encode())
            h.update(f.read_bytes() if st.st_size <= CONTENT_HASH_LIMIT else f"{st.st_size}:{st.st_mtime_ns}".encode())
    return f"{model}@{h.hexdigest()[:12]}"


def path_fingerprint(path: str | Path) -> str:
    """Content hash of a file; (name, size, mtime) of every file under a folder; "missing" otherwise."""
    p = Path(path)
    if p.is_file():
        return hashlib.sha256(p.read_bytes()).hexdigest()
    if p.is_dir():
        stats = [(str(f.relative_to(p)), f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(p.rglob("*"))
                 if f.is_file()]
        return content_key(stats)
    return "missing"


def referenced_files(data, where: str = "") -> dict[str, Path]:
    """Every string in the suite mapping that names an existing file or folder (as given, or relative
    to ``suites/``): data files, prompt lists, HRV files in method parameters."""
    from .loader import SUITES_DIR

    out: dict[str, Path] = {}
    if isinstance(data, dict):
        for k, v in data.items():
            out.update(referenced_files(v, f"{where}.{k}" if where else str(k)))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            out.update(referenced_files(v, f"{where}[{i}]"))
    elif (isinstance(data, str) and data.strip("./") and len(data) < 1024 and "\n" not in data
          and ("/" in data or "." in data)):
        for cand in (Path(data), SUITES_DIR / data):
            if cand.exists():
                out[where] = cand
                break
    return out


def _module_source(module: str) -> str | None:
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    origin = getattr(spec, "origin", None)
    return origin if origin and Path(origin).is_file() else None


def _external_source(name: str, group: str, registry_module: str) -> str | None:
    """Source file of a method/metric that is not built in: the class registered in this process, or
    the module its entry point names. None when it cannot be found (then nothing is stored)."""
    reg = sys.modules.get(registry_module)
    cls = getattr(reg, "_REGISTRY", {}).get(name) if reg is not None else None
    if cls is not None:
        module = sys.modules.get(cls.__module__)
        origin = getattr(module, "__file__", None)
        return origin if origin and Path(origin).is_file() else None
    for ep in entry_points(group=group):
        if ep.name == name:
            return _module_source(ep.module)
    return None


def library_versions(libraries: tuple[str, ...] = LIBRARIES) -> dict[str, str]:
    """Installed versions of ``libraries`` ("absent" when not installed), without importing them."""
    out = {}
    for lib in libraries:
        try:
            out[lib] = version(lib)
        except PackageNotFoundError:
            out[lib] = "absent"
    return out


def invocation_key(data: dict, *, limit: int | None, methods: list[str] | None,
                   plugins: list[str] | None = None) -> str | None:
    """The key of a suite invocation (``data``: the resolved suite mapping), or None when some code it
    runs cannot be fingerprinted (then the invocation always runs through the case cache)."""
    code: dict[str, str] = {"evalkit": package_digest()}
    for module in plugins or []:
        src = _module_source(module)
        if src is None:
            return None
        code[f"plugin:{module}"] = path_fingerprint(src)
    kinds = (("methods", BUILTIN_METHODS, "evalkit.methods", "evalkit.methods.registry"),
             ("metrics", BUILTIN_METRICS, "evalkit.metrics", "evalkit.metrics.registry"))
    for section, builtin, group, registry in kinds:
        for entry in data.get(section) or []:
            name = entry.get("name") if isinstance(entry, dict) else None
            if not isinstance(name, str):
                return None
            if name in builtin:
                continue
            src = _external_source(name, group, registry)
            if src is None:
                return None
            code[f"{section}:{name}"] = path_fingerprint(src)
    files = {ref: path_fingerprint(path) for ref, path in referenced_files(data).items()}
    model = data.get("model")
    return content_key({"suite": data, "limit": limit, "methods": sorted(methods or []), "code": code,
                        "model": model_fingerprint(model) if isinstance(model, str) else model, "files": files,
                        "libraries": library_versions()})


@dataclass
class StoredResult:
    """A finished invocation read back: what the summary, the report and ``cmd_run`` need."""

    spec: object  # SuiteSpec
    rows: list[dict]
    claims: list  # ClaimOutcome, exactly as judged (seeded resampling: a rerun would judge the same)
    n_cases: int
    figures: list[Path]
    mlflow_key: str
    key: str
    n_computed: int = 0
    samples: list[dict] = field(default_factory=list)
    items: list[dict] = field(default_factory=list)
    unassigned: dict[str, str] = field(default_factory=dict)
    methods: list[str] | None = None  # labels of the methods that ran (others were skipped for this model)

    @property
    def passed(self) -> bool:
        """No claim FAILED."""
        return not any(c.failed for c in self.claims)


def _cache(cache_dir: str | Path) -> CaseCache:
    return CaseCache(Path(cache_dir) / "suites")


def save_result(cache_dir: str | Path, key: str, result, rows: list[dict], figures: list[Path],
                mlflow_key: str, items: list[dict] | None = None) -> Path:
    """Store a finished invocation atomically (record + figure files, sha256-checked on load)."""
    names: list[str] = []
    files: dict[str, object] = {}
    for i, f in enumerate(figures):
        name = f.name if f.name not in files and f.suffix == ".png" else f"{i}-{f.stem}.png"
        files[name] = Path(f).read_bytes()
        names.append(name)
    files[RECORD] = {"rows": rows, "claims": [c.to_dict() for c in result.claims], "n_cases": result.n_cases,
                     "figures": names, "mlflow_key": mlflow_key, "items": items or [],
                     "unassigned": dict(getattr(result, "unassigned", {}) or {}),
                     "methods": [m.label for m in result.spec.methods]}
    return _cache(cache_dir).store(key, files)


def load_result(cache_dir: str | Path, key: str, spec) -> StoredResult | None:
    """The stored invocation ``key`` (intact), or None."""
    d = _cache(cache_dir).load(key)
    if d is None:
        return None
    from .claims import ClaimOutcome

    rec = json.loads((d / RECORD).read_text())
    try:
        claims = [ClaimOutcome.from_dict(c) for c in rec["claims"]]
    except TypeError:  # a record from before verdicts had intervals: recompute
        return None
    return StoredResult(spec=spec, rows=rec["rows"], claims=claims, n_cases=rec["n_cases"],
                        figures=[d / n for n in rec["figures"]], mlflow_key=rec["mlflow_key"], key=key,
                        items=rec.get("items", []), unassigned=rec.get("unassigned", {}), methods=rec.get("methods"))


def mlflow_up_to_date(uri: str, state_file: Path, mlflow_key: str) -> bool:
    """True when the invocation was logged completely and its runs are still active in the store at
    ``uri``; checked without importing MLflow (SQLite query or one REST call per run). Other store
    kinds answer False, so the caller logs through MLflow (which skips what the runs already hold)."""
    try:
        state = json.loads(Path(state_file).read_text())
    except (OSError, ValueError):
        return False
    if mlflow_key not in state.get("_complete", {}):
        return False
    ids = list(state.get(mlflow_key, {}).values())
    if not ids:
        return False
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):])
        if not path.is_file():
            return False
        try:
            with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as con:
                marks = ",".join("?" * len(ids))
                rows = con.execute(f"SELECT run_uuid FROM runs WHERE run_uuid IN ({marks}) "
                                   "AND lifecycle_stage = 'active'", ids).fetchall()
        except sqlite3.Error:
            return False
        return len(rows) == len(ids)
    if uri.startswith(("http://", "https://")):
        for rid in ids:
            q = urllib.parse.urlencode({"run_id": rid})
            try:
                with urllib.request.urlopen(f"{uri.rstrip('/')}/api/2.0/mlflow/runs/get?{q}", timeout=5) as r:
                    info = json.loads(r.read())["run"]["info"]
            except (OSError, ValueError, KeyError):
                return False
            if info.get("lifecycle_stage") != "active":
                return False
        return True
    return False
