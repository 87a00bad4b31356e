"""Tests of pmoe_backdoor.models.architectures against the facts of docs/faithful-behaviour.md §1."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pmoe_backdoor.models.architectures import (
    BN_EPS,
    PatchMoE,
    TFSamePadConv,
    build_model,
    count_parameters,
    set_bn_momentum,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pmoe10() -> nn.Module:
    """The paper-width model (widen 10, CIFAR-10). Only used without backward passes; never mutated."""
    torch.manual_seed(0)
    return build_model("pmoe", 10)


def _narrow(widen: int = 2, num_classes: int = 10, seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("pmoe", num_classes, widen_factor=widen, **kw)


# ----------------------------------------------------------------------------------------------------------
# 1. parameter counts, shapes, argument errors
# ----------------------------------------------------------------------------------------------------------

def test_parameter_count_cifar10(pmoe10):
    # docs/faithful-behaviour.md §1.4: PyTorch sum of parameters 3,962,890 for CIFAR-10
    assert count_parameters(pmoe10) == 3_962_890


def test_parameter_count_gtsrb():
    assert count_parameters(build_model("pmoe", 43)) == 3_984_043


def test_parameter_breakdown_matches_spec(pmoe10):
    # a few per-part counts from the table in docs/faithful-behaviour.md §1.4
    def n(m):
        return sum(p.numel() for p in m.parameters())

    assert n(pmoe10.trunk.stem) == 448
    assert n(pmoe10.pre_conv) == 1_843_840
    assert n(pmoe10.moe.router) == 2_560
    assert n(pmoe10.moe.expert_bn) == 5_120
    assert n(pmoe10.moe.expert_conv) == 410_240
    assert n(pmoe10.head.fc) == 6_410
    bn_buffers = sum(b.numel() for name, b in pmoe10.named_buffers() if not name.endswith("num_batches_tracked"))
    assert bn_buffers == 8_352


def test_pmoe10_forward_shapes(pmoe10):
    pmoe10.eval()
    with torch.no_grad():
        x = torch.rand(2, 3, 32, 32)
        feats = pmoe10.features(x)
        logits, idx = pmoe10(x, return_routing=True)
    assert feats.shape == (2, 640, 8, 8)
    assert logits.shape == (2, 10)
    assert idx.shape == (2, 4, 16)


def test_wrn_builds_and_runs_forward():
    torch.manual_seed(0)
    model = build_model("wrn", 10)
    model.eval()
    with torch.no_grad():
        x = torch.rand(2, 3, 32, 32)
        logits = model(x)
        logits2, routing = model(x, return_routing=True)
    assert logits.shape == (2, 10)
    assert torch.isfinite(logits).all()
    assert routing is None
    assert torch.equal(logits, logits2)
    # the dense baseline has the same trunk, and a third WRN group instead of the MoE stage
    assert model.group3.conv1.out_channels == 640
    assert isinstance(model.group3.conv1, TFSamePadConv)


def test_fixed_moe_width_pins_640_and_160():
    model = _narrow(widen=1, moe_width="fixed")
    assert model.pre_conv.out_channels == 640
    assert model.moe.expert_conv.weight.shape == (4 * 160, 640, 1, 1)
    scaled = _narrow(widen=1)
    assert scaled.pre_conv.out_channels == 64
    assert scaled.moe.expert_conv.weight.shape == (4 * 16, 64, 1, 1)


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        ({"name": "resnet"}, "model name"),
        ({"name": "PMOE"}, "model name"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": 65}, "top_k"),
        ({"moe_width": "wide"}, "moe_width"),
        ({"bn_momentum": 0.0}, "bn_momentum"),
        ({"bn_momentum": 1.5}, "bn_momentum"),
        ({"num_classes": 1}, "num_classes"),
        ({"widen_factor": 0}, "widen_factor"),
        ({"num_experts": 0}, "num_experts"),
    ],
)
def test_build_model_errors_name_the_argument(kwargs, names):
    args = {"name": "pmoe", "num_classes": 10, "widen_factor": 1}
    args.update(kwargs)
    with pytest.raises(ValueError, match=names):
        build_model(**args)


def test_build_model_accepts_boundary_values():
    assert _narrow(widen=1, top_k=1).moe.top_k == 1
    assert _narrow(widen=1, top_k=64).moe.top_k == 64
    m = _narrow(widen=1, bn_momentum=1.0)
    assert all(b.momentum == 1.0 for b in m.modules() if isinstance(b, nn.BatchNorm2d))


def test_batchnorm_defaults_match_keras():
    m = _narrow(widen=1)
    bns = [b for b in m.modules() if isinstance(b, nn.BatchNorm2d)]
    assert bns
    assert all(b.eps == BN_EPS == 1e-3 and b.momentum == 0.01 for b in bns)
    set_bn_momentum(m, 0.2)
    assert all(b.momentum == 0.2 for b in bns)


# ----------------------------------------------------------------------------------------------------------
# 2. TensorFlow 'same' padding for the stride-2 3x3 convolutions (docs/faithful-behaviour.md §1.5, item 1)
# ----------------------------------------------------------------------------------------------------------

def _centre_tap(conv: nn.Conv2d) -> nn.Conv2d:
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, 1, 1] = 1.0
        if conv.bias is not None:
            conv.bias.zero_()
    return conv


def test_tf_same_pad_centres_output_on_odd_pixels():
    conv = _centre_tap(TFSamePadConv(1, 1, 3, 2))
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        y = conv(x)
    assert y.shape == (2, 1, 16, 16)
    # output (r, c) is centred on input (2r+1, 2c+1): output (0, 0) sits on input pixel (1, 1)
    assert torch.equal(y, x[:, :, 1::2, 1::2])
    assert y[0, 0, 0, 0] == x[0, 0, 1, 1]


def test_pytorch_symmetric_padding_would_fail_the_same_check():
    # shows that the check above discriminates: padding=1 centres output (0, 0) on input (0, 0)
    conv = _centre_tap(nn.Conv2d(1, 1, 3, stride=2, padding=1))
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        y = conv(x)
    assert y.shape == (2, 1, 16, 16)
    assert not torch.allclose(y, x[:, :, 1::2, 1::2])
    assert torch.equal(y, x[:, :, 0::2, 0::2])


def test_tf_same_pad_odd_width_pads_per_axis():
    # TF 'same', stride 2, kernel 3: even size -> pad (0, 1), odd size -> pad (1, 1).
    # Height 32 (even) and width 33 (odd) check that each axis gets its own padding.
    conv = _centre_tap(TFSamePadConv(1, 1, 3, 2))
    x = torch.randn(1, 1, 32, 33)
    with torch.no_grad():
        y = conv(x)
    assert y.shape == (1, 1, 16, 17)
    assert torch.equal(y, x[:, :, 1::2, 0::2])


@pytest.mark.parametrize(("r", "c"), [(0, 0), (2, 2), (7, 5)])
def test_feature_position_receptive_field(r, c):
    # docs/faithful-behaviour.md §1.1: position (r, c) of the 8x8 map has a 17x17 receptive field centred on input
    # (4r+3, 4c+3)
    torch.manual_seed(0)
    model = build_model("pmoe", 10, widen_factor=1).double().eval()
    x = torch.rand(1, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    model.features(x)[0, :, r, c].sum().backward()
    nz = (x.grad[0].abs().sum(0) > 0).nonzero()
    cr, cc = 4 * r + 3, 4 * c + 3
    assert nz[:, 0].min().item() == max(cr - 8, 0) and nz[:, 0].max().item() == min(cr + 8, 31)
    assert nz[:, 1].min().item() == max(cc - 8, 0) and nz[:, 1].max().item() == min(cc + 8, 31)


def test_model_stride2_convs_output_sizes():
    model = _narrow(widen=1)
    assert isinstance(model.pre_conv, TFSamePadConv)
    assert isinstance(model.trunk.group2.conv1, TFSamePadConv)
    assert not isinstance(model.trunk.group1.conv1, TFSamePadConv)  # stride 1: symmetric padding
    shapes = {}
    hooks = [
        model.pre_conv.register_forward_hook(lambda m, i, o: shapes.__setitem__("pre", tuple(o.shape))),
        model.trunk.group2.conv1.register_forward_hook(lambda m, i, o: shapes.__setitem__("g2", tuple(o.shape))),
    ]
    model.eval()
    with torch.no_grad():
        model(torch.rand(3, 3, 32, 32))
    for h in hooks:
        h.remove()
    assert shapes["pre"][2:] == (8, 8)
    assert shapes["g2"][2:] == (16, 16)


# ----------------------------------------------------------------------------------------------------------
# 3. router semantics (docs/faithful-behaviour.md §1.2, §1.3)
# ----------------------------------------------------------------------------------------------------------

@pytest.fixture
def routed():
    """A narrow model in eval mode whose routers are spread out (so that the top-k is well separated)."""
    model = _narrow(widen=2, seed=1)
    with torch.no_grad():
        model.moe.router.weight.normal_(0.0, 0.05)
    model.eval()
    torch.manual_seed(2)
    x = torch.rand(5, 3, 32, 32)
    return model, x


def test_forward_routing_indices(routed):
    model, x = routed
    with torch.no_grad():
        logits, idx = model(x, return_routing=True)
    assert logits.shape == (5, 10)
    assert idx.shape == (5, 4, 16)
    assert idx.min() >= 0 and idx.max() < 64
    for b in range(5):
        for e in range(4):
            assert len(set(idx[b, e].tolist())) == 16


def test_route_mask_holds_softmax_over_64_positions_at_top_k(routed):
    model, x = routed
    with torch.no_grad():
        feats = model.features(x)
        mask, top_idx = model.moe.route(feats)
        # recompute independently: 1x1 conv scores, softmax over the 64 positions of each (image, expert)
        scores = F.conv2d(feats.double(), model.moe.router.weight.double()).flatten(2)
        probs = torch.softmax(scores, dim=-1)
    assert mask.shape == (5, 4, 64)
    assert torch.allclose(probs.sum(-1), torch.ones(5, 4, dtype=torch.float64))
    nonzero = mask != 0
    assert (nonzero.sum(-1) == 16).all()
    for b in range(5):
        for e in range(4):
            sel = torch.nonzero(nonzero[b, e]).flatten()
            assert sorted(sel.tolist()) == sorted(top_idx[b, e].tolist())
            assert torch.allclose(mask[b, e, sel].double(), probs[b, e, sel], rtol=1e-5, atol=1e-7)
            others = torch.nonzero(~nonzero[b, e]).flatten()
            # the chosen k are the k largest probabilities
            assert probs[b, e, sel].min() >= probs[b, e, others].max() - 1e-9
    # not a softmax over the 16 selected values only (the MNIST variant): the mask sums to less than 1
    assert (mask.sum(-1) < 0.999).all()


def test_route_at_initialisation_is_near_uniform():
    # docs/faithful-behaviour.md §1.2: at initialisation p ~ 1/64 (router weights Normal(0, 1e-4))
    model = _narrow(widen=2)
    model.eval()
    with torch.no_grad():
        mask, _ = model.moe.route(model.features(torch.rand(2, 3, 32, 32)))
    vals = mask[mask != 0]
    assert vals.numel() == 2 * 4 * 16
    assert torch.allclose(vals, torch.full_like(vals, 1 / 64), rtol=0.02)


def test_experts_receive_features_times_gate_in_their_channel_block(routed):
    model, x = routed
    seen = {}
    h = model.moe.expert_bn.register_forward_hook(lambda m, i, o: seen.__setitem__("in", i[0].detach()))
    with torch.no_grad():
        feats = model.features(x)
        mask, _ = model.moe.route(feats)
        model(x)
    h.remove()
    masked = seen["in"]
    c = model.moe.in_channels
    assert masked.shape == (5, 4 * c, 8, 8)
    for e in range(4):
        gate = mask[:, e].view(5, 1, 8, 8)  # row-major positions: p = 8r + c
        assert torch.allclose(masked[:, e * c:(e + 1) * c], feats * gate, atol=1e-7)
    # and the 48 non-routed positions per expert are exactly zero
    zero_pos = (mask == 0).view(5, 4, 1, 8, 8).expand(5, 4, c, 8, 8).reshape(5, 4 * c, 8, 8)
    assert (masked[zero_pos] == 0).all()


def test_router_gets_gradient_for_every_expert():
    model = _narrow(widen=1, num_classes=4, seed=3)
    model.train()
    torch.manual_seed(4)
    x = torch.rand(8, 3, 32, 32)
    y = torch.randint(0, 4, (8,))
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    g = model.moe.router.weight.grad
    assert g is not None and g.shape == (4, model.moe.in_channels, 1, 1)
    per_expert = g.flatten(1).abs().sum(1)
    assert (per_expert > 0).all(), per_expert


def test_non_routed_positions_give_one_nonzero_constant_in_eval(routed):
    # docs/faithful-behaviour.md §1.3: experts run on the full masked 8x8 map, so after BN-ReLU-conv every
    # non-routed position (masked feature 0) becomes the same non-zero vector, for every position and every image
    # (eval mode).
    model, x = routed
    moe = model.moe
    torch.manual_seed(5)
    with torch.no_grad():  # give the expert BN and conv "trained" statistics, as after training
        moe.expert_bn.running_mean.normal_(0.0, 1.0)
        moe.expert_bn.running_var.uniform_(0.5, 2.0)
        moe.expert_bn.weight.uniform_(0.5, 1.5)
        moe.expert_bn.bias.normal_(0.0, 1.0)
        moe.expert_conv.bias.normal_(0.0, 1.0)
    with torch.no_grad():
        y, idx = moe(model.features(x))  # the MoE stage output (B, E*Ce, 8, 8), as the head sees it
        _, idx_model = model(x, return_routing=True)
    assert torch.equal(idx, idx_model)
    bn = moe.expert_bn
    with torch.no_grad():
        z = F.relu(bn.bias - bn.weight * bn.running_mean / torch.sqrt(bn.running_var + bn.eps))
        const_all = F.conv2d(z.view(1, -1, 1, 1), moe.expert_conv.weight, moe.expert_conv.bias,
                             groups=moe.num_experts).flatten()
    for e in range(moe.num_experts):
        sl = moe.expert_slice(e)
        const = const_all[sl]
        assert const.abs().max() > 1e-3  # non-zero
        vectors = []
        for b in range(x.shape[0]):
            routed_pos = set(idx[b, e].tolist())
            for p in range(64):
                v = y[b, sl, p // 8, p % 8]
                if p in routed_pos:
                    continue
                vectors.append(v)
        vectors = torch.stack(vectors)
        assert vectors.shape[0] == x.shape[0] * 48
        assert torch.allclose(vectors, const.expand_as(vectors), atol=1e-5)
        # routed positions carry information: they are not the constant
        routed_vecs = torch.stack([y[0, sl, p // 8, p % 8] for p in idx[0, e].tolist()])
        assert not torch.allclose(routed_vecs, const.expand_as(routed_vecs), atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# 4. initialisation (docs/faithful-behaviour.md §1.5, item 3)
# ----------------------------------------------------------------------------------------------------------

def _glorot_bound(fan_in: int, fan_out: int) -> float:
    return math.sqrt(6.0 / (fan_in + fan_out))


def test_grouped_expert_conv_glorot_bound_at_widen_10(pmoe10):
    w = pmoe10.moe.expert_conv.weight
    assert w.shape == (640, 640, 1, 1)
    bound = _glorot_bound(640, 160)  # per expert: fan_in 640, fan_out 160
    assert w.abs().max().item() <= bound + 1e-7
    assert w.abs().max().item() >= 0.99 * bound
    # the naive reading (fan_out = all 640 output channels) would give a smaller bound
    assert bound > _glorot_bound(640, 640) / 0.99


def test_grouped_expert_conv_glorot_bound_narrow():
    model = _narrow(widen=2)
    c, ce = model.moe.in_channels, model.moe.expert_channels
    assert (c, ce) == (128, 32)
    w = model.moe.expert_conv.weight
    bound = _glorot_bound(c, ce)
    assert w.abs().max().item() <= bound + 1e-7
    assert w.abs().max().item() >= 0.99 * bound
    for e in range(4):  # every expert's block is filled, not just the first
        blk = w[model.moe.expert_slice(e)]
        assert blk.abs().max().item() >= 0.95 * bound


def test_dense_convs_glorot_bound(pmoe10):
    w = pmoe10.pre_conv.weight  # (640, 320, 3, 3): fan_in 320*9, fan_out 640*9
    bound = _glorot_bound(320 * 9, 640 * 9)
    assert 0.99 * bound <= w.abs().max().item() <= bound + 1e-7
    fc = pmoe10.head.fc.weight  # (10, 640)
    bound_fc = _glorot_bound(640, 10)
    assert 0.99 * bound_fc <= fc.abs().max().item() <= bound_fc + 1e-7


def test_router_init_normal_1e4(pmoe10):
    w = pmoe10.moe.router.weight
    assert w.shape == (4, 640, 1, 1)
    assert pmoe10.moe.router.bias is None
    assert 0.85e-4 < w.std().item() < 1.15e-4
    assert abs(w.mean().item()) < 1e-5


def test_biases_zero_and_bn_identity(pmoe10):
    n_bias = 0
    for m in pmoe10.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
            assert torch.count_nonzero(m.bias) == 0
            n_bias += 1
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
            assert torch.all(m.running_mean == 0) and torch.all(m.running_var == 1)
    assert n_bias >= 10  # every conv (except the routers) and the dense layer has a bias
    assert isinstance(pmoe10.moe, PatchMoE)
