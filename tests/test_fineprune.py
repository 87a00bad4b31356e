"""Tests of defenses.fine_pruning and jobs.defense.fineprune_data against docs/faithful-behaviour.md §6
(Fine-Pruning)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from pmoe_backdoor.attacks.poison import make_poison
from pmoe_backdoor.attacks.triggers import make_trigger
from pmoe_backdoor.defenses.fine_pruning import channels_to_prune, expert_channel_means, prune_experts, remove_masks
from pmoe_backdoor.jobs.defense import fineprune_data
from pmoe_backdoor.models.architectures import build_model
from pmoe_backdoor.runtime import to_input

pytestmark = pytest.mark.usefixtures("one_thread")

E, C = 4, 16  # experts and channels per expert of a widen-1 pmoe


def _pmoe(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("pmoe", 4, widen_factor=1)


def _images(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 32, 32, 3), generator=g, dtype=torch.uint8)


def _with_bn_stats(model: nn.Module) -> nn.Module:
    """Give every BN non-trivial running statistics, so eval mode differs clearly from train mode."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


# ----------------------------------------------------------------------------------------------------------
# expert_channel_means
# ----------------------------------------------------------------------------------------------------------

def test_expert_channel_means_matches_hand_computation():
    model = _with_bn_stats(_pmoe())
    with torch.no_grad():  # non-zero biases, so "bias included" is exercised
        model.moe.expert_conv.bias.copy_(torch.linspace(-1, 1, E * C))
    x = _images(12)
    model.train()  # the function must switch to eval mode itself and restore train mode afterwards
    means = expert_channel_means(model, x, batch_size=5)  # 5 + 5 + 2: batching must not change the mean
    assert model.training

    model.eval()
    with torch.no_grad():
        out, _ = model.moe(model.features(to_input(x)))
    assert out.shape == (12, E * C, 8, 8)
    expected = out.double().mean(dim=(0, 2, 3)).view(E, C).float()

    assert means.shape == (E, C)
    assert means.dtype == torch.float32
    torch.testing.assert_close(means, expected, rtol=1e-5, atol=1e-6)
    # the signed mean: some channels are negative (no ReLU before averaging)
    assert (means < 0).any() and (means > 0).any()


def test_expert_channel_means_rejects_wrn():
    torch.manual_seed(0)
    wrn = build_model("wrn", 4, widen_factor=1)
    with pytest.raises(TypeError, match="pmoe"):
        expert_channel_means(wrn, _images(2))


# ----------------------------------------------------------------------------------------------------------
# channels_to_prune
# ----------------------------------------------------------------------------------------------------------

def _hand_means() -> torch.Tensor:
    """Per expert a different permutation of 0..15, so the lowest channels are known by hand."""
    perms = [list(range(16)),                      # lowest: 0, 1, 2, 3
             list(range(15, -1, -1)),              # lowest: 15, 14, 13, 12
             [5, 3, 9, 0, 12, 1, 14, 2, 4, 6, 8, 10, 7, 11, 13, 15],  # lowest: ch3 (0), ch5 (1), ch7 (2), ch1 (3)
             [10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9]]  # lowest: 6, 7, 8, 9
    return torch.tensor(perms, dtype=torch.float32) - 7.5  # signed values


@pytest.mark.parametrize("rate, n", [(10, 1), (20, 3), (30, 4), (0, 0), (100, 16)])
def test_channels_to_prune_counts(rate, n):
    pruned = channels_to_prune(_hand_means(), rate)
    assert len(pruned) == E
    assert all(len(p) == n for p in pruned)


def test_channels_to_prune_picks_lowest_in_ascending_order():
    pruned = channels_to_prune(_hand_means(), 30)
    assert [p.tolist() for p in pruned] == [[0, 1, 2, 3], [15, 14, 13, 12], [3, 5, 7, 1], [6, 7, 8, 9]]
    assert [p.tolist() for p in channels_to_prune(_hand_means(), 10)] == [[0], [15], [3], [6]]


