"""The `evalkit` command line as a user runs it: outputs on disk, exit codes, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from evalkit.cli import main
from evalkit.methods import create_method
from evalkit.models import load
from evalkit.trace import generate


def test_methods_lists_every_builtin(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in ("daam", "raw-attn", "norm", "norm-sq", "hrv-selective"):
        assert any(line.startswith(name + " ") for line in out.splitlines())


def test_attribute_writes_image_maps_and_overlays(tmp_path):
    out = tmp_path / "run"
    args = ["attribute", "--model", "tiny-sd", "--prompt", "a red bird above a lake", "--seed", "3",
            "--steps", "2", "--guidance", "7.5", "--height", "128", "--width", "128",
            "--methods", "daam,norm", "--words", "bird,lake", "--out", str(out)]
    assert main(args) == 0
    assert Image.open(out / "image.png").size == (128, 128)
    for method in ("daam", "norm"):
        z = np.load(out / f"{method}.npz")
        assert sorted(z.files) == ["bird", "lake"]
        assert z["bird"].dtype == np.float32 and z["bird"].shape == (128, 128)
        for word in ("bird", "lake"):
            assert (out / f"{method}_{word}.png").stat().st_size > 0
    meta = json.loads((out / "attribution.json").read_text())
    assert meta["words"] == ["bird", "lake"] and meta["tokens"][0] == "<|startoftext|>"
    # the npz holds the method's map after upsampling, before normalization: recompute independently
    trace = generate(load("tiny-sd"), "a red bird above a lake", seeds=3, steps=2, height=128, width=128,
                     stats={"attn"}).traces[0]
    expected = create_method("daam").attribute(trace, ["bird"]).to_image()["bird"].numpy()
    np.testing.assert_allclose(np.load(out / "daam.npz")["bird"], expected, rtol=1e-5, atol=1e-8)
    assert np.array_equal(np.asarray(Image.open(out / "image.png")),
                          np.asarray(generate(load("tiny-sd"), "a red bird above a lake", seeds=3, steps=2,
                                              height=128, width=128).images[0]))


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--methods", "daamm"], "did you mean 'daam'"),
        (["--words", "cat"], "word 'cat' is not in the prompt"),
        (["--prompt", " ".join(["red"] * 90)], "more than the text encoder's 77"),
        (["--model", "/nonexistent/model"], "local"),
        (["--scheduler", "heun"], "ddim"),
        (["--param", "daam.k=3"], "has no parameter"),
        (["--param", "nodot=3"], "METHOD.NAME=VALUE"),
    ],
)
def test_input_errors_exit_2_with_one_line(tmp_path, capsys, extra, message):
    args = ["attribute", "--prompt", "a dog", "--steps", "1", "--height", "64", "--width", "64",
            "--methods", "daam", "--out", str(tmp_path / "o")]
    for i in range(0, len(extra), 2):
        flag, value = extra[i], extra[i + 1]
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("evalkit: error:") and message in err and "\n" not in err
    assert not (tmp_path / "o" / "image.png").exists()


def test_console_script_runs():
    res = subprocess.run([sys.executable, "-m", "evalkit.cli", "methods"], capture_output=True, text=True, check=False)
    assert res.returncode == 0 and "daam" in res.stdout
    res = subprocess.run([sys.executable, "-m", "evalkit.cli", "--plugins", "no_such_mod", "methods"],
                         capture_output=True, text=True, check=False)
    assert res.returncode == 2 and "cannot import 'no_such_mod'" in res.stderr


def test_a_closed_output_pipe_is_a_quiet_exit_not_an_internal_error(tmp_path):
    """`evalkit metrics | head -1`: when the reader has gone, evalkit stops quietly (141, as after SIGPIPE)
    without an "internal error" line or a traceback log."""
    import os

    read, write = os.pipe()
    os.close(read)
    try:
        res = subprocess.run([sys.executable, "-m", "evalkit.cli", "metrics"], stdout=write, stderr=subprocess.PIPE,
                             text=True, cwd=tmp_path, check=False)
    finally:
        os.close(write)
    assert res.returncode == 141 and res.stderr == ""
    assert not (tmp_path / "reports").exists()
