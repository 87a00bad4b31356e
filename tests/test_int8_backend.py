"""Tests of deployment.int8_backend: the int8 deployment on oneDNN's integer kernels against its simulation."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pmoe_backdoor.attacks.poison import asr_set, make_poison
from pmoe_backdoor.attacks.triggers import make_trigger
from pmoe_backdoor.data.datasets import make_synthetic
from pmoe_backdoor.deployment.int8_backend import Int8Layer, int8_kernels_available, int8_model
from pmoe_backdoor.deployment.quantize import (
    STATIC_ACT_QMAX,
    activation_qparams,
    activation_ranges,
    fake_quantize_activation,
    quantize_model,
    quantize_weight,
)
from pmoe_backdoor.evaluate import predict_logits
from pmoe_backdoor.models.architectures import TFSamePadConv, build_model
from pmoe_backdoor.runtime import seed_everything, to_input
from pmoe_backdoor.training.loop import TrainConfig, fit

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not int8_kernels_available(), reason="no oneDNN int8 kernels in this build")]


def _simulated(layer: nn.Module, x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """The layer as quantize.py simulates it: input and weight on the int8 grids, the rest in float."""
    scale, zero = activation_qparams(lo, hi)
    xq = fake_quantize_activation(x, scale, zero, STATIC_ACT_QMAX)
    if isinstance(layer, TFSamePadConv):
        # TF 'same' on an even input: one zero row / column after, none before (padding 0 in the layer itself)
        return layer._conv_forward(F.pad(xq, [0, 1, 0, 1]), quantize_weight(layer.weight, 8), layer.bias)
    if isinstance(layer, nn.Conv2d):
        return layer._conv_forward(xq, quantize_weight(layer.weight, 8), layer.bias)
    return F.linear(xq, quantize_weight(layer.weight, 8), layer.bias)


def _layers() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    grouped = nn.Conv2d(16, 8, 1, groups=4)
    with torch.no_grad():
        grouped.weight[3].zero_()  # a Fine-Pruned channel: scale 0 must not break the kernel
        grouped.bias[3] = 0.05
    return {
        "conv3x3 pad 1": (nn.Conv2d(6, 10, 3, padding=1), torch.randn(3, 6, 12, 12, generator=g)),
        "tf-same stride 2": (TFSamePadConv(6, 10, 3, 2), torch.randn(3, 6, 12, 12, generator=g).relu()),
        "grouped 1x1, pruned channel": (grouped, torch.randn(3, 16, 8, 8, generator=g) * 0.1),
        "router 1x1 no bias": (nn.Conv2d(16, 4, 1, bias=False), torch.randn(3, 16, 8, 8, generator=g) + 2.0),
        "linear": (nn.Linear(20, 5), torch.randn(7, 20, generator=g).relu()),
    }


@pytest.mark.parametrize("name", list(_layers()))
def test_int8_layer_equals_its_simulation(name):
    layer, x = _layers()[name]
    lo, hi = float(x.min()), float(x.max())
    with torch.no_grad():
        got = Int8Layer(layer, lo, hi)(x)
        want = _simulated(layer, x, lo, hi)
        plain = layer(x)
    assert got.dtype == torch.float32 and got.shape == want.shape
    tol = 1e-5 * float(want.abs().max())
    assert float((got - want).abs().max()) <= tol  # integer accumulation: the same numbers up to float rounding
    assert float((plain - want).abs().max()) > 100 * tol  # ... and clearly not the float layer


def test_int8_layer_rejects_other_padding():
    with pytest.raises(ValueError, match="padding"):
        Int8Layer(nn.Conv2d(3, 4, 3, padding="same"), 0.0, 1.0)
    with pytest.raises(ValueError, match="padding"):
        Int8Layer(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), 0.0, 1.0)


@pytest.fixture(scope="module")
def backdoored():
    """A widen-1 pmoe trained in the test on synthetic data with a 6x6 white square (20 % poisoned, target 0):
    ~5 s on one core; BA and ASR end at 100 %."""
    ds = make_synthetic(num_classes=4, n_train=384, n_test=400, seed=0)
    x, y = torch.from_numpy(ds.x_train), torch.from_numpy(ds.y_train)
    trigger = make_trigger("square", {"size": 6, "value": 255})
    xp, yp = make_poison(x, ds.y_train, trigger, rate_percent=20, seed=0, target=0).apply(x, y)
    seed_everything(0)
    model = build_model("pmoe", 4, widen_factor=1)
    cfg = TrainConfig(epochs=4, batch_size=32, lr=0.05, momentum=0.9, progress_seconds=0, eval_every=0,
                      recalibrate_bn=True)
    fit(model, xp, yp, cfg, device=torch.device("cpu"), log=None)
    x_test, y_test = torch.from_numpy(ds.x_test), torch.from_numpy(ds.y_test)
    return model.eval(), x[:128], x_test, y_test, asr_set(x_test, y_test, trigger, 0)[0]


def test_int8_model_agrees_with_the_simulation(backdoored):
    model, calib, x_test, y_test, x_asr = backdoored
    sim = quantize_model(model, "int8", calib)
    real = int8_model(model, calib, ranges=activation_ranges(sim))
    fp32_asr = float((predict_logits(model, x_asr).argmax(1) == 0).float().mean())
    assert fp32_asr > 0.9  # the premise: the backdoor is there
    for x in (x_test, x_asr):
        ls, lr, lf = predict_logits(sim, x), predict_logits(real, x), predict_logits(model, x)
        assert float((ls.argmax(1) == lr.argmax(1)).float().mean()) >= 0.99
        # the kernels' differences are far below what quantization itself does to the logits
        assert float((lr - ls).abs().max()) < 0.5 * float((lf - ls).abs().max())
    asr = {name: 100 * float((predict_logits(m, x_asr).argmax(1) == 0).float().mean())
           for name, m in (("sim", sim), ("real", real))}
    assert abs(asr["sim"] - asr["real"]) <= 2.0
    ba_real = float((predict_logits(real, x_test).argmax(1) == y_test).float().mean())
    assert ba_real > 0.9


def test_int8_model_on_close_logits():
    """An untrained widen-1 pmoe (BN statistics from the calibration images): its logits lie close together, so
    prediction agreement is the harder test (measured 99.9 % on 1000 CIFAR-10 test images)."""
    g = torch.Generator().manual_seed(3)
    calib = torch.randint(0, 256, (64, 32, 32, 3), generator=g, dtype=torch.uint8)
    x = torch.randint(0, 256, (200, 32, 32, 3), generator=g, dtype=torch.uint8)
    torch.manual_seed(0)
    model = build_model("pmoe", 10, widen_factor=1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
            m.reset_running_stats()
    model.train()
    with torch.no_grad():
        model(to_input(calib))
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sim = quantize_model(model, "int8", calib)
    real = int8_model(model, calib)  # its own calibration: the same ranges, as they are deterministic
    for name, (lo, hi) in activation_ranges(sim).items():
        layer = real.get_submodule(name)
        assert isinstance(layer, Int8Layer) and (layer.x_scale, layer.x_zero) == activation_qparams(lo, hi)
    ls, lr = predict_logits(sim, x), predict_logits(real, x)
    assert float((ls.argmax(1) == lr.argmax(1)).float().mean()) >= 0.98
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the model is not changed
    assert not any(isinstance(m, (nn.Conv2d, nn.Linear)) for m in real.modules())  # every layer is int8
    with torch.no_grad():
        _, idx = real(to_input(x[:4]), return_routing=True)  # the routing still runs (in float)
    assert idx.shape == (4, 4, 16)


def test_int8_model_errors(backdoored):
    model, calib, x_test, *_ = backdoored
    real = int8_model(model, calib)
    with pytest.raises(ValueError, match="float32"):
        real(to_input(x_test[:2]).double())
    with pytest.raises(ValueError, match="no calibrated input range"):
        int8_model(model, calib, ranges={"trunk.stem": (0.0, 1.0)})
    with pytest.raises(ValueError, match="without hooks"):
        int8_model(quantize_model(model, "int8", calib), calib)