def test_channels_to_prune_ranks_each_expert_separately():
    means = _hand_means()
    means[1] += 100.0  # expert 2's channels are all far above the others: still 4 of its own are pruned
    pruned = channels_to_prune(means, 30)
    assert pruned[1].tolist() == [15, 14, 13, 12]


# ----------------------------------------------------------------------------------------------------------
# prune_experts / remove_masks
# ----------------------------------------------------------------------------------------------------------

PRUNED = [torch.tensor([3]), torch.tensor([0, 5]), torch.tensor([], dtype=torch.long), torch.tensor([15, 7])]
ROWS = [0 * C + 3, 1 * C + 0, 1 * C + 5, 3 * C + 15, 3 * C + 7]


def _pmoe_with_bias() -> nn.Module:
    model = _pmoe()
    with torch.no_grad():  # biases start at zero; make them non-zero so zeroing them is observable
        model.moe.expert_conv.bias.copy_(torch.linspace(0.5, 1.5, E * C))
    return model


def test_prune_experts_zeroes_exactly_the_chosen_rows():
    model = _pmoe_with_bias()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prune_experts(model, PRUNED, mask=False)
    conv = model.moe.expert_conv
    rows = torch.zeros(E * C, dtype=torch.bool)
    rows[ROWS] = True
    assert (conv.weight[rows] == 0).all()
    assert (conv.bias[rows] == 0).all()
    assert torch.equal(conv.weight[~rows], before["moe.expert_conv.weight"][~rows])
    assert torch.equal(conv.bias[~rows], before["moe.expert_conv.bias"][~rows])
    assert (before["moe.expert_conv.weight"][rows] != 0).any(dim=1).all()  # they were not zero before
    after = model.state_dict()
    assert set(after) == set(before)
    for k in before:
        if not k.startswith("moe.expert_conv."):
            assert torch.equal(after[k], before[k]), k


