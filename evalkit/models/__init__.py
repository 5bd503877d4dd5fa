"""Load Stable Diffusion pipelines for evaluation: built-in fixtures, local diffusers folders or hub ids.

Everything works offline; a hub id that is not cached fails fast with a :class:`ModelLoadError`
that tells the user to pass a local folder instead.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

import huggingface_hub
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from evalkit.models.tokenizer import build_clip_tokenizer

__all__ = [
    "BUILTIN_DESCRIPTIONS",
    "BUILTIN_MODELS",
    "DTYPES",
    "SCHEDULERS",
    "ModelLoadError",
    "build_clip_tokenizer",
    "list_builtin_models",
    "load",
    "load_tokenizer",
    "make_scheduler",
    "resolve_dtype",
    "set_scheduler",
]

from evalkit.builtin_models import BUILTIN_DESCRIPTIONS, BUILTIN_MODELS  # noqa: E402

#: Scheduler name -> diffusers scheduler class (built from the pipeline's scheduler config).
SCHEDULERS: dict[str, type[SchedulerMixin]] = {
    "ddim": DDIMScheduler,
    "dpm-solver": DPMSolverMultistepScheduler,
    "pndm": PNDMScheduler,
    "euler": EulerDiscreteScheduler,
}

#: Accepted dtype names.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}

_HUB_ID = re.compile(r"[\w-][\w.-]*(/[\w-][\w.-]*)?")  # "name" or "org/name"; anything else is a path

_HUB_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError)
try:  # connection errors that huggingface_hub may let through unwrapped
    import httpx

    _HUB_ERRORS += (httpx.HTTPError,)
except ImportError:  # pragma: no cover - httpx is a huggingface_hub dependency
    pass


class ModelLoadError(ValueError):
    """A model, scheduler or dtype argument could not be resolved into a pipeline."""


def list_builtin_models() -> dict[str, str]:
    """Return built-in model names with a one-line description each."""
    return {name: BUILTIN_DESCRIPTIONS.get(name, str(path)) for name, path in BUILTIN_MODELS.items()}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Turn ``"float32"``/``"float16"``/``"bfloat16"`` (or a torch.dtype) into a torch.dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ModelLoadError(f"unsupported dtype {dtype}; use one of: {', '.join(DTYPES)}")
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use one of: {', '.join(DTYPES)}")
    return DTYPES[key]


def make_scheduler(name: str, config: dict) -> SchedulerMixin:
    """Build the scheduler called ``name`` from another scheduler's config (keeps the beta schedule)."""
    cls = SCHEDULERS.get(name.lower())
    if cls is None:
        raise ModelLoadError(f"unknown scheduler {name!r}; valid names: {', '.join(SCHEDULERS)}")
    return cls.from_config(config)


def set_scheduler(pipe: StableDiffusionPipeline, name: str) -> StableDiffusionPipeline:
    """Replace ``pipe.scheduler`` in place by the scheduler called ``name``; returns ``pipe``."""
    pipe.scheduler = make_scheduler(name, pipe.scheduler.config)
    return pipe


def _is_diffusers_folder(path: Path) -> bool:
    return (path / "model_index.json").is_file()


def _resolve_local(model: str) -> Path | None:
    """Return the local folder for a built-in name or path, None for a (probable) hub id."""
    if model in BUILTIN_MODELS:
        path = BUILTIN_MODELS[model]
        if not _is_diffusers_folder(path):
            script = "build_tiny_sd.py" if model == "tiny-sd" else "train_shapesworld.py"
            raise ModelLoadError(
                f"built-in model {model!r} is missing at {path}; in a source checkout rebuild it with "
                f"`python fixtures/{script}` or restore the folder from git, else reinstall evalkit"
            )
        return path
    path = Path(model).expanduser()
    if path.exists():
        if not _is_diffusers_folder(path):
            raise ModelLoadError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
        return path
    if not _HUB_ID.fullmatch(model):
        raise ModelLoadError(
            f"model folder {model!r} does not exist: pass a local diffusers folder (with model_index.json), "
            f"a hub id, or a built-in name ({', '.join(BUILTIN_MODELS)})"
        )
    return None


def _hub_offline() -> bool:
    """True when the Hub must not be contacted (env checked at call time, not only at import)."""
    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return env.strip().lower() in {"1", "true", "yes", "on"} or huggingface_hub.is_offline_mode()


def _from_hub(model_id: str, dtype: torch.dtype) -> StableDiffusionPipeline:
    """Load a hub id from the local cache, downloading only when the hub is allowed and reachable."""
    kwargs = {"dtype": dtype, "safety_checker": None, "requires_safety_checker": False}
    try:
        return StableDiffusionPipeline.from_pretrained(model_id, local_files_only=True, **kwargs)
    except _HUB_ERRORS as exc:
        if _hub_offline():
            raise _not_found(model_id) from exc
    try:
        return StableDiffusionPipeline.from_pretrained(model_id, **kwargs)
    except _HUB_ERRORS as exc:
        raise _not_found(model_id) from exc


def _not_found(model_id: str) -> ModelLoadError:
    return ModelLoadError(
        f"model {model_id!r} could not be found locally or loaded offline; pass a local path to a diffusers "
        f"folder instead (--model /path/to/diffusers/folder) or one of: {', '.join(BUILTIN_MODELS)}"
    )


@contextlib.contextmanager
def _quiet_loading():
    """Silence diffusers' and transformers' loading progress bars (they clutter CLI output and errors)."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    d_was, t_was = dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        if d_was:
            dlog.enable_progress_bar()
        if t_was:
            tlog.enable_progress_bar()


def load(
    model: str,
    *,
    scheduler: str | None = None,
    dtype: str | torch.dtype = "float32",
    device: str = "cpu",
) -> StableDiffusionPipeline:
    """Load a StableDiffusionPipeline by built-in name, local diffusers folder or hub id.

    The safety checker is disabled and the progress bar silenced; ``scheduler`` optionally swaps
    the scheduler by name (see :data:`SCHEDULERS`).
    """
    model = os.fspath(model)
    torch_dtype = resolve_dtype(dtype)
    if scheduler is not None and scheduler.lower() not in SCHEDULERS:
        raise ModelLoadError(f"unknown scheduler {scheduler!r}; valid names: {', '.join(SCHEDULERS)}")
    local = _resolve_local(model)
    with _quiet_loading():
        if local is not None:
            pipe = StableDiffusionPipeline.from_pretrained(
                local,
                dtype=torch_dtype,
                safety_checker=None,
                requires_safety_checker=False,
                local_files_only=True,
            )
        else:
            pipe = _from_hub(model, torch_dtype)
    pipe.safety_checker = None
    pipe.feature_extractor = None
    if scheduler is not None:
        set_scheduler(pipe, scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def load_tokenizer(model: str):
    """The CLIP tokenizer of a model (built-in name, local folder or cached hub id) without loading its
    weights: re-scoring a stored trace needs the word alignment, not the UNet."""
    from transformers import CLIPTokenizer

    model = os.fspath(model)
    local = _resolve_local(model)
    source = local if local is not None else model
    try:
        return CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", local_files_only=True)
    except _HUB_ERRORS as exc:
        raise _not_found(model) from exc
