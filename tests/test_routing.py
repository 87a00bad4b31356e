"""Tests of pmoe_backdoor.models.routing against docs/faithful-behaviour.md §7 (patch-selection analysis)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pmoe_backdoor.attacks.triggers import SquareTrigger, make_trigger
from pmoe_backdoor.models.architectures import build_model
from pmoe_backdoor.models.routing import patch_grid, patch_sums, routing_indices, trigger_patch_stats, trigger_positions
from pmoe_backdoor.runtime import to_input

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------------------
# patch_grid
# ----------------------------------------------------------------------------------------------------------

def test_patch_grid_marks_k_positions_per_expert():
    idx = torch.tensor([[0, 9, 63], [7, 8, 56], [10, 17, 42]])  # (E=3, k=3)
    grid = patch_grid(idx)
    assert grid.shape == (3, 8, 8)
    assert grid.sum(axis=(1, 2)).tolist() == [3, 3, 3]
    assert set(np.unique(grid).tolist()) == {0, 1}
    expected = {0: [(0, 0), (1, 1), (7, 7)], 1: [(0, 7), (1, 0), (7, 0)], 2: [(1, 2), (2, 1), (5, 2)]}
    for e, cells in expected.items():
        assert sorted(zip(*np.nonzero(grid[e]))) == cells


def test_patch_grid_accepts_numpy_and_16_of_64():
    rng = np.random.default_rng(0)
    idx = np.stack([rng.choice(64, 16, replace=False) for _ in range(4)])
    grid = patch_grid(idx)
    assert grid.shape == (4, 8, 8)
    for e in range(4):
        assert grid[e].sum() == 16
        assert sorted(np.flatnonzero(grid[e].ravel()).tolist()) == sorted(idx[e].tolist())


# ----------------------------------------------------------------------------------------------------------
# patch_sums
# ----------------------------------------------------------------------------------------------------------

def test_patch_sums_of_white_image_is_48():
    img = np.full((32, 32, 3), 255, dtype=np.uint8)
    sums = patch_sums(img)
    assert sums.shape == (8, 8)
    np.testing.assert_allclose(sums, 48.0)


def test_patch_sums_one_bright_block():
    img = torch.zeros(32, 32, 3, dtype=torch.uint8)
    img[8:12, 20:24, :] = 255  # block (row 2, col 5)
    sums = patch_sums(img)
    expected = np.zeros((8, 8))
    expected[2, 5] = 48.0
    np.testing.assert_allclose(sums, expected)


def test_patch_sums_partial_values():
    img = np.zeros((32, 32, 3), dtype=np.uint8)
    img[0:4, 4:8, :] = 51              # 0.2 on [0, 1]: 48 * 0.2 = 9.6 in block (0, 1)
    img[29, 2, 1] = 255                # a single value in block (7, 0)
    img[12:16, 28:32, 0] = 255         # one channel of block (3, 7): 16
    sums = patch_sums(img)
    expected = np.zeros((8, 8))
    expected[0, 1], expected[7, 0], expected[3, 7] = 9.6, 1.0, 16.0
    np.testing.assert_allclose(sums, expected, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------
# trigger_positions
# ----------------------------------------------------------------------------------------------------------

def test_trigger_positions_default_square_is_top_left_block():
    assert trigger_positions(SquareTrigger()) == [0]
    assert trigger_positions(make_trigger("square", {})) == [0]


@pytest.mark.parametrize("params, positions", [
    ({"size": 6, "row": 2, "col": 2}, [0, 1, 8, 9]),   # rows 2..7, cols 2..7 -> blocks rows 0..1, cols 0..1
    ({"size": 4, "row": 4, "col": 28}, [15]),          # exactly block (1, 7)
    ({"size": 3, "row": 29, "col": 0}, [56]),          # block (7, 0)
    ({"size": 2, "row": 3, "col": 3}, [0, 1, 8, 9]),   # straddles the corner of four blocks
    ({"size": 2, "row": 3, "col": 7}, [1, 2, 9, 10]),
    ({"size": 5, "row": 0, "col": 0}, [0, 1, 8, 9]),
])
def test_trigger_positions_of_squares(params, positions):
    assert trigger_positions(make_trigger("square", params)) == positions


def test_trigger_positions_rejects_blend():
    with pytest.raises(TypeError, match="blend"):
        trigger_positions(make_trigger("blend", {}, seed=0))


# ----------------------------------------------------------------------------------------------------------
# trigger_patch_stats
# ----------------------------------------------------------------------------------------------------------

def test_trigger_patch_stats_hand_made():
    positions = [0, 9]
    idx = torch.tensor([
        [[0, 5], [3, 4]],     # image 0: expert 0 only
        [[1, 2], [9, 63]],    # image 1: expert 1 only
        [[3, 4], [5, 6]],     # image 2: none
        [[9, 7], [0, 63]],    # image 3: both
        [[0, 9], [10, 11]],   # image 4: expert 0 (both positions: still one expert)
    ])
    s = trigger_patch_stats(idx, positions)
    assert s["n_images"] == 5
    assert s["reached_fraction"] == pytest.approx(4 / 5)
    assert s["mean_experts"] == pytest.approx((1 + 1 + 0 + 2 + 1) / 5)
    assert s["per_expert_fraction"] == pytest.approx([3 / 5, 2 / 5])


def test_trigger_patch_stats_never_reached():
    idx = torch.tensor([[[1, 2, 3]] * 4] * 3)  # (3, 4, 3)
    s = trigger_patch_stats(idx, [0])
    assert s == {"n_images": 3, "reached_fraction": 0.0, "mean_experts": 0.0, "per_expert_fraction": [0.0] * 4}


# ----------------------------------------------------------------------------------------------------------
# routing_indices
# ----------------------------------------------------------------------------------------------------------

def _images(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 32, 32, 3), generator=g, dtype=torch.uint8)


def test_routing_indices_rejects_wrn():
    torch.manual_seed(0)
    with pytest.raises(TypeError, match="routing"):
        routing_indices(build_model("wrn", 4, widen_factor=1), _images(2))


def test_routing_indices_matches_model_in_eval_mode():
    torch.manual_seed(0)
    model = build_model("pmoe", 4, widen_factor=1)
    with torch.no_grad():  # routers big enough that the top-k is well separated; BN stats far from batch stats
        model.moe.router.weight.normal_(0, 1.0)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    x = _images(10)
    model.train()
    idx = routing_indices(model, x, batch_size=4)  # 4 + 4 + 2
    assert model.training  # restored
    assert idx.shape == (10, 4, 16) and idx.dtype == torch.int64 and idx.device.type == "cpu"

    model.eval()
    with torch.no_grad():
        _, ref = model(to_input(x), return_routing=True)
        model.train()
        _, train_mode = model(to_input(x), return_routing=True)
    assert torch.equal(idx, ref)
    assert not torch.equal(idx, train_mode)  # the comparison can tell eval from train mode
    assert idx.min() >= 0 and idx.max() < 64