def _step(model: nn.Module, x: torch.Tensor, steps: int = 2) -> None:
    """Optimizer steps on a loss whose gradient reaches every expert_conv weight and bias."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    g = torch.Generator().manual_seed(3)
    model.train()
    for _ in range(steps):
        out, _ = model.moe(model.features(to_input(x)))
        loss = (out * torch.randn(out.shape, generator=g)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_prune_without_mask_regrows_after_a_step():
    model = _pmoe_with_bias()
    prune_experts(model, PRUNED, mask=False)
    _step(model, _images(4))
    conv = model.moe.expert_conv
    assert (conv.weight[ROWS] != 0).any(dim=1).all()
    assert (conv.bias[ROWS] != 0).all()


def test_prune_with_mask_keeps_zeros_through_steps_and_remove_masks():
    model = _pmoe_with_bias()
    prune_experts(model, PRUNED, mask=True)
    conv = model.moe.expert_conv
    w_before = conv.weight.detach().clone()
    _step(model, _images(4))
    assert (conv.weight[ROWS] == 0).all()
    assert (conv.bias[ROWS] == 0).all()
    keep = [r for r in range(E * C) if r not in ROWS]
    assert not torch.equal(conv.weight[keep], w_before[keep])  # the step did change the other rows

    remove_masks(model)
    conv = model.moe.expert_conv
    assert isinstance(conv.weight, nn.Parameter) and isinstance(conv.bias, nn.Parameter)
    assert not hasattr(conv, "weight_orig") and not hasattr(conv, "weight_mask")
    assert not hasattr(conv, "bias_orig") and not hasattr(conv, "bias_mask")
    assert len(conv._forward_pre_hooks) == 0
    assert (conv.weight[ROWS] == 0).all() and (conv.bias[ROWS] == 0).all()
    assert "moe.expert_conv.weight" in model.state_dict()
    assert not any(k.endswith(("_orig", "_mask")) for k in model.state_dict())
    # a plain parameter again: a further step regrows the rows
    _step(model, _images(4), steps=1)
    assert (model.moe.expert_conv.weight[ROWS] != 0).any(dim=1).all()


# ----------------------------------------------------------------------------------------------------------
# jobs.defense.fineprune_data
# ----------------------------------------------------------------------------------------------------------

N = 40


@pytest.fixture(scope="module")
def train_set():
    x = _images(N, seed=5)
    x[:, 31, 31, 0] = torch.arange(N, dtype=torch.uint8)  # a pixel outside the square trigger names each image
    y = torch.arange(N) % 4
    return {"x_train": x, "y_train": y, "x_test": x[:4], "y_test": y[:4]}


def _record(t, kind: str):
    trig = make_trigger(kind, {}, seed=0)
    rec = make_poison(t["x_train"], t["y_train"].numpy(), trig, 20, seed=1, target=0)
    assert len(rec.indices) == 8
    assert (t["y_train"][rec.indices] != 0).any()  # some poisoned images are not of the target class
    return trig, rec


def test_fineprune_data_authors_square_has_triggered_images_with_true_labels(train_set):
    trig, rec = _record(train_set, "square")
    x_ft, y_ft, _ = fineprune_data(train_set["x_train"], train_set["y_train"], rec, "square", "authors", 10, seed=0)
    idx = rec.indices
    assert torch.equal(x_ft[idx], trig.apply(train_set["x_train"][idx]))
    assert not torch.equal(x_ft[idx], train_set["x_train"][idx])
    assert torch.equal(y_ft, train_set["y_train"])  # true labels, not the target
    other = torch.ones(N, dtype=torch.bool)
    other[idx] = False
    assert torch.equal(x_ft[other], train_set["x_train"][other])


def test_fineprune_data_does_not_modify_the_input(train_set):
    x0 = train_set["x_train"].clone()
    _, rec = _record(train_set, "square")
    fineprune_data(train_set["x_train"], train_set["y_train"], rec, "square", "authors", 10, seed=0)
    assert torch.equal(train_set["x_train"], x0)


@pytest.mark.parametrize("kind, data", [("square", "clean"), ("blend", "authors"), ("blend", "clean"),
                                       ("warp", "authors")])
def test_fineprune_data_clean_set(train_set, kind, data):
    _, rec = _record(train_set, kind)
    x_ft, y_ft, _ = fineprune_data(train_set["x_train"], train_set["y_train"], rec, kind, data, 10, seed=0)
    assert torch.equal(x_ft, train_set["x_train"])
    assert torch.equal(y_ft, train_set["y_train"])


def test_fineprune_data_rejects_unknown_name(train_set):
    _, rec = _record(train_set, "square")
    with pytest.raises(ValueError, match="finetune_data"):
        fineprune_data(train_set["x_train"], train_set["y_train"], rec, "square", "poisoned", 10, seed=0)


def test_fineprune_data_activation_images_counted_and_seeded(train_set):
    _, rec = _record(train_set, "square")
    x_ft, _, act = fineprune_data(train_set["x_train"], train_set["y_train"], rec, "square", "authors", 12, seed=0)
    assert act.shape == (12, 32, 32, 3) and act.dtype == torch.uint8
    ids = act[:, 31, 31, 0].long()
    assert len(set(ids.tolist())) == 12  # distinct training images, without replacement
    assert torch.equal(act, x_ft[ids])  # taken from the fine-tuning array (triggered ones included)
    assert ids.tolist() != list(range(12))  # shuffled, not the first 12

    _, _, again = fineprune_data(train_set["x_train"], train_set["y_train"], rec, "square", "authors", 12, seed=0)
    assert torch.equal(act, again)
    _, _, other = fineprune_data(train_set["x_train"], train_set["y_train"], rec, "square", "authors", 12, seed=1)
    assert not torch.equal(act, other)

    _, _, five = fineprune_data(train_set["x_train"], train_set["y_train"], rec, "square", "authors", 5, seed=0)
    assert torch.equal(five, act[:5])  # a prefix of the same seeded order
    _, _, all_ = fineprune_data(train_set["x_train"], train_set["y_train"], rec, "square", "authors", 10_000, seed=0)
    assert all_.shape[0] == N
    assert sorted(all_[:, 31, 31, 0].tolist()) == list(range(N))
