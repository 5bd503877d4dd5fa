"""Map archives keyed by prompt words: every word is a valid key (numpy.savez takes keys as keyword arguments,
so "file" raised and "allow_pickle" vanished), and the same arrays give the same bytes."""

from __future__ import annotations

import numpy as np
import torch

from evalkit.methods.base import Attribution
from evalkit.npz import save_npz
from evalkit.suites.cache import CaseCache

AWKWARD = ["file", "allow_pickle", "args", "kwds", "café"]


def test_every_name_round_trips_and_bytes_are_reproducible(tmp_path):
    arrays = {name: np.arange(6, dtype=np.float32).reshape(2, 3) * i for i, name in enumerate(AWKWARD)}
    first = save_npz(tmp_path / "a", arrays)
    assert first == tmp_path / "a.npz"  # numpy's suffix rule
    with np.load(first) as back:
        assert sorted(back.files) == sorted(AWKWARD)
        for name, arr in arrays.items():
            assert back[name].dtype == np.float32 and np.array_equal(back[name], arr)
    second = save_npz(tmp_path / "b.npz", arrays, compress=True)
    third = save_npz(tmp_path / "c.npz", arrays, compress=True)
    assert second.read_bytes() == third.read_bytes()
    assert second.stat().st_size < first.stat().st_size


def test_attribution_with_a_word_named_file_saves(tmp_path):
    maps = {"file": torch.ones(4, 4), "allow_pickle": torch.zeros(4, 4)}
    att = Attribution(method="daam", prompt="a file and allow_pickle", tokens=[], maps=maps, image_hw=(8, 8))
    att.save_npz(tmp_path / "maps.npz")
    with np.load(tmp_path / "maps.npz") as back:
        assert sorted(back.files) == ["allow_pickle", "file"]
        assert back["file"].shape == (8, 8) and float(back["file"].min()) == 1.0


def test_case_cache_stores_maps_of_any_word(tmp_path):
    cache = CaseCache(tmp_path)
    arrays = {"file": np.ones((2, 2), np.float32), "allow_pickle": np.zeros((2, 2), np.float32)}
    cache.store("k" * 64, {"maps.npz": arrays})
    entry = cache.load("k" * 64)
    with np.load(entry / "maps.npz") as back:
        assert sorted(back.files) == ["allow_pickle", "file"]
        assert np.array_equal(back["file"], arrays["file"])
