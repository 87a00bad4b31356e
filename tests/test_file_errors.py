"""A model, trigger or poison file that cannot be read fails with one error naming the file and what it should be.

Model files are untrusted: they are read with safetensors only, so a damaged or foreign file must end in a clear
error, never in a bare SafetensorError, KeyError or RuntimeError that leaves the reader to guess which file it was.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pmoe_backdoor.attacks.poison import PoisonRecord
from pmoe_backdoor.attacks.triggers import BlendTrigger, SquareTrigger, load_trigger
from pmoe_backdoor.io import load_tensors, save_tensors
from pmoe_backdoor.models.checkpoint import load_model, model_from_spec, save_model

SPEC = {"arch": "wrn", "widen_factor": 1}


def _model_file(path: Path) -> Path:
    save_model(model_from_spec(SPEC, 10), SPEC, 10, path)
    return path


def _trigger_file(path: Path) -> Path:
    SquareTrigger(size=3, value=255, row=29, col=29).save(path)
    return path


def _poison_file(path: Path) -> Path:
    images = torch.zeros(2, 32, 32, 3, dtype=torch.uint8)
    PoisonRecord(torch.tensor([3, 7]), images, 0, {"rate_percent": 1.0}).save(path)
    return path


WRITERS = {"model": _model_file, "trigger": _trigger_file, "poison": _poison_file}
LOADERS = {"model": load_model, "trigger": load_trigger, "poison": PoisonRecord.load}


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    damaged = {
        "truncated": data[: len(data) // 2],
        "garbage": b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4,  # an 8-byte header length far beyond the file
        "empty": b"",
        "cut_header": data[:12],
    }[how]
    path.write_bytes(damaged)


def _names(path: Path) -> str:
    return re.escape(str(path))


@pytest.mark.parametrize("how", ["truncated", "garbage", "empty", "cut_header"])
@pytest.mark.parametrize("kind", WRITERS)
def test_a_damaged_file_names_itself(tmp_path: Path, kind: str, how: str):
    path = WRITERS[kind](tmp_path / "results" / "c10" / "pmoe" / "square-2" / "seed0" / f"{kind}.safetensors")
    LOADERS[kind](path)  # readable before the damage
    _damage(path, how)
    with pytest.raises(ValueError, match=_names(path) + r": not a readable safetensors file \(.+\)"):
        LOADERS[kind](path)


@pytest.mark.parametrize("kind", WRITERS)
def test_a_missing_file_names_itself(tmp_path: Path, kind: str):
    path = tmp_path / "nowhere" / f"{kind}.safetensors"
    with pytest.raises(FileNotFoundError, match=_names(path)):
        LOADERS[kind](path)


def test_a_folder_in_place_of_a_file_names_itself(tmp_path: Path):
    path = tmp_path / "weights.safetensors"
    path.mkdir()
    with pytest.raises(ValueError, match=_names(path) + ": not a file"):
        load_model(path)


def test_a_model_file_without_the_model_spec(tmp_path: Path):
    path = tmp_path / "weights.safetensors"
    save_tensors(path, {"w": torch.zeros(2)}, {"seed": 0})
    with pytest.raises(ValueError, match=_names(path) + r": not a pmoe-backdoor model file .*model spec"):
        load_model(path)


def test_a_model_file_whose_spec_builds_nothing(tmp_path: Path):
    path = tmp_path / "weights.safetensors"
    save_tensors(path, {"w": torch.zeros(2)}, {"model": {"arch": "no_such_arch"}, "num_classes": 10})
    with pytest.raises(ValueError, match=_names(path) + r": .*model spec .*no_such_arch"):
        load_model(path)
    save_tensors(path, {"w": torch.zeros(2)}, {"model": "wrn", "num_classes": 10})
    with pytest.raises(ValueError, match=_names(path) + r": .*model spec"):
        load_model(path)


def test_a_model_file_whose_weights_do_not_fit_its_spec(tmp_path: Path):
    path = tmp_path / "weights.safetensors"
    save_tensors(path, {"w": torch.zeros(2)}, {"model": SPEC, "num_classes": 10})
    with pytest.raises(ValueError, match=_names(path) + r": its weights do not fit"):
        load_model(path)


def test_a_foreign_safetensors_file(tmp_path: Path):
    """A safetensors file from another tool: its metadata values are plain strings, not save_tensors' JSON."""
    path = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=_names(path) + r": metadata 'format' is not JSON"):
        load_tensors(path)


def test_a_trigger_file_lacking_its_parts(tmp_path: Path):
    path = tmp_path / "trigger.safetensors"
    BlendTrigger(torch.zeros(32, 32, 3, dtype=torch.uint8), 0.2, "test").save(path)
    load_trigger(path)
    tensors, meta = load_tensors(path)
    save_tensors(path, {}, meta)  # the blend image gone
    with pytest.raises(ValueError, match=_names(path) + r": .*blend trigger"):
        load_trigger(path)
    save_tensors(path, {}, {"kind": "square", "params": {"size": 3, "no_such_param": 1}})
    with pytest.raises(ValueError, match=_names(path) + r": .*square trigger"):
        load_trigger(path)


def test_a_poison_file_with_a_bad_target(tmp_path: Path):
    path = _poison_file(tmp_path / "poison.safetensors")
    tensors, meta = load_tensors(path)
    save_tensors(path, tensors, dict(meta, target="zero"))
    with pytest.raises(ValueError, match=_names(path) + r": .*target"):
        PoisonRecord.load(path)


def test_a_header_length_beyond_the_file(tmp_path: Path):
    """What a corrupt weights file in an evaluate job gave: 'header too large', naming no file."""
    path = tmp_path / "weights.safetensors"
    path.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    with pytest.raises(ValueError, match=_names(path) + r": not a readable safetensors file \(.*header too large"):
        load_model(path)
