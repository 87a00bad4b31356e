"""Tests of pmoe_backdoor.attacks.poison against docs/faithful-behaviour.md §4 (poisoning) and §5 (the ASR set)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pmoe_backdoor.attacks.poison import PoisonRecord, asr_set, choose_poison_indices, make_poison, num_poisoned
from pmoe_backdoor.attacks.triggers import make_trigger

pytestmark = pytest.mark.usefixtures("one_thread")

RATES = [0.1, 0.5, 2, 6, 10]


@pytest.mark.parametrize(("rate", "expected"), list(zip(RATES, [50, 250, 1000, 3000, 5000])))
def test_num_poisoned_cifar10(rate, expected):
    assert num_poisoned(rate, 50_000) == expected


@pytest.mark.parametrize(("rate", "expected"), list(zip(RATES, [39, 196, 784, 2352, 3920])))
def test_num_poisoned_gtsrb(rate, expected):
    assert num_poisoned(rate, 39_209) == expected


def test_num_poisoned_edges():
    assert num_poisoned(0, 1000) == 0
    assert num_poisoned(100, 1000) == 1000
    assert num_poisoned(np.float64(0.1), 50_000) == 50
    for bad in (-0.1, 100.5):
        with pytest.raises(ValueError, match="rate"):
            num_poisoned(bad, 1000)


def _labels(n: int = 1000, num_classes: int = 10) -> np.ndarray:
    return np.arange(n, dtype=np.int64) % num_classes


def test_choose_indices_seeded_distinct_sorted():
    y = _labels()
    a = choose_poison_indices(y, 10, seed=0)
    b = choose_poison_indices(y, 10, seed=0)
    c = choose_poison_indices(y, 10, seed=1)
    assert a.dtype == np.int64
    assert len(a) == 100
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert len(np.unique(a)) == len(a)
    assert np.all(np.diff(a) > 0)
    assert a.min() >= 0 and a.max() < len(y)


def test_choose_indices_include_target_class_by_default():
    # faithful: drawn from all classes, so the target class is included (10% of 1000 labels are class 0)
    y = _labels()
    for seed in range(3):
        idx = choose_poison_indices(y, 10, seed=seed, target=0)
        assert (y[idx] == 0).any()
        assert len(np.unique(y[idx])) == 10


def test_choose_indices_exclude_target():
    y = _labels()
    for target in (0, 3):
        idx = choose_poison_indices(y, 20, seed=0, target=target, exclude_target=True)
        assert len(idx) == 200  # the count is still int(rate * N) of the whole set
        assert not (y[idx] == target).any()
        assert len(np.unique(idx)) == len(idx)


def test_choose_indices_too_many_candidates():
    y = _labels()
    with pytest.raises(ValueError, match="candidates"):
        choose_poison_indices(y, 95, seed=0, exclude_target=True)


@pytest.fixture
def train_set():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(2, 256, (200, 32, 32, 3), generator=g, dtype=torch.uint8)
    y = torch.from_numpy(_labels(200))
    return x, y


@pytest.mark.parametrize("kind", ["square", "blend", "warp"])
def test_make_poison_and_apply(train_set, kind):
    x, y = train_set
    x0, y0 = x.clone(), y.clone()
    trig = make_trigger(kind, seed=1)
    rec = make_poison(x.numpy(), y.numpy(), trig, rate_percent=10, seed=5, target=2)
    expected_idx = choose_poison_indices(y.numpy(), 10, seed=5, target=2)
    assert torch.equal(rec.indices, torch.from_numpy(expected_idx))
    assert rec.images.dtype == torch.uint8 and rec.images.shape == (20, 32, 32, 3)
    assert rec.target == 2
    xp, yp = rec.apply(x, y)
    # inputs are not modified
    assert torch.equal(x, x0) and torch.equal(y, y0)
    idx = rec.indices
    others = torch.ones(200, dtype=torch.bool)
    others[idx] = False
    assert torch.equal(xp[idx], trig.apply(x0[idx]))
    assert not torch.equal(xp[idx], x0[idx])
    assert (yp[idx] == 2).all()
    assert torch.equal(xp[others], x0[others])
    assert torch.equal(yp[others], y0[others])
    # relabel=False: the triggered images keep their true labels (the authors' contaminated "clean" set)
    xq, yq = rec.apply(x, y, relabel=False)
    assert torch.equal(xq, xp)
    assert torch.equal(yq, y0)


def test_make_poison_accepts_tensors_and_zero_rate(train_set):
    x, y = train_set
    trig = make_trigger("square")
    rec = make_poison(x, y.numpy(), trig, rate_percent=0, seed=0)
    assert len(rec.indices) == 0 and rec.images.shape == (0, 32, 32, 3)
    xp, yp = rec.apply(x, y)
    assert torch.equal(xp, x) and torch.equal(yp, y)
    rec2 = make_poison(x, y.numpy(), trig, rate_percent=2, seed=0, exclude_target=True)
    assert len(rec2.indices) == 4 and not (y[rec2.indices] == 0).any()


def test_poison_record_save_load(tmp_path, train_set):
    x, y = train_set
    rec = make_poison(x.numpy(), y.numpy(), make_trigger("blend", seed=2), rate_percent=6, seed=3, target=4)
    path = tmp_path / "poison.safetensors"
    rec.save(path)
    back = PoisonRecord.load(path)
    assert torch.equal(back.indices, rec.indices)
    assert torch.equal(back.images, rec.images)
    assert back.target == 4
    assert back.meta == rec.meta
    assert back.meta["rate_percent"] == 6 and back.meta["seed"] == 3 and back.meta["trigger"] == "blend"
    xa, ya = rec.apply(x, y)
    xb, yb = back.apply(x, y)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_poison_record_load_rejects_other_files(tmp_path):
    from pmoe_backdoor.io import save_tensors

    path = tmp_path / "t.safetensors"
    save_tensors(path, {"grid": torch.zeros(3)}, {"kind": "warp"})
    with pytest.raises(ValueError, match="not a poison record"):
        PoisonRecord.load(path)


@pytest.mark.parametrize("target", [0, 3])
def test_asr_set(target):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(2, 256, (50, 32, 32, 3), generator=g, dtype=torch.uint8)
    y = torch.from_numpy(_labels(50, 5))
    x0 = x.clone()
    trig = make_trigger("square")
    xa, ya = asr_set(x, y, trig, target=target)
    keep = y != target
    assert len(ya) == int(keep.sum()) == 40
    assert not (ya == target).any()
    assert torch.equal(ya, y[keep])
    assert torch.equal(xa, trig.apply(x[keep]))
    assert (xa[:, :4, :4, :] == 1).all()  # every image is triggered
    assert torch.equal(x, x0)
