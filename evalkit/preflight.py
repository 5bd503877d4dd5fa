"""Checks that run before anything is generated or written, shared by ``evalkit run``, ``evalkit
validate`` and ``evalkit attribute``: every foreseeable problem becomes one line that names the input
and the fix, instead of a traceback minutes into a run.

:class:`InputError` (exit code 2) is a problem with what the user passed; :class:`EnvironmentProblem`
(exit code 3) is a problem with the machine (no CUDA, an unreachable tracking server, a read-only
folder)."""

from __future__ import annotations

import inspect
import json
import os
import urllib.error
import urllib.request
from pathlib import Path


class InputError(ValueError):
    """Bad input: one line naming the input and the fix (exit code 2)."""


class EnvironmentProblem(RuntimeError):
    """The machine cannot do what was asked (exit code 3): one line naming the fix."""


def check_device(device: str, flag: str = "--device") -> None:
    """The torch device exists on this machine."""
    import torch

    kind = str(device).split(":")[0]
    if kind == "cpu":
        return
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise EnvironmentProblem(f"{flag} {device}: CUDA is not available here (torch {torch.__version__}, "
                                     f"{torch.cuda.device_count()} GPUs visible); use {flag} cpu or a CUDA machine")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise EnvironmentProblem(f"{flag} {device}: only {torch.cuda.device_count()} GPU(s) are visible; "
                                     f"use cuda:0..cuda:{torch.cuda.device_count() - 1}")
        return
    if kind == "mps":
        if not torch.backends.mps.is_available():
            raise EnvironmentProblem(f"{flag} {device}: Apple MPS is not available here; use {flag} cpu")
        return
    raise InputError(f"{flag} {device!r}: unknown device; use cpu, cuda, cuda:N or mps")


def check_sampling(steps: int | None = None, guidance: float | None = None, prompt: str | None = None,
                   height: int | None = None, width: int | None = None) -> None:
    """Ranges of the sampling options (CLI spelling in the messages)."""
    if steps is not None and steps < 1:
        raise InputError(f"--steps must be >= 1 (denoising steps), got {steps}")
    if guidance is not None and guidance < 0:
        raise InputError(f"--guidance must be >= 0 (classifier-free guidance scale; <= 1 disables guidance), "
                         f"got {guidance}")
    if prompt is not None and not prompt.strip():
        raise InputError("--prompt is empty: pass the text to generate, e.g. --prompt \"a red bird on a table\"")
    for flag, v in (("--height", height), ("--width", width)):
        if v is not None and (v < 8 or v % 8):
            raise InputError(f"{flag} must be a positive multiple of 8 (the VAE's scale), got {v}")


