"""Load Stable Diffusion pipelines for evaluation: built-in fixtures, local diffusers folders or hub ids.

The pipeline class follows the folder's ``model_index.json`` (see :mod:`evalkit.models.families`): SD 1.x and
SD 2.x load as ``StableDiffusionPipeline``, SDXL as ``StableDiffusionXLPipeline``, SD3 as
``StableDiffusion3Pipeline`` and FLUX.1 as ``FluxPipeline``. Everything works offline; a
hub id that is not cached fails fast with a :class:`ModelLoadError` that tells the user to pass a local folder
instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path

import huggingface_hub
import torch
from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FluxPipeline,
    PNDMScheduler,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from evalkit.models.families import FAMILIES, Family, UnsupportedModelError, family_of
from evalkit.models.t5_tokenizer import build_t5_tokenizer
from evalkit.models.tokenizer import build_clip_tokenizer

__all__ = [
    "BUILTIN_DESCRIPTIONS",
    "BUILTIN_MODELS",
    "DTYPES",
    "FAMILIES",
    "PIPELINES",
    "SCHEDULERS",
    "Family",
    "ModelLoadError",
    "build_clip_tokenizer",
    "build_t5_tokenizer",
    "list_builtin_models",
    "load",
    "load_tokenizer",
    "load_tokenizers",
    "make_scheduler",
    "model_family",
    "resolve_dtype",
    "set_scheduler",
    "transformer_config",
    "unet_config",
]

from evalkit.builtin_models import BUILTIN_DESCRIPTIONS, BUILTIN_MODELS, BUILTIN_SCRIPTS  # noqa: E402

#: diffusers pipeline class name -> class, for every supported family.
PIPELINES: dict[str, type[DiffusionPipeline]] = {
    "StableDiffusionPipeline": StableDiffusionPipeline,
    "StableDiffusionXLPipeline": StableDiffusionXLPipeline,
    "StableDiffusion3Pipeline": StableDiffusion3Pipeline,
    "FluxPipeline": FluxPipeline,
}

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


def set_scheduler(pipe: DiffusionPipeline, name: str) -> DiffusionPipeline:
    """Replace ``pipe.scheduler`` in place by the scheduler called ``name``; returns ``pipe``.

    The names are noise-prediction samplers. A flow-matching model (SD3, Flux: a ``FlowMatch*`` scheduler) keeps
    its own scheduler, with a warning, since DDIM/PNDM/DPM-Solver/Euler over betas would sample it wrongly; so a
    suite written for UNets runs unchanged on an MM-DiT (the trace's settings name the scheduler used)."""
    if name.lower() not in SCHEDULERS:
        make_scheduler(name, {})  # raises the same error for every model
    if _flow_matching(pipe):
        import warnings

        warnings.warn(f"scheduler {name!r} is for noise-prediction models; this flow-matching model keeps its "
                      f"{type(pipe.scheduler).__name__}", stacklevel=2)
        return pipe
    pipe.scheduler = make_scheduler(name, pipe.scheduler.config)
    return pipe


def _flow_matching(pipe: DiffusionPipeline) -> bool:
    """Whether the pipeline samples by flow matching (its scheduler is a ``FlowMatch*`` one)."""
    return type(pipe.scheduler).__name__.startswith("FlowMatch")


def _is_diffusers_folder(path: Path) -> bool:
    return (path / "model_index.json").is_file()


def _resolve_local(model: str) -> Path | None:
    """Return the local folder for a built-in name or path, None for a (probable) hub id."""
    if model in BUILTIN_MODELS:
        path = BUILTIN_MODELS[model]
        if not _is_diffusers_folder(path):
            script = BUILTIN_SCRIPTS[model]
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


def _read_config(source: str | Path, subfolder: str | None = None, local_only: bool = True) -> dict:
    """A pipeline's ``model_index.json`` (or a component's ``config.json``) from a folder or a hub id."""
    if isinstance(source, Path):
        return json.loads((source / (subfolder or "") / ("config.json" if subfolder else "model_index.json"))
                          .read_text())
    if subfolder:
        return dict(UNet2DConditionModel.load_config(source, subfolder=subfolder, local_files_only=local_only))
    return dict(DiffusionPipeline.load_config(source, local_files_only=local_only))


def _pipeline_class(index: dict, model: str) -> type[DiffusionPipeline]:
    """The pipeline class of a ``model_index.json``; an unsupported family is a ModelLoadError."""
    try:
        family_of(index)
    except UnsupportedModelError as err:
        raise ModelLoadError(f"model {model!r}: {err}") from None
    return PIPELINES[index["_class_name"]]


def _pipeline_kwargs(cls: type[DiffusionPipeline], dtype: torch.dtype) -> dict:
    """from_pretrained keywords: no safety checker (SD), no invisible watermark (SDXL: an optional package); SD3
    and Flux have neither."""
    if cls is StableDiffusionXLPipeline:
        return {"dtype": dtype, "add_watermarker": False}
    if cls in (StableDiffusion3Pipeline, FluxPipeline):
        return {"dtype": dtype}
    return {"dtype": dtype, "safety_checker": None, "requires_safety_checker": False}


def _load_pipeline(source: str | Path, model: str, dtype: torch.dtype, local_only: bool) -> DiffusionPipeline:
    """Read the model index, then load it with its family's pipeline class."""
    cls = _pipeline_class(_read_config(source, local_only=local_only), model)
    return cls.from_pretrained(source, local_files_only=local_only, **_pipeline_kwargs(cls, dtype))


def _from_hub(model_id: str, dtype: torch.dtype) -> DiffusionPipeline:
    """Load a hub id from the local cache, downloading only when the hub is allowed and reachable."""
    try:
        return _load_pipeline(model_id, model_id, dtype, local_only=True)
    except _HUB_ERRORS as exc:
        if isinstance(exc, ModelLoadError):
            raise
        if _hub_offline():
            raise _not_found(model_id) from exc
    try:
        return _load_pipeline(model_id, model_id, dtype, local_only=False)
    except _HUB_ERRORS as exc:
        if isinstance(exc, ModelLoadError):
            raise
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
) -> DiffusionPipeline:
    """Load a pipeline by built-in name, local diffusers folder or hub id, with the class its family needs.

    SD 1.x/2.x give a ``StableDiffusionPipeline``, SDXL a ``StableDiffusionXLPipeline`` (two tokenizers and
    text encoders; the first tokenizer defines token positions, see :mod:`evalkit.trace.tokens`), SD3 a
    ``StableDiffusion3Pipeline`` (two CLIP encoders and T5) and FLUX.1 a ``FluxPipeline`` (CLIP and T5). The safety
    checker and SDXL's watermarker are off, the progress bar silenced; ``scheduler`` optionally swaps the
    scheduler by name (see :data:`SCHEDULERS`).
    """
    model = os.fspath(model)
    torch_dtype = resolve_dtype(dtype)
    if scheduler is not None and scheduler.lower() not in SCHEDULERS:
        raise ModelLoadError(f"unknown scheduler {scheduler!r}; valid names: {', '.join(SCHEDULERS)}")
    local = _resolve_local(model)
    with _quiet_loading():
        if local is not None:
            pipe = _load_pipeline(local, model, torch_dtype, local_only=True)
        else:
            pipe = _from_hub(model, torch_dtype)
    if hasattr(pipe, "safety_checker"):
        pipe.safety_checker = None
    pipe.feature_extractor = None
    if scheduler is not None:
        set_scheduler(pipe, scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _component_config(model: str, component: str) -> dict | None:
    """The ``config.json`` of one component folder of ``model`` without weights; None when it is absent or not
    available offline."""
    model = os.fspath(model)
    try:
        local = _resolve_local(model)
        return _read_config(local if local is not None else model, component)
    except (*_HUB_ERRORS, ModelLoadError):
        return None


def unet_config(model: str) -> dict | None:
    """The UNet config of ``model`` (built-in name, local folder or cached hub id) without its weights; None
    when it is not available offline, and for SD3 and Flux, which have a transformer instead (see
    :func:`transformer_config`)."""
    return _component_config(model, "unet")


def transformer_config(model: str) -> dict | None:
    """The transformer config of an SD3 or Flux ``model`` (built-in name, local folder or cached hub id) without
    its weights; None for a UNet model or when it is not available offline."""
    return _component_config(model, "transformer")


def model_family(model: str) -> Family:
    """The family of ``model`` from its ``model_index.json`` and UNet config (no weights read)."""
    model = os.fspath(model)
    local = _resolve_local(model)
    source = local if local is not None else model
    try:
        index = _read_config(source)
    except _HUB_ERRORS as exc:
        raise _not_found(model) from exc
    try:
        return family_of(index, unet_config(model))
    except UnsupportedModelError as err:
        raise ModelLoadError(f"model {model!r}: {err}") from None


def load_tokenizer(model: str):
    """The CLIP tokenizer of a model (built-in name, local folder or cached hub id) without loading its
    weights: re-scoring a stored trace needs the word alignment, not the UNet. For SDXL it is the first of
    the two tokenizers, the one that defines token positions; for SD3 and Flux their CLIP(-L) tokenizer (their
    T5 tokenizer is ``tokenizer_3`` and ``tokenizer_2``)."""
    from transformers import CLIPTokenizer

    model = os.fspath(model)
    local = _resolve_local(model)
    source = local if local is not None else model
    try:
        return CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", local_files_only=True)
    except _HUB_ERRORS as exc:
        raise _not_found(model) from exc


def load_tokenizers(model: str) -> dict[str, object]:
    """Every tokenizer of a model by its pipeline attribute (``tokenizer``, ``tokenizer_2``, ``tokenizer_3``), read
    from the folders ``model_index.json`` names, without weights: what an MM-DiT's text keys are made of."""
    from transformers import AutoTokenizer

    model = os.fspath(model)
    local = _resolve_local(model)
    source = local if local is not None else model
    try:
        index = _read_config(source)
        return {name: AutoTokenizer.from_pretrained(source, subfolder=name, local_files_only=True)
                for name in ("tokenizer", "tokenizer_2", "tokenizer_3") if (index.get(name) or [None])[0]}
    except _HUB_ERRORS as exc:
        raise _not_found(model) from exc
