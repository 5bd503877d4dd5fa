"""The Ray executor (local cluster, 2 CPU actors, tiny model): the same per-item values as the local executor,
bit for bit; an actor killed mid-run is restarted and its cases retried, nothing missing or duplicated."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from evalkit.suites import load_suite, run_suite  # noqa: E402

SUITE = """
name: ray-check
model: tiny-sd
sampler: {steps: 2, guidance: 7.5, height: 64, width: 64}
data: {source: shapesworld, n: 4, seed: 0, size: 64}
options: {masks: reference}
min_n: 2
methods: [{name: daam}, {name: norm}]
metrics: [{name: miou-inf, params: {tau: 0.4}}, {name: relevance-mass}]
expect: ["norm.relevance-mass >= 0.0"]
"""

#: A plugin method that kills its own process (the Ray actor) the first time it runs, then behaves as DAAM.
DYING = '''
import os, signal
from pathlib import Path
from evalkit.methods import DAAM, register_method

@register_method("dies-once")
class DiesOnce(DAAM):
    """DAAM whose first call kills the process it runs in (a crashed worker)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def params(self):
        return {"marker": self.marker}

    def attribute(self, trace, words):
        if not Path(self.marker).exists():
            Path(self.marker).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return super().attribute(trace, words)
'''


@pytest.fixture(scope="module")
def cluster():
    """One local Ray cluster for the module (starting one costs seconds)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))}})
    yield
    ray.shutdown()


def _spec(tmp_path: Path, text: str = SUITE):
    (tmp_path / "s.yaml").write_text(text)
    return load_suite(str(tmp_path / "s.yaml"))


def test_ray_run_equals_local_run_item_by_item(tmp_path, cluster, tiny_pipe):
    spec = _spec(tmp_path)
    local = run_suite(spec, cache_dir=tmp_path / "local", progress=False, pipe=tiny_pipe)
    remote = run_suite(spec.model_copy(update={"executor": "ray"}), cache_dir=tmp_path / "ray", progress=False)
    assert remote.n_computed == local.n_computed == 4
    assert set(remote.results) == set(local.results)
    for key, r in local.results.items():
        assert remote.results[key].item_keys() == r.item_keys()
        assert remote.results[key].per_sample == r.per_sample, key  # bit-identical on CPU
    # the same cache: the local executor finds every case the Ray run stored
    again = run_suite(spec, cache_dir=tmp_path / "ray", progress=False, pipe=None)
    assert again.n_computed == 0 and again.results[("daam", "miou-inf_tau0.4")].per_sample == \
        local.results[("daam", "miou-inf_tau0.4")].per_sample


def test_killed_actor_is_restarted_and_its_cases_retried(tmp_path, cluster, tiny_pipe, monkeypatch):
    (tmp_path / "dying_plugin.py").write_text(DYING)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("EVALKIT_PLUGINS", "dying_plugin")
    import dying_plugin  # noqa: F401  (registers dies-once in the driver, too)

    marker = tmp_path / "killed"
    text = SUITE.replace("methods: [{name: daam}, {name: norm}]",
                         f"methods: [{{name: dies-once, id: daam, params: {{marker: '{marker}'}}}}, {{name: norm}}]")
    spec = _spec(tmp_path, text)
    # the actor's PYTHONPATH is fixed when the cluster starts: give it the plugin through the job's working dir
    ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}})
    remote = run_suite(spec.model_copy(update={"executor": "ray", "ray": spec.ray.model_copy(
        update={"batch_size": 1})}), cache_dir=tmp_path / "ray", progress=False)
    assert marker.exists()  # one actor did die mid-run
    entries = sorted((tmp_path / "ray").glob("??/*/entry.json"))
    assert len(entries) == 4 and remote.n_computed == 4  # every case once: none missing, none twice
    local = run_suite(spec, cache_dir=tmp_path / "local", progress=False, pipe=tiny_pipe)
    for key, r in local.results.items():
        assert remote.results[key].per_sample == r.per_sample, key
    keys = [json.loads(e.read_text())["key"] for e in entries]
    assert len(set(keys)) == 4
