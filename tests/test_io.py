"""Tests of pmoe_backdoor.io: outputs get the permissions of any file the user writes."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest
import torch

from pmoe_backdoor.io import current_umask, save_npz, save_tensors, write_json


@pytest.fixture()
def umask():
    """Set a umask for the test and restore the process's own afterwards."""
    old = os.umask(0o022)

    def set_mask(mask: int) -> None:
        os.umask(mask)

    yield set_mask
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_outputs_get_0666_less_the_umask(tmp_path, umask, mask):
    umask(mask)
    assert current_umask() == mask
    write_json(tmp_path / "a.json", {"x": 1})
    save_tensors(tmp_path / "w.safetensors", {"w": torch.zeros(2)})
    save_npz(tmp_path / "d.npz", x=np.zeros(2))
    plain = tmp_path / "plain.txt"
    plain.write_text("x")  # what any file the user writes gets
    expected = 0o666 & ~mask
    assert stat.S_IMODE(plain.stat().st_mode) == expected
    for name in ("a.json", "w.safetensors", "d.npz"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == expected, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "d.npz", "plain.txt", "w.safetensors"]


def test_a_file_without_tensors_reads_back_empty_with_its_metadata(tmp_path):
    """safetensors alone writes an unreadable header for zero tensors (a defense without artifacts leaves one)."""
    from pmoe_backdoor.io import load_tensors

    save_tensors(tmp_path / "none.safetensors", {}, {"reason": "no artifacts"})
    assert load_tensors(tmp_path / "none.safetensors") == ({}, {"reason": "no artifacts"})
    save_tensors(tmp_path / "bare.safetensors", {})
    assert load_tensors(tmp_path / "bare.safetensors") == ({}, {})
