"""Tests of deployment.quantize: the int8 (W8A8), int8_dynamic and int4 (weight-only) fake quantization."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn

from pmoe_backdoor.deployment.quantize import (
    activation_qparams,
    activation_ranges,
    quantize_model,
    quantize_weight,
    quantize_weight_per_tensor,
    routing_change,
)
from pmoe_backdoor.models.architectures import build_model
from pmoe_backdoor.runtime import to_input

pytestmark = pytest.mark.usefixtures("one_thread")


def _images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 32, 32, 3), generator=g, dtype=torch.uint8)


@pytest.fixture(scope="module")
def calib() -> torch.Tensor:
    return _images(16, seed=1)


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return _images(8, seed=2)


@pytest.fixture(scope="module")
def model(calib) -> nn.Module:
    """A widen-1 pmoe whose BN running statistics are exact averages over the calibration images, so that
    the logits have a realistic scale (at initialisation they are ~1e-4). Never mutated by the tests."""
    torch.manual_seed(0)
    m = build_model("pmoe", 4, widen_factor=1)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.momentum = None  # cumulative average
            mod.reset_running_stats()
    m.train()
    with torch.no_grad():
        m(to_input(calib))
    return m.eval()


def _logits(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return m(to_input(x))


# ----------------------------------------------------------------------------------------------------------
# quantize_weight
# ----------------------------------------------------------------------------------------------------------

def _weight() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 40, 5, 5, generator=g)  # 1000 values per output channel
    return w * torch.tensor([1e-3, 0.1, 1.0, 3.0, 10.0, 0.5]).view(-1, 1, 1, 1)  # very different channel scales


def test_quantize_weight_int8_grid():
    w = _weight()
    q = quantize_weight(w, 8)
    assert q.shape == w.shape
    for c in range(w.shape[0]):
        wc, qc = w[c].flatten(), q[c].flatten()
        assert 100 < len(torch.unique(qc)) <= 255  # quantized (1000 distinct inputs), at most 2*127+1 levels
        max_abs = wc.abs().max()
        torch.testing.assert_close(qc.abs().max(), max_abs)  # symmetric: the extreme value is exact
        scale = max_abs / 127
        assert ((qc - wc).abs() <= scale / 2 * (1 + 1e-5)).all()
        levels = qc / scale
        torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-3)  # on the grid k * scale
        assert levels.abs().max() <= 127 + 1e-3


def test_quantize_weight_int4_grid():
    w = _weight()
    q = quantize_weight(w, 4)
    for c in range(w.shape[0]):
        qc, wc = q[c].flatten(), w[c].flatten()
        assert 10 <= len(torch.unique(qc)) <= 15  # 2*7+1 levels
        scale = wc.abs().max() / 7
        assert ((qc - wc).abs() <= scale / 2 * (1 + 1e-5)).all()
        torch.testing.assert_close(qc.abs().max(), wc.abs().max())


def test_quantize_weight_linear_and_zero_channel():
    w = torch.tensor([[0.0, 0.0, 0.0], [1.0, -0.4, 0.26], [-2.0, 0.1, 0.9]])
    q = quantize_weight(w, 4)  # scales 0 (clamped, no division by zero), 1/7, 2/7
    assert torch.equal(q[0], torch.zeros(3))
    torch.testing.assert_close(q[1], torch.tensor([7.0, -3.0, 2.0]) / 7)   # 7, -2.8, 1.82 rounded
    torch.testing.assert_close(q[2], torch.tensor([-7.0, 0.0, 3.0]) * 2 / 7)  # -7, 0.35, 3.15 rounded


# ----------------------------------------------------------------------------------------------------------
# quantize_model
# ----------------------------------------------------------------------------------------------------------

def test_fp32_is_an_identical_copy(model, x):
    q = quantize_model(model, "fp32")
    assert q is not model
    assert not q.training
    assert torch.equal(_logits(q, x), _logits(model, x))


def test_int8_needs_calibration(model):
    with pytest.raises(ValueError, match="calibration"):
        quantize_model(model, "int8")
    with pytest.raises(ValueError, match="calibration"):
        quantize_model(model, "int8", torch.zeros(0, 32, 32, 3, dtype=torch.uint8))


@pytest.mark.parametrize("precision", ["bf16", "int2", "INT8", ""])
def test_unknown_precision(model, calib, precision):
    with pytest.raises(ValueError, match="precision"):
        quantize_model(model, precision, calib)


# Bounds for an untrained widen-1 model on random images (measured: int8 relative error ~0.1, correlation
# ~0.99; int4 weight-only ~0.6 and ~0.7, since 15 levels per channel in every layer also move ~16 % of the
# routing positions). They separate "a perturbation of these logits" from unrelated outputs (other seeds'
# models: relative error 1.7-3.6, correlation below 0).
@pytest.mark.parametrize("precision, max_rel, min_corr", [("int8", 0.25, 0.97), ("int4", 0.8, 0.6)])
def test_quantized_outputs_change_a_little(model, calib, x, precision, max_rel, min_corr):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref = _logits(model, x)
    q = quantize_model(model, precision, calib)
    assert not q.training
    out = _logits(q, x)
    assert (out - ref).abs().max() > 0
    assert (out - ref).norm() < max_rel * ref.norm()
    assert torch.corrcoef(torch.stack([out.flatten(), ref.flatten()]))[0, 1] > min_corr
    # the original model is untouched: same weights, no hooks, same outputs
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert all(len(m._forward_pre_hooks) == 0 for m in model.modules())
    assert torch.equal(_logits(model, x), ref)


def test_fewer_bits_change_more(model, calib, x):
    ref = _logits(model, x)
    err = {p: float((_logits(quantize_model(model, p, calib), x) - ref).norm()) for p in ("int8", "int4")}
    assert 0 < err["int8"] < err["int4"]


@pytest.mark.parametrize("precision, bits", [("int8", 8), ("int4", 4)])
def test_quantized_weights_are_the_per_channel_grid(model, calib, precision, bits):
    q = quantize_model(model, precision, calib)
    orig = dict(model.named_modules())
    n_layers = 0
    for name, layer in q.named_modules():
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            n_layers += 1
            torch.testing.assert_close(layer.weight, quantize_weight(orig[name].weight, bits), rtol=0, atol=0)
            assert not torch.equal(layer.weight, orig[name].weight)
            if layer.bias is not None:
                assert torch.equal(layer.bias, orig[name].bias)  # biases stay at full precision
        elif isinstance(layer, nn.BatchNorm2d):
            assert torch.equal(layer.weight, orig[name].weight)
            assert torch.equal(layer.running_var, orig[name].running_var)
    assert n_layers >= 10  # stem, blocks, shortcuts, pre-MoE conv, router, experts, head


def _distinct_inputs(m: nn.Module, layer: nn.Module, x: torch.Tensor) -> int:
    seen = []
    h = layer.register_forward_hook(lambda mod, args, out: seen.append(args[0].detach().clone()))
    try:
        _logits(m, x)
    finally:
        h.remove()
    return len(torch.unique(seen[0]))


@pytest.mark.parametrize("path", ["moe.expert_conv", "head.fc", "pre_conv", "moe.router"])
def test_int8_layer_inputs_are_uint8_levels(model, calib, x, path):
    q8 = quantize_model(model, "int8", calib)
    q4 = quantize_model(model, "int4", calib)
    get = lambda m: m.get_submodule(path)  # noqa: E731
    assert _distinct_inputs(q8, get(q8), x) <= 256
    # activations are not quantized in fp32 or int4 (weight-only): there the same input has many more values
    assert _distinct_inputs(model, get(model), x) > 256
    assert _distinct_inputs(q4, get(q4), x) > 256


def test_int8_gradients_reach_the_input(model, calib, x):
    q = quantize_model(model, "int8", calib)
    inp = to_input(x).clone().requires_grad_()
    q(inp).logsumexp(1).sum().backward()
    assert inp.grad is not None
    assert torch.isfinite(inp.grad).all()
    assert inp.grad.abs().sum() > 0  # a rounding step without the straight-through estimator gives zero


# ----------------------------------------------------------------------------------------------------------
# int8_dynamic: PyTorch's dynamic quantization of this CNN (the Linear layers only)
# ----------------------------------------------------------------------------------------------------------

def test_quantize_weight_per_tensor_hand_made():
    w = torch.tensor([[2.55, -1.0], [0.01, -2.55]])  # scale 2.55 / 127.5 = 0.02
    q = quantize_weight_per_tensor(w)
    # 2.55 / 0.02 = 127.5 rounds to 128, clamped to 127; -127.5 rounds (half to even) to -128, which is kept
    torch.testing.assert_close(q, torch.tensor([[127.0, -50.0], [0.0, -128.0]]) * 0.02)


def test_activation_qparams_hand_made():
    assert activation_qparams(0.0, 2.55) == (pytest.approx(0.01), 0)
    assert activation_qparams(-1.0, 1.54, 127) == (pytest.approx(0.02), 50)  # -lo / scale = 50
    assert activation_qparams(0.5, 1.27, 127) == (pytest.approx(0.01), 0)  # the range is widened to hold 0


def test_int8_dynamic_quantizes_exactly_the_linear_layers(model, x):
    q = quantize_model(model, "int8_dynamic")  # no calibration: activations are quantized per batch
    orig = dict(model.named_modules())
    hooked = {name for name, m in q.named_modules() if m._forward_pre_hooks}
    assert hooked == {"head.fc"}
    n_conv = 0
    for name, layer in q.named_modules():
        if isinstance(layer, nn.Conv2d):  # stem, blocks, shortcuts, pre-MoE, routers, experts: untouched
            n_conv += 1
            assert torch.equal(layer.weight, orig[name].weight)
    assert n_conv >= 9
    fc, fc0 = q.head.fc, model.head.fc
    assert not torch.equal(fc.weight, fc0.weight) and torch.equal(fc.bias, fc0.bias)
    scale = float(fc0.weight.detach().abs().max()) / 127.5
    levels = fc.weight / scale
    torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-3)  # one scale for the whole tensor
    assert 20 < len(torch.unique(fc.weight)) <= 256
    # the head's input is quantized per batch to 128 levels; the routing (convolutions only) is unchanged
    assert _distinct_inputs(q, q.head.fc, x) <= 128 < _distinct_inputs(model, model.head.fc, x)
    with torch.no_grad():
        assert torch.equal(q(to_input(x), return_routing=True)[1], model(to_input(x), return_routing=True)[1])
    assert (_logits(q, x) - _logits(model, x)).abs().max() > 0


def test_int8_dynamic_depends_on_the_batch(model, x):
    q = quantize_model(model, "int8_dynamic")
    whole = _logits(q, x)
    # each image alone gets its own activation range: slightly different logits than inside the batch
    alone = torch.cat([_logits(q, x[i:i + 1]) for i in range(len(x))])
    assert 0 < float((whole - alone).abs().max()) < 0.1 * float(whole.abs().max())


def test_int8_dynamic_is_what_torch_quantize_dynamic_does(model, x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated; skip where it has been removed
        qd = pytest.importorskip("torch.ao.quantization").quantize_dynamic
        real = qd(copy.deepcopy(model), dtype=torch.qint8)  # the default qconfig: nn.Linear (and RNN cells)
    orig = dict(model.named_modules())
    changed = {name for name, m in real.named_modules() if name in orig and type(m) is not type(orig[name])}
    assert changed == {"head.fc"}  # Conv2d is not in the default set
    sim = quantize_model(model, "int8_dynamic")
    assert torch.equal(real.head.fc.weight().dequantize(), sim.head.fc.weight)
    ref, got = _logits(real, x), _logits(sim, x)
    fp32 = _logits(model, x)
    # equal up to float rounding (measured 2e-7), far below what the quantization itself changes
    assert (got - ref).abs().max() < 1e-3 * (fp32 - ref).abs().max() + 1e-6
    assert torch.equal(got.argmax(1), ref.argmax(1))


def test_int8_dynamic_gradients_reach_the_input(model, x):
    q = quantize_model(model, "int8_dynamic")
    inp = to_input(x).clone().requires_grad_()
    q(inp).logsumexp(1).sum().backward()
    assert inp.grad is not None and torch.isfinite(inp.grad).all() and inp.grad.abs().sum() > 0


def test_activation_ranges(model, calib):
    ranges = activation_ranges(quantize_model(model, "int8", calib))
    layers = {n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert set(ranges) == layers
    lo, hi = ranges["trunk.stem"]
    assert 0.0 <= lo < 0.1 and 0.9 < hi <= 1.0  # the stem reads the random images scaled to [0, 1]
    assert all(lo <= hi for lo, hi in ranges.values())
    with pytest.raises(ValueError, match="quantize_model"):
        activation_ranges(quantize_model(model, "int4"))


# ----------------------------------------------------------------------------------------------------------
# routing_change
# ----------------------------------------------------------------------------------------------------------

def test_routing_change_identical_and_disjoint():
    g = torch.Generator().manual_seed(0)
    idx = torch.stack([torch.stack([torch.randperm(64, generator=g)[:16] for _ in range(4)]) for _ in range(3)])
    assert routing_change(idx, idx) == 0.0
    assert routing_change(idx, idx.flip(-1)) == 0.0  # the order within the top-k does not matter
    disjoint = torch.stack([torch.stack([torch.tensor([p for p in range(64) if p not in set(row.tolist())][:16])
                                         for row in img]) for img in idx])
    assert routing_change(idx, disjoint) == 1.0


def test_routing_change_hand_made_quarter():
    ref = torch.tensor([[[0, 1, 2, 3], [4, 5, 6, 7]]])       # (N=1, E=2, k=4)
    other = torch.tensor([[[3, 2, 1, 9], [7, 6, 5, 11]]])    # 3 of 4 in common per expert, reordered
    assert routing_change(ref, other) == pytest.approx(0.25)
    ref2 = torch.tensor([[[0, 1, 2, 3]], [[10, 11, 12, 13]]])  # (N=2, E=1, k=4): 4 and 2 in common
    other2 = torch.tensor([[[3, 0, 1, 2]], [[10, 11, 40, 41]]])
    assert routing_change(ref2, other2) == pytest.approx(0.25)
    ref3 = torch.tensor([[[0, 1, 2, 3], [4, 5, 6, 7]]])
    other3 = torch.tensor([[[0, 1, 2, 3], [4, 50, 51, 52]]])  # 4 and 1 in common: 1 - 5/8
    assert routing_change(ref3, other3) == pytest.approx(0.375)
