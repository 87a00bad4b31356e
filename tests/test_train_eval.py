"""Tests of pmoe_backdoor.training.loop and pmoe_backdoor.evaluate on small CPU problems."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pmoe_backdoor.evaluate as evaluate_module
from pmoe_backdoor.attacks.poison import asr_set
from pmoe_backdoor.attacks.triggers import make_trigger
from pmoe_backdoor.data.datasets import make_synthetic
from pmoe_backdoor.evaluate import evaluate, predict_logits
from pmoe_backdoor.models.architectures import build_model
from pmoe_backdoor.runtime import seed_everything, to_input
from pmoe_backdoor.training.loop import Probe, TrainConfig, fit, recalibrate_bn, record_routing

CPU = torch.device("cpu")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def small():
    ds = make_synthetic(num_classes=4, n_train=256, n_test=64, seed=0)
    return (torch.from_numpy(ds.x_train), torch.from_numpy(ds.y_train),
            torch.from_numpy(ds.x_test), torch.from_numpy(ds.y_test))


def _train(small, seed: int, cfg_seed: int, epochs: int = 1, probe: Probe | None = None, **cfg_kw):
    x, y, xt, yt = small
    seed_everything(seed)
    model = build_model("pmoe", 4, widen_factor=1)
    cfg = TrainConfig(epochs=epochs, batch_size=32, lr=0.05, momentum=0.9, progress_seconds=0, seed=cfg_seed,
                      **cfg_kw)
    hist = fit(model, x, y, cfg, xt, yt, probe=probe, device=CPU, log=None)
    return model, hist


# ----------------------------------------------------------------------------------------------------------
# fit
# ----------------------------------------------------------------------------------------------------------

def test_fit_lowers_loss_and_records_history(small):
    x, y, xt, yt = small
    probe = Probe(xt[:3].clone(), ["a", "b", "c"])
    model, hist = _train(small, seed=0, cfg_seed=0, epochs=3, probe=probe)
    epochs = hist["epochs"]
    assert [r["epoch"] for r in epochs] == [1, 2, 3]
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    for r in epochs:
        assert math.isfinite(r["train_loss"])
        assert 0.0 <= r["test_acc"] <= 1.0
        assert 0.0 <= r["train_acc"] <= 1.0
        assert "test_loss" in r
    assert hist["precision"] == "fp32"
    assert hist["config"]["epochs"] == 3
    assert hist["probe_names"] == ["a", "b", "c"]
    routing = np.asarray(hist["routing"])
    assert routing.shape == (3, 3, 4, 16)  # epochs x probe images x experts x top-k
    assert np.asarray(hist["routing_init"]).shape == (3, 4, 16)
    assert routing.min() >= 0 and routing.max() < 64
    assert (np.diff(routing, axis=-1) > 0).all()  # sorted, distinct positions
    assert model.training  # fit leaves the model in train mode


def test_fit_eval_every_zero_only_last_epoch(small):
    _, hist = _train(small, seed=0, cfg_seed=0, epochs=2, eval_every=0)
    assert "test_acc" not in hist["epochs"][0]
    assert "test_acc" in hist["epochs"][1]
    assert hist["routing"] == []


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_fit_same_seed_bitwise_identical(small):
    a, ha = _train(small, seed=7, cfg_seed=7)
    b, hb = _train(small, seed=7, cfg_seed=7)
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert ha["epochs"][0]["train_loss"] == hb["epochs"][0]["train_loss"]


def test_fit_different_seed_different_weights(small):
    a, _ = _train(small, seed=7, cfg_seed=7)
    b, _ = _train(small, seed=8, cfg_seed=8)
    assert not torch.equal(a.moe.expert_conv.weight, b.moe.expert_conv.weight)
    # the shuffling seed alone (same initial weights) also changes the result
    c, _ = _train(small, seed=7, cfg_seed=8)
    assert not torch.equal(a.moe.expert_conv.weight, c.moe.expert_conv.weight)


def _one_step_case(seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (32, 32, 32, 3), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 4, (32,), generator=g)
    seed_everything(11)
    model = build_model("pmoe", 4, widen_factor=1)
    return x, y, model


def _reference_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float, channels_last: bool) -> None:
    """A plain training step: NCHW float input x/255, cross-entropy, torch.optim.SGD."""
    model.train()
    xin = x.permute(0, 3, 1, 2).float() / 255.0
    if channels_last:
        model.to(memory_format=torch.channels_last)
    else:
        xin = xin.contiguous()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loss = F.cross_entropy(model(xin), y)
    opt.zero_grad()
    loss.backward()
    opt.step()


def _compare(fast: nn.Module, ref: nn.Module, init: dict[str, torch.Tensor], atol: float, min_move: float) -> None:
    fp, rp = dict(fast.named_parameters()), dict(ref.named_parameters())
    assert fp.keys() == rp.keys()
    moved = 0.0
    for name, p in rp.items():
        assert torch.allclose(fp[name], p, atol=atol, rtol=0), (name, (fp[name] - p).abs().max().item())
        moved = max(moved, (p - init[name]).abs().max().item())
    assert moved > min_move  # the step did something, so the comparison is not vacuous
    fb, rb = dict(fast.named_buffers()), dict(ref.named_buffers())
    for name, b in rb.items():  # BN running statistics after one batch
        assert torch.allclose(fb[name].float(), b.float(), atol=atol, rtol=0), name


def test_fit_one_step_matches_plain_nchw_reference():
    # fast path (uint8 on device, index-slice batch of a permutation, channels_last) vs a hand-written step
    # on contiguous NCHW input. lr is small because float32 gradients through this network differ between
    # the two memory layouts by up to ~1e-2 relative (they agree to 1e-14 in float64): at lr 0.1 the
    # parameters differ by ~3e-5, at lr 0.002 by ~1e-6.
    x, y, fast = _one_step_case()
    ref = copy.deepcopy(fast)
    init = _state(fast)
    lr = 0.002
    fit(fast, x, y, TrainConfig(epochs=1, batch_size=32, lr=lr, channels_last=True, progress_seconds=0, seed=0),
        device=CPU, log=None)
    _reference_step(ref, x, y, lr, channels_last=False)
    _compare(fast, ref, init, atol=1e-5, min_move=1e-4)


def test_fit_one_step_matches_reference_same_layout_and_order():
    # with the same memory layout and the same batch order (fit shuffles with torch.Generator seeded by
    # cfg.seed) the fast path matches a plain step tightly, at the faithful lr 0.1
    x, y, fast = _one_step_case()
    ref = copy.deepcopy(fast)
    init = _state(fast)
    fit(fast, x, y, TrainConfig(epochs=1, batch_size=32, lr=0.1, channels_last=True, progress_seconds=0, seed=5),
        device=CPU, log=None)
    perm = torch.randperm(32, generator=torch.Generator().manual_seed(5))
    _reference_step(ref, x[perm], y[perm], 0.1, channels_last=True)
    _compare(fast, ref, init, atol=1e-6, min_move=1e-3)


def test_to_input_scaling_and_layout():
    x = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    a = to_input(x, channels_last=True)
    b = to_input(x, channels_last=False)
    assert a.shape == b.shape == (2, 3, 32, 32)
    assert a.is_contiguous(memory_format=torch.channels_last)
    assert b.is_contiguous()
    assert torch.equal(a, b)
    assert torch.allclose(b, x.permute(0, 3, 1, 2).float() / 255.0)


def test_record_routing_wrn_is_none_and_keeps_mode():
    torch.manual_seed(0)
    wrn = build_model("wrn", 4, widen_factor=1)
    wrn.train()
    probe = Probe(torch.zeros(2, 32, 32, 3, dtype=torch.uint8), ["x", "y"])
    assert record_routing(wrn, probe, CPU) is None
    assert wrn.training


def test_recalibrate_bn_uses_training_set_average():
    # the first BN sees the stem output: after recalibration its running mean is the mean over all images
    torch.manual_seed(0)
    model = build_model("pmoe", 4, widen_factor=1)
    x = torch.randint(0, 256, (40, 32, 32, 3), dtype=torch.uint8)
    recalibrate_bn(model, x, batch_size=10, device=CPU, precision="fp32")
    with torch.no_grad():
        stem = model.trunk.stem(to_input(x, False))
    bn = model.trunk.group1.bn1
    assert torch.allclose(bn.running_mean, stem.mean(dim=(0, 2, 3)), atol=1e-5)
    assert bn.momentum == 0.01  # restored


# ----------------------------------------------------------------------------------------------------------
# TrainConfig
# ----------------------------------------------------------------------------------------------------------

def test_train_config_from_dict():
    cfg = TrainConfig.from_dict({"epochs": 2, "lr": 0.01, "precision": "bf16"})
    assert cfg.epochs == 2 and cfg.lr == 0.01 and cfg.precision == "bf16"
    assert TrainConfig.from_dict(None) == TrainConfig()
    # the faithful defaults (docs/faithful-behaviour.md §2)
    d = TrainConfig()
    assert (d.epochs, d.batch_size, d.lr, d.momentum, d.weight_decay) == (25, 128, 0.1, 0.0, 0.0)


@pytest.mark.parametrize(
    ("d", "names"),
    [
        ({"epochz": 3}, "epochz"),
        ({"learning_rate": 0.1}, "learning_rate"),
        ({"precision": "fp16"}, "precision"),
        ({"epochs": 0}, "epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"lr": 0.0}, "lr"),
        ({"nesterov": True}, "nesterov"),
    ],
)
def test_train_config_errors_name_the_key(d, names):
    with pytest.raises(ValueError, match=names):
        TrainConfig.from_dict(d)


# ----------------------------------------------------------------------------------------------------------
# evaluate: a hand-made model whose predictions are known by construction
# ----------------------------------------------------------------------------------------------------------

class Oracle(nn.Module):
    """Predicts the class written into pixel (10, 10), channel 0 (value 20 * class); but predicts class 0
    when pixel (0, 0) is dark (the square trigger) and the 'susceptible' flag pixel (20, 20), channel 1 is
    bright. Logits are 10 * one-hot."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.dummy = nn.Parameter(torch.zeros(()))
        self.modes: list[bool] = []

    def forward(self, x):
        self.modes.append(self.training)
        cls = torch.round(x[:, 0, 10, 10] * 255.0 / 20.0).long()
        dark = x[:, :, 0, 0].amax(dim=1) < 2.0 / 255.0
        flag = x[:, 1, 20, 20] > 0.5
        pred = torch.where(dark & flag, torch.zeros_like(cls), cls)
        return 10.0 * F.one_hot(pred, self.num_classes).float() + 0.0 * self.dummy


