"""task-a-coco end to end and offline: COCO-style captions on tiny-sd, object nouns by spaCy, Grounded-SAM ground
truth from tiny random-weight Grounding DINO and SAM folders saved from configs (passed with --set), masks cached
and read back on a second run; and the one-line errors of the preflight and the schema, before anything runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_groundtruth_grounded_sam import save_tiny_grounded_sam

from evalkit.cli import main
from evalkit.groundtruth.grounded_sam import GroundedSam, TransformersSamPredictor
from evalkit.suites import SuiteError, load_suite

#: Tiny sampler and detector settings: one 64 px step, and thresholds a random detector passes.
TINY = ["--model", "tiny-sd", "--limit", "2", "--no-mlflow", "--quiet", "--set", "sampler.steps=1",
        "--set", "sampler.height=64", "--set", "sampler.width=64", "--set", "ground_truth.box_threshold=0",
        "--set", "ground_truth.text_threshold=0"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Toy models are dominated by thread synchronisation: on a shared 2-core box one thread is faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Local folders of a tiny Grounding DINO and a tiny SAM (transformers' SamModel), as save_pretrained writes."""
    return save_tiny_grounded_sam(tmp_path_factory.mktemp("gsam"))


def _models(folders: tuple[Path, Path]) -> list[str]:
    return ["--set", f"ground_truth.detector={folders[0]}", "--set", f"ground_truth.segmenter={folders[1]}"]


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_task_a_coco_runs_offline_with_grounded_sam_masks_then_reads_them_from_its_cache(
        folders, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # reports, error logs and the default cache stay in the test's folder
    cache = tmp_path / "cache"
    code, out, err = _run(capsys, "run", "task-a-coco", *TINY, *_models(folders), "--cache-dir", str(cache))
    assert code == 0, err
    assert "hrv-selective skipped: no head relevance vectors are known for model 'tiny-sd'" in out
    assert "grounded-sam ground truth: 6 word masks computed" in err and "0 read from its cache" in err
    gsam_files = sorted((cache / "grounded-sam").glob("*.json"))
    assert len(gsam_files) == 2  # one RLE cache file per generated image
    entries = [json.loads(f.read_text())["entries"] for f in gsam_files]
    grounded = sorted(e["word"] for ent in entries for e in ent.values())
    assert grounded == ["beach", "cat", "couch", "dog", "horse", "man"]

    # the case entries hold the Grounded-SAM masks of the captions' nouns, at the generated image's size
    cases = sorted(p.parent for p in cache.glob("??/*/case.json"))
    assert len(cases) == 2
    words = {}
    for case in cases:
        meta = json.loads((case / "case.json").read_text())
        with np.load(case / "masks.npz") as z:
            masks = {w: z[w] for w in z.files}
        words[meta["prompt"]] = sorted(masks)
        assert all(m.shape == (64, 64) for m in masks.values()) and any(m.any() for m in masks.values())
    assert words == {"a dog sitting on a couch next to a cat": ["cat", "couch", "dog"],
                     "a man riding a horse on a beach": ["beach", "horse", "man"]}
    report = sorted((tmp_path / "reports" / "task-a-coco").glob("*/results.json"))[-1]
    rows = json.loads(report.read_text())["rows"]
    assert {(r["method"], r["metric"]) for r in rows} == {(m, k) for m in ("daam", "raw-attn", "norm")
                                                          for k in ("miou80_tau0.4", "miou-inf_tau0.4")}
    assert all(r["n"] > 0 for r in rows)  # scored against the Grounded-SAM masks (thresholds 0: every word has one)

    # a fresh case cache with the same Grounded-SAM cache: images are regenerated, masks are read, no model runs
    def fail(*args, **kwargs):
        raise AssertionError("a Grounded-SAM model ran although every mask was cached")

    monkeypatch.setattr(GroundedSam, "_raw_detections", fail)
    monkeypatch.setattr(TransformersSamPredictor, "set_image", fail)
    code, out, err = _run(capsys, "run", "task-a-coco", *TINY, *_models(folders), "--cache-dir",
                          str(tmp_path / "cache2"), "--set", f"ground_truth.cache={cache / 'grounded-sam'}")
    assert code == 0, err
    assert "grounded-sam ground truth: 0 word masks computed (0 without a box" in err and "6 read from its cache" in err
    for case in cases:  # same keys (the cache folder is no part of them), same masks
        twin = tmp_path / "cache2" / case.relative_to(cache)
        with np.load(case / "masks.npz") as a, np.load(twin / "masks.npz") as b:
            assert a.files == b.files and all(np.array_equal(a[w], b[w]) for w in a.files)

    # the first invocation again: served whole from the store, nothing computed at all
    code, out, err = _run(capsys, "run", "task-a-coco", *TINY, *_models(folders), "--cache-dir", str(cache))
    assert code == 0 and "nothing recomputed" in out and "grounded-sam" not in err


def test_unreadable_detector_folder_is_one_line_before_generation(folders, tmp_path: Path, capsys,
                                                                  monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "broken-dino"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    for command in (["validate", "task-a-coco"], ["run", "task-a-coco", *TINY, "--cache-dir", "cache"]):
        code, _, err = _run(capsys, *command, "--set", f"ground_truth.detector={bad}", "--set",
                            f"ground_truth.segmenter={folders[1]}")
        assert code == 2 and "\n" not in err.strip(), err
        assert "ground_truth.detector: cannot load Grounding DINO from local folder" in err and str(bad) in err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "reports").exists()  # nothing generated or written
    code, _, err = _run(capsys, "validate", "task-a-coco", "--set", f"ground_truth.segmenter={folders[1]}",
                        "--set", f"ground_truth.detector={folders[0]}", "--set", "model=tiny-sd")
    assert code == 0, err


SCHEMA_BAD = [
    ("ground_truth: {source: grounded-sam, detektor: x}", "unknown key 'ground_truth.detektor'; did you mean "
                                                          "'detector'?"),
    ("ground_truth: {source: coco, detector: x}", "ground_truth.detector is read only by `source: grounded-sam`"),
    ("ground_truth: exac", "Input should be 'exact', 'coco' or 'grounded-sam'"),
    ("ground_truth: coco", "ground_truth 'coco' names masks data.source 'shapesworld' does not have; use "
                           "`ground_truth: exact`"),
    ("ground_truth: {source: grounded-sam}\noptions: {masks: reference}", "`ground_truth: grounded-sam` would "
                                                                          "never be used"),
    ("protocol: pos-ablation\nvariants: [{id: NOUN}]\nmetrics: [{name: avg-kl}]\nground_truth: exact",
     "protocol 'pos-ablation' scores no masks, so `ground_truth: exact` would never be used"),
    ("data: {source: prompts, path: p.txt}", "data.source prompts has no masks"),
]


@pytest.mark.parametrize("extra,message", SCHEMA_BAD, ids=[e.split("\n")[0][:40] for e, _ in SCHEMA_BAD])
def test_ground_truth_keys_nothing_reads_are_errors(tmp_path: Path, extra: str, message: str) -> None:
    base = "name: s\nmodel: tiny-sd\nmethods: [{name: daam}]\nmetrics: [{name: miou-inf}]\n"
    (tmp_path / "s.yaml").write_text(base + extra + "\n")
    with pytest.raises(SuiteError) as info:
        load_suite(str(tmp_path / "s.yaml"))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_suite_defaults_and_set_overrides(folders) -> None:
    from evalkit.suites import parse_set

    spec = load_suite("task-a-coco")
    gt = spec.ground_truth
    assert (gt.source, gt.detector, gt.segmenter) == ("grounded-sam", "IDEA-Research/grounding-dino-tiny",
                                                      "facebook/sam-vit-huge")
    assert [m.label for m in spec.methods] == ["daam", "concept-attention", "raw-attn", "norm", "hrv-selective"]
    assert {k.label for k in spec.metrics} == {"miou80_tau0.4", "miou-inf_tau0.4"}
    sets = parse_set([f"ground_truth.detector={folders[0]}", "sampler.steps=1", "ground_truth.box_threshold=0.5"])
    assert sets == {"ground_truth": {"detector": str(folders[0]), "box_threshold": 0.5}, "sampler": {"steps": 1}}
    over = load_suite("task-a-coco", sets)
    assert over.ground_truth.detector == str(folders[0]) and over.ground_truth.segmenter == gt.segmenter
    assert over.sampler.steps == 1 and over.sampler.guidance == 7.5
    with pytest.raises(SuiteError, match="must look like KEY=VALUE"):
        parse_set(["sampler.steps"])
    # a bad value from the command line is named as the override, not as the suite file's line it replaced
    with pytest.raises(SuiteError, match=r"^command-line override sampler.steps='abc': sampler.steps: Input should"):
        load_suite("task-a-coco", parse_set(["sampler.steps=abc"]))
    with pytest.raises(SuiteError, match=r"^command-line override sampler.stepz=3: unknown key .*did you mean 'steps'"):
        load_suite("task-a-coco", parse_set(["sampler.stepz=3"]))