def build(kind: str, name: str, params: dict, where: str):
    """Construct a registered method or metric with ``params``; a wrong parameter name or value is an
    InputError naming ``where`` and the class's parameters."""
    if kind == "method":
        from .methods import create_method as create
        from .methods import get_method_class as get
    else:
        from .metrics import create_metric as create
        from .metrics import get_metric_class as get
    cls = get(name)
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "args", "kwargs")]
    unknown = sorted(set(params) - set(accepted))
    if unknown and "kwargs" not in inspect.signature(cls.__init__).parameters:
        import difflib

        close = difflib.get_close_matches(unknown[0], accepted, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise InputError(f"{where}: {kind} {name!r} has no parameter {unknown[0]!r}{hint} (its parameters: "
                         f"{accepted or 'none'})")
    try:
        return create(name, **params)
    except (TypeError, ValueError) as err:
        shown = ", ".join(f"{k}={v!r}" for k, v in params.items())
        raise InputError(f"{where}: {kind} {name!r} with {shown or 'no parameters'}: {err}") from None


def model_backbone(model: str) -> str | None:
    """``unet`` or ``transformer`` (MM-DiT) from the model's ``model_index.json`` alone; None when that is not
    readable here (loading the model names the problem)."""
    from .models import ModelLoadError, model_family

    try:
        return model_family(model).backbone
    except ModelLoadError:
        return None


def model_head_names(model: str) -> list[str] | None:
    """The attn2 head names of ``model``'s UNet, from its config alone (built on the meta device, no
    weights read); None when the config is not available offline (a hub id not in the cache)."""
    from .trace import model_head_names as head_names

    return head_names(model)


def hrv_for_model(model: str, heads: list[str] | None) -> str | None:
    """The head relevance vectors that fit ``model``: its own ``hrv.json`` (a built-in's or a local
    folder's), else the shipped vectors (sd14, sdxl) whose heads are the model's; None otherwise.
    ``heads`` None (config not available offline): see :func:`evalkit.methods.hrv_for_model`."""
    from .methods import hrv_for_model as find

    return find(model, heads)


def check_hrv_heads(hrv, heads: list[str] | None, where: str, model: str) -> None:
    """An HRV file names exactly the model's heads."""
    if heads is None or set(hrv.heads) == set(heads):
        return
    raise InputError(f"{where}: the HRV file ({hrv.model or 'unknown model'}, {len(hrv.heads)} heads) does not match "
                     f"model {model!r} ({len(heads)} attn2 heads); pass HRVs built for this model "
                     f"(evalkit.analysis.build_hrv) or `hrv: model`")


def check_writable(folder: str | Path, what: str) -> None:
    """``folder`` (or its nearest existing parent) can be written to; nothing is left behind (a probe
    file is created and removed)."""
    import tempfile

    p = Path(folder).resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    ok = p.is_dir() and os.access(p, os.W_OK | os.X_OK)
    if ok:  # a real probe too: access() says yes to root on a read-only mount
        try:
            fd, probe = tempfile.mkstemp(prefix=".evalkit-probe-", dir=p)
            os.close(fd)
            os.unlink(probe)
        except OSError:
            ok = False
    if not ok:
        raise EnvironmentProblem(f"{what} {str(folder)!r} is not writable (nearest existing path: {p}); pass a "
                                 f"writable folder")


def check_tracking(uri: str, timeout: float = 3.0) -> None:
    """The MLflow tracking store answers (one request for a server) or its SQLite file can be written."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError, ValueError) as err:
            raise EnvironmentProblem(f"MLflow tracking server {uri} does not answer ({err}); start it, fix "
                                     "MLFLOW_TRACKING_URI / --tracking-uri, or pass --no-mlflow") from None
        raise EnvironmentProblem(f"MLflow tracking server {uri} answered /health with an error; check the server "
                                 "or pass --no-mlflow")
    if uri.startswith("sqlite:///"):
        check_writable(Path(uri[len("sqlite:///"):]).parent, "MLflow SQLite folder of")
    elif uri.startswith("file:") or "://" not in uri:
        check_writable(uri.removeprefix("file://").removeprefix("file:"), "MLflow store")


def check_suite(spec, *, limit: int | None = None, reports_dir: str | Path | None = None,
                tracking_uri: str | None = None) -> None:
    """Everything about a resolved suite that can fail before generating: methods and metrics with
    their parameters, HRV files against the model's heads, the scheduler, the data files, the device;
    and, when given, the reports folder and the tracking store."""
    from .models import SCHEDULERS

    name = spec.name
    if limit is not None and limit < 1:
        raise InputError(f"--limit must be >= 1 (the number of data items to evaluate), got {limit}")
    if spec.sampler.scheduler is not None and spec.sampler.scheduler.lower() not in SCHEDULERS:
        import difflib

        close = difflib.get_close_matches(spec.sampler.scheduler.lower(), list(SCHEDULERS), n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise InputError(f"suite {name!r}: sampler.scheduler {spec.sampler.scheduler!r} is unknown; {hint}use one of "
                         f"{', '.join(SCHEDULERS)} (or leave it out for the model's own)")
    methods = []
    for i, m in enumerate(spec.methods):
        where = f"suite {name!r} methods[{i}] ({m.label})"
        methods.append((where, build("method", m.name, m.params, where)))
    for i, k in enumerate(spec.metrics):
        build("metric", k.name, k.params, f"suite {name!r} metrics[{i}] ({k.label})")
    heads = None
    hrv_users = [(w, m.hrv) for w, m in methods if hasattr(m, "hrv") and hasattr(m.hrv, "heads")]
    hrv_variants = [v for v in spec.variants if v.params.get("steering") == "hrv" and v.params.get("hrv")]
    if hrv_users or hrv_variants:
        heads = model_head_names(spec.model)
    for where, hrv in hrv_users:
        check_hrv_heads(hrv, heads, where, spec.model)
    for v in hrv_variants:
        from .methods import HeadRelevance
        from .protocols import model_hrv

        src = v.params["hrv"]
        try:
            hrv = HeadRelevance.load(model_hrv(spec.model, v.id) if src == "model" else src)
        except (OSError, ValueError) as err:
            raise InputError(f"suite {name!r} variant {v.id!r}: params.hrv: {err}") from None
        check_hrv_heads(hrv, heads, f"suite {name!r} variant {v.id!r}", spec.model)
    _check_data(spec)
    _check_ground_truth(spec)
    check_device(spec.device, "device")
    if reports_dir is not None:
        check_writable(reports_dir, "reports folder")
    if tracking_uri is not None:
        check_tracking(tracking_uri)


def _check_ground_truth(spec) -> None:
    """Grounded-SAM's detector and segmenter load offline (local folders or the Hugging Face cache; nothing is
    downloaded or read into memory), and spaCy can name the nouns of prompts that have no masks."""
    gt = spec.ground_truth
    if not gt.grounded_sam:
        return
    from .groundtruth.grounded_sam import check_detector, check_segmenter

    for key, check in (("detector", lambda: check_detector(gt.detector)),
                       ("segmenter", lambda: check_segmenter(gt.segmenter, gt.sam_type))):
        try:
            check()
        except (OSError, ValueError) as err:
            raise InputError(f"suite {spec.name!r} ground_truth.{key}: {err} (override: --set "
                             f"ground_truth.{key}=PATH)") from None
    if spec.data.source != "shapesworld":  # captions without masks: their words are spaCy's nouns
        from .protocols.common import spacy_nlp

        try:
            spacy_nlp()
        except RuntimeError as err:
            msg = f"suite {spec.name!r}: the prompts' nouns need spaCy's English model: {err}"
            raise EnvironmentProblem(msg) from None


def _check_data(spec) -> None:
    data = spec.data
    if data.source == "shapesworld":
        return
    if not data.path:
        raise InputError(f"suite {spec.name!r}: data.source {data.source!r} needs data.path (a COCO JSON or a DAAM "
                         "experiment folder)")
    from .suites.loader import SUITES_DIR

    path = Path(data.path) if Path(data.path).exists() else SUITES_DIR / data.path
    if not path.exists():
        raise InputError(f"suite {spec.name!r}: data.path {data.path!r} does not exist (looked here and in "
                         f"{SUITES_DIR})")
    if data.source == "coco":
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise InputError(f"suite {spec.name!r}: data.path {data.path!r} is not valid JSON ({err})") from None
        missing = [k for k in ("images", "annotations", "categories") if k not in doc]
        if missing:
            raise InputError(f"suite {spec.name!r}: data.path {data.path!r} is not a COCO file: no {missing} "
                             "(see docs/groundtruth.md)")