def _oracle_images(pred: list[int], flag: list[bool]) -> torch.Tensor:
    x = torch.full((len(pred), 32, 32, 3), 128, dtype=torch.uint8)
    x[:, 0, 0, :] = 200  # clean images are bright at (0, 0)
    x[:, 10, 10, 0] = torch.tensor(pred, dtype=torch.uint8) * 20
    x[:, 20, 20, 1] = torch.tensor([255 if f else 0 for f in flag], dtype=torch.uint8)
    return x


def test_evaluate_known_numbers():
    # 4 classes, class 3 absent from the test set; true labels and what the oracle predicts on clean images
    y = [0, 0, 1, 1, 1, 2, 2, 2, 2]
    pred = [0, 0, 1, 1, 2, 2, 0, 1, 1]  # class 0: 2/2, class 1: 2/3, class 2: 1/4 -> 5/9 correct
    flag = [True, False, True, True, False, True, False, False, False]
    x = _oracle_images(pred, flag)
    yt = torch.tensor(y)
    model = Oracle(4)
    x_asr, y_asr = asr_set(x, yt, make_trigger("square"), target=0)
    res = evaluate(model, x, yt, x_asr=x_asr, target=0, num_classes=4, batch_size=4, device=CPU)

    assert res["ba"] == pytest.approx(100.0 * 5 / 9)
    assert res["per_class_acc"][0] == pytest.approx(100.0)
    assert res["per_class_acc"][1] == pytest.approx(200.0 / 3, abs=1e-3)
    assert res["per_class_acc"][2] == pytest.approx(25.0)
    assert res["per_class_acc"][3] is None
    assert res["n_test"] == 9
    # ASR set: the 7 non-target images, triggered; predicted 0 if flagged (indices 2, 3, 5) or if the
    # encoded prediction is 0 anyway (index 6) -> 4/7
    assert res["n_asr"] == 7
    assert res["asr"] == pytest.approx(100.0 * 4 / 7)
    # CE of 10*one-hot logits over 4 classes: correct -log(e^10/(e^10+3)), wrong -log(1/(e^10+3))
    ok = -math.log(math.exp(10) / (math.exp(10) + 3))
    bad = math.log(math.exp(10) + 3)
    assert res["test_loss"] == pytest.approx((5 * ok + 4 * bad) / 9, rel=1e-5)
    # evaluation ran in eval mode and restored train mode
    assert model.modes and not any(model.modes)
    assert model.training


def test_evaluate_without_asr_and_default_num_classes():
    x = _oracle_images([0, 1, 2, 2], [False] * 4)
    res = evaluate(Oracle(3), x, torch.tensor([0, 1, 2, 1]), device=CPU)
    assert res["ba"] == pytest.approx(75.0)
    assert res["per_class_acc"] == [100.0, 50.0, 100.0]
    assert "asr" not in res


def test_predict_logits_batches_and_dtype(monkeypatch):
    # a fixed CPU micro-batch: no one-image probe forward to size it (the oracle counts forwards)
    monkeypatch.setattr(evaluate_module, "CPU_FORWARD_BATCH", 1000)
    x = _oracle_images([0, 1, 2, 1, 0], [False] * 5)
    model = Oracle(3)
    logits = predict_logits(model, x, CPU, batch_size=2)
    assert logits.dtype == torch.float32 and logits.shape == (5, 3)
    assert logits.argmax(1).tolist() == [0, 1, 2, 1, 0]
    assert len(model.modes) == 3  # 3 batches of at most 2
