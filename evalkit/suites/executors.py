"""Where a suite's cases are computed. ``local`` (default): in this process, one pipeline. ``ray``: on a Ray
cluster, by long-lived actors that each hold one loaded pipeline; cases go to them in batches and their
files come back to the driver, which alone writes the cache, scores, logs to MLflow and reports, exactly
as the local executor does. A case is a pure function of (model, sampler, case), so the same cache serves
both, and an interrupted run resumes from it with either executor."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from tqdm.auto import tqdm

#: ``compute(pipe, job) -> result``: what an executor runs per job (a case plus what it needs).
Compute = Callable[[Any, Any], Any]
#: Modules the CLI imported with ``--plugins`` (Ray actors import them too, so their registrations exist).
PLUGINS_ENV = "EVALKIT_PLUGINS"


def loaded_plugins() -> list[str]:
    """The ``--plugins`` modules of this invocation."""
    return [m for m in os.environ.get(PLUGINS_ENV, "").split(",") if m]


class LocalExecutor:
    """Compute jobs one after the other in this process (the pipeline is loaded on first need)."""

    def __init__(self, load_pipe: Callable[[], Any], pipe: Any = None) -> None:
        self._load, self.pipe = load_pipe, pipe

    def map(self, compute: Compute, jobs: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        """Yield ``(index, compute(pipe, job))`` for every job, in order."""
        if jobs and self.pipe is None:
            self.pipe = self._load()
        for i, job in enumerate(jobs):
            yield i, compute(self.pipe, job)

    def close(self) -> None:
        """Nothing to release (the pipeline belongs to the caller)."""


class _Worker:
    """A Ray actor's state: one loaded pipeline, evalkit's plugins imported, torch threads as the driver's
    (CPU results then equal a local run's bit for bit: float sums depend on the thread count)."""

    def __init__(self, load_pipe: Callable[[], Any], plugins: Sequence[str], threads: int) -> None:
        import importlib

        import torch

        torch.set_num_threads(threads)
        for module in plugins:
            importlib.import_module(module)
        self.pipe = load_pipe()

    def run(self, compute: Compute, jobs: Sequence[Any]) -> list[Any]:
        """Compute a batch of jobs on this actor's pipeline."""
        return [compute(self.pipe, job) for job in jobs]

    def pid(self) -> int:
        """The actor's process id (tests kill actors by it)."""
        return os.getpid()


class RayExecutor:
    """Compute jobs on ``actors`` Ray actors (started on ``address``, or a local cluster when None). An actor
    that dies is restarted (pipeline reloaded) and its pending batches are retried."""

    def __init__(self, load_pipe: Callable[[], Any], *, address: str | None = None, actors: int = 2,
                 num_cpus: float = 1.0, num_gpus: float = 0.0, batch_size: int = 4,
                 plugins: Sequence[str] = (), threads: int | None = None) -> None:
        try:
            import ray
        except ImportError as err:  # an environment problem with a one-line fix
            raise ModuleNotFoundError("executor 'ray' needs Ray: pip install 'evalkit[ray]' "
                                      "(or run with --executor local)") from err
        import torch

        self.ray = ray
        self.batch_size = max(1, int(batch_size))
        if not ray.is_initialized():
            paths = [p for p in sys.path if p and os.path.isdir(p)]
            ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False,
                     runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(paths)}})
            self._owns_ray = True
        else:
            self._owns_ray = False
        cls = ray.remote(max_restarts=-1, max_task_retries=-1)(_Worker)
        self.actors = [cls.options(num_cpus=num_cpus, num_gpus=num_gpus).remote(
            load_pipe, list(plugins), int(threads or torch.get_num_threads())) for _ in range(max(1, int(actors)))]

    def map(self, compute: Compute, jobs: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        """Yield ``(index, result)`` as batches finish on any actor (batches are dealt round robin)."""
        ray = self.ray
        batches = [list(range(i, min(i + self.batch_size, len(jobs)))) for i in range(0, len(jobs), self.batch_size)]
        pending = {}
        for b, idx in enumerate(batches):
            actor = self.actors[b % len(self.actors)]
            pending[actor.run.remote(compute, [jobs[i] for i in idx])] = idx
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            idx = pending.pop(done[0])
            yield from zip(idx, ray.get(done[0]))

    def close(self) -> None:
        """Stop the actors (and the local cluster this executor started)."""
        for actor in self.actors:
            self.ray.kill(actor)
        if self._owns_ray:
            self.ray.shutdown()


def make_executor(spec: Any, load_pipe: Callable[[], Any], pipe: Any = None, plugins: Sequence[str] = ()):
    """The executor the suite asks for (``executor:``, ``ray:``)."""
    if spec.executor == "local":
        return LocalExecutor(load_pipe, pipe)
    r = spec.ray
    return RayExecutor(load_pipe, address=r.address, actors=r.actors, num_cpus=r.num_cpus, num_gpus=r.num_gpus,
                       batch_size=r.batch_size, plugins=plugins, threads=r.threads)


def progress_map(executor, compute: Compute, jobs: Sequence[Any], bar: tqdm) -> Iterator[tuple[int, Any]]:
    """``executor.map`` with the progress bar advanced per finished job (cases done across the cluster)."""
    for i, result in executor.map(compute, jobs):
        yield i, result
        bar.update(1)
