"""A protocol added the way a method is added: a plugin module (examples/guidance_sweep.py) registers it,
`evalkit protocols` lists it, and a suite that names it runs end to end through the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITE = """
name: guidance-check
protocol: {protocol}
model: tiny-sd
sampler: {{steps: 1, guidance: 7.5, height: 64, width: 64}}
data: {{source: shapesworld, n: 2, seed: 0, size: 64}}
options: {{masks: reference}}
min_n: 2
variants:
  - {{id: g1, params: {{guidance: 1.0}}}}
  - {{id: g7, params: {{guidance: 7.5}}}}
methods: [{{name: daam}}]
metrics: [{{name: miou-inf, params: {{tau: 0.4}}}}, {{name: relevance-mass}}]
expect: ["g7.relevance-mass >= 0.0"]
"""


def _cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "examples"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "evalkit.cli", "--plugins", "guidance_sweep", *args], cwd=tmp_path,
                          capture_output=True, text=True, env=env, timeout=600, check=False)


def test_plugin_protocol_is_listed_and_runs_in_a_suite(tmp_path):
    listed = _cli(tmp_path, "protocols")
    assert listed.returncode == 0, listed.stderr
    names = [line.split()[0] for line in listed.stdout.splitlines()]
    assert names == sorted(["attribution", "seed-control", "aggregation-ablation", "head-removal", "pos-ablation",
                            "steering-adherence", "guidance-sweep"])
    suite = tmp_path / "guidance-check.yaml"
    suite.write_text(SUITE.format(protocol="guidance-sweep"))
    res = _cli(tmp_path, "run", str(suite), "--cache-dir", str(tmp_path / "cache"), "--reports-dir",
               str(tmp_path / "reports"), "--no-mlflow", "--quiet")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "2 cases (2 computed)" in res.stdout
    table = [ln for ln in res.stdout.splitlines() if ln.startswith("│") and "relevance-mass" in ln]
    assert len(table) == 2  # one row per variant
    assert "PASSED g7.relevance-mass >= 0.0" in res.stdout
    again = _cli(tmp_path, "run", str(suite), "--cache-dir", str(tmp_path / "cache"), "--reports-dir",
                 str(tmp_path / "reports"), "--no-mlflow", "--quiet")
    assert again.returncode == 0 and "nothing recomputed" in again.stdout


@pytest.mark.parametrize("protocol, message", [("guidance-swep", "did you mean 'guidance-sweep'"),
                                               ("no-such-protocol", "unknown protocol 'no-such-protocol'")])
def test_unknown_protocol_is_one_line_with_a_suggestion(tmp_path, protocol, message):
    suite = tmp_path / "guidance-check.yaml"
    suite.write_text(SUITE.format(protocol=protocol))
    res = _cli(tmp_path, "validate", str(suite))
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr
    assert "guidance-check.yaml:3" in res.stderr  # the file and the line of `protocol:`
