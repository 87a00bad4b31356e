"""Tests of defenses.neural_cleanse: the outlier statistic, the detection rule and the reverse engineering."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from pmoe_backdoor.defenses.neural_cleanse import NCConfig, anomaly_indices, detect, reverse_engineer

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")


# ----------------------------------------------------------------------------------------------------------
# anomaly_indices / detect
# ----------------------------------------------------------------------------------------------------------

def test_anomaly_indices_hand_computed():
    norms = np.array([1.0, 2.0, 3.0, 4.0, 100.0])
    # median 3; |x - 3| = 2, 1, 0, 1, 97; their median (MAD) 1; consistency constant 1.4826
    expected = np.array([2.0, 1.0, 0.0, 1.0, 97.0]) / 1.4826
    np.testing.assert_allclose(anomaly_indices(norms), expected, rtol=1e-12)


def test_anomaly_indices_even_count():
    norms = [10.0, 100.0, 101.0, 99.0, 102.0, 98.0]
    # median (99 + 100) / 2 = 99.5; deviations 89.5, .5, 1.5, .5, 2.5, 1.5 -> sorted median (1.5 + 1.5) / 2
    med, mad = 99.5, 1.5 * 1.4826
    expected = np.abs(np.array(norms) - med) / mad
    np.testing.assert_allclose(anomaly_indices(norms), expected, rtol=1e-12)
    assert anomaly_indices(norms)[0] == pytest.approx(89.5 / (1.5 * 1.4826))


def test_detect_flags_a_low_outlier():
    classes = [3, 4, 5, 6, 7, 8]  # class ids differ from positions: the flagged id must be looked up
    r = detect(np.array([10.0, 100.0, 101.0, 99.0, 102.0, 98.0]), classes)
    assert r["flagged"] is True
    assert r["flagged_class"] == 3
    assert r["anomaly_index"][0] == pytest.approx(89.5 / (1.5 * 1.4826))
    assert r["max_low_anomaly_index"] == pytest.approx(89.5 / (1.5 * 1.4826))
    r = detect(np.array([100.0, 101.0, 99.0, 10.0, 102.0, 98.0]), classes)
    assert r["flagged"] and r["flagged_class"] == 6


def test_detect_picks_the_most_anomalous_low_class():
    r = detect(np.array([40.0, 10.0, 100.0, 101.0, 99.0, 102.0, 98.0, 100.0]), list(range(8)))
    assert r["flagged"] and r["flagged_class"] == 1


@pytest.mark.parametrize("norms", [
    [100.0, 101.0, 99.0, 102.0, 98.0, 500.0],   # a high outlier is not a backdoor
    [50.0] * 6,                                 # uniform (MAD 0)
    [100.0, 101.0, 99.0, 102.0, 98.0, 100.0],
])
def test_detect_does_not_flag(norms):
    r = detect(np.array(norms), list(range(6)))
    assert r["flagged"] is False
    assert r["flagged_class"] is None
    assert r["max_low_anomaly_index"] <= 2.0


def test_detect_high_outlier_has_a_large_index_but_is_ignored():
    r = detect(np.array([100.0, 101.0, 99.0, 102.0, 98.0, 500.0]), list(range(6)))
    assert r["anomaly_index"][5] > 100  # the statistic itself is symmetric; only the rule is one-sided


def test_detect_threshold():
    norms = np.array([90.0, 100.0, 101.0, 99.0, 102.0, 98.0])  # class 0's index = 9.5 / (1.5 * 1.4826) = 4.27
    assert detect(norms, list(range(6)), threshold=4.0)["flagged"]
    assert not detect(norms, list(range(6)), threshold=4.5)["flagged"]


# ----------------------------------------------------------------------------------------------------------
# NCConfig
# ----------------------------------------------------------------------------------------------------------

def test_ncconfig_from_dict():
    assert NCConfig.from_dict(None) == NCConfig()
    cfg = NCConfig.from_dict({"epochs": 3, "batch_size": 8})
    assert cfg.epochs == 3 and cfg.batch_size == 8 and cfg.lr == NCConfig().lr
    with pytest.raises(ValueError, match="epoch"):
        NCConfig.from_dict({"epoch": 3})


# ----------------------------------------------------------------------------------------------------------
# reverse_engineer
# ----------------------------------------------------------------------------------------------------------

class CornerModel(nn.Module):
    """Class 0 whenever the top-left 3x3 pixels are bright (mean over them and the channels above 0.5),
    otherwise class 1 (classes 1..3 tie at 0 and argmax takes the first). Differentiable."""

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(10.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.gain * x[:, :, :3, :3].mean(dim=(1, 2, 3)) - 5.0
        return torch.cat([s[:, None], torch.zeros(x.shape[0], 3)], dim=1)


@pytest.fixture(scope="module")
def dark_corner_images() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (32, 32, 32, 3), generator=g, dtype=torch.uint8)
    x[:, :3, :3, :] = torch.randint(0, 60, (32, 3, 3, 3), generator=g, dtype=torch.uint8)  # class 1 by default
    return x


def test_corner_model_premise(dark_corner_images):
    from pmoe_backdoor.runtime import to_input

    m = CornerModel()
    with torch.no_grad():
        assert (m(to_input(dark_corner_images)).argmax(1) == 1).all()
        bright = dark_corner_images.clone()
        bright[:, :3, :3, :] = 255
        assert (m(to_input(bright)).argmax(1) == 0).all()


def test_reverse_engineer_finds_the_small_corner_mask(dark_corner_images):
    model = CornerModel()
    cfg = NCConfig(epochs=30, batch_size=16)
    r = reverse_engineer(model, dark_corner_images, 0, cfg, seed=0, device=CPU)
    assert r["reached_threshold"] is True
    assert r["asr"] >= cfg.attack_threshold
    mask, pattern = r["mask"], r["pattern"]
    assert mask.shape == (32, 32) and pattern.shape == (3, 32, 32)
    assert 0 <= float(mask.min()) and float(mask.max()) <= 1
    assert 0 <= float(pattern.min()) and float(pattern.max()) <= 1
    assert r["l1"] == pytest.approx(float(mask.sum()), rel=1e-5)
    assert r["l1"] < 20  # of 1024 (the initial mask is ~512); about 4.5 suffices (9 pixels at ~0.5)
    corner = float(mask[:3, :3].sum())
    assert corner / r["l1"] > 0.8  # concentrated in the top-left corner
    assert float((mask[:3, :3] * pattern[:, :3, :3]).mean()) > 0.3  # and bright there
    assert 1 <= r["epochs_run"] <= 30
    assert model.gain.requires_grad  # frozen only during the search: the caller's model is left as it was


def test_reverse_engineer_unreachable_target_reports_last_mask(dark_corner_images):
    # class 2 ties with class 1 at 0 and argmax takes class 1 first: the target can never be reached
    r = reverse_engineer(CornerModel(), dark_corner_images, 2, NCConfig(epochs=3, batch_size=16), seed=0, device=CPU)
    assert r["reached_threshold"] is False
    assert r["asr"] == 0.0
    assert r["epochs_run"] == 3
    assert r["mask"].shape == (32, 32)
    assert r["l1"] == pytest.approx(float(r["mask"].sum()), rel=1e-5)


def test_reverse_engineer_original_schedule_finds_the_corner_mask(dark_corner_images):
    cfg = NCConfig.from_dict({"schedule": "original", "epochs": 40, "batch_size": 16})
    r = reverse_engineer(CornerModel(), dark_corner_images, 0, cfg, seed=0, device=CPU)
    assert r["reached_threshold"] is True and r["asr"] >= 0.99
    assert r["l1"] < 20 and float(r["mask"][:3, :3].sum()) / r["l1"] > 0.8


# ----------------------------------------------------------------------------------------------------------
# budgets
# ----------------------------------------------------------------------------------------------------------

def test_original_budget_is_the_original_script():
    from pmoe_backdoor.defenses.neural_cleanse import ORIGINAL_BUDGET

    cfg = NCConfig.for_budget("original", {"epochs": 2, "patience": 1}, "fast")  # optimizer and schedule unread
    assert (cfg.schedule, cfg.epochs, cfg.mini_batches, cfg.batch_size, cfg.lr, cfg.init) == (
        "original", 1000, 1000 // 32, 32, 0.1, "uniform")
    assert (cfg.init_cost, cfg.patience, cfg.early_stop_patience) == (1e-3, 5, 25)
    assert NCConfig.from_dict(ORIGINAL_BUDGET) == cfg
    assert NCConfig.for_budget("fast", {"epochs": 3}, "fast") == NCConfig(epochs=3)
    with pytest.raises(ValueError, match="budget"):
        NCConfig.for_budget("slow", None, "fast")


def test_original_schedule_refuses_a_budget_it_cannot_finish_in():
    # the cost stays 0 for 5 epochs and the early stop needs 25 more: 20 epochs would never run its course
    with pytest.raises(ValueError, match="budget: original"):
        NCConfig.from_dict({"schedule": "original", "epochs": 20})
    assert NCConfig.from_dict({"schedule": "original", "epochs": 31}).epochs == 31


def test_batch_stream_reshuffles_each_pass():
    from pmoe_backdoor.defenses.neural_cleanse import batch_stream

    stream = batch_stream(5, 2, torch.Generator().manual_seed(0))
    batches = [next(stream) for _ in range(6)]
    assert [len(b) for b in batches] == [2, 2, 1, 2, 2, 1]  # each pass ends in its partial batch
    assert sorted(torch.cat(batches[:3]).tolist()) == sorted(torch.cat(batches[3:]).tolist()) == list(range(5))


def test_reverse_engineer_uniform_start_with_mini_batches(dark_corner_images):
    cfg = NCConfig(epochs=30, batch_size=16, mini_batches=3, init="uniform")
    r = reverse_engineer(CornerModel(), dark_corner_images, 0, cfg, seed=0, device=CPU)
    assert r["reached_threshold"] is True and r["l1"] < 40
    with pytest.raises(ValueError, match="init"):
        NCConfig.from_dict({"init": "zeros"})
