"""Packed training (pmoe_backdoor.training.packed): K models in one batched computation equal K separate fit() runs."""

from __future__ import annotations

import pytest
import torch

from pmoe_backdoor.attacks.poison import make_poison
from pmoe_backdoor.attacks.triggers import make_trigger
from pmoe_backdoor.data.datasets import make_synthetic
from pmoe_backdoor.models import packed as packed_model
from pmoe_backdoor.models.architectures import build_model
from pmoe_backdoor.models.packed import packed_memory_estimate
from pmoe_backdoor.runtime import seed_everything
from pmoe_backdoor.training.loop import Probe, TrainConfig, fit
from pmoe_backdoor.training.packed import fit_packed

CPU = torch.device("cpu")
K = 3
TRIGGERS = [("square", {}), ("blend", {"pattern": "noise", "alpha": 0.2}), ("warp", {})]

pytestmark = pytest.mark.usefixtures("one_thread")


def make_data():
    """A shared clean test set and K training sets, each poisoned with its own trigger at its own indices."""
    ds = make_synthetic(num_classes=4, n_train=256, n_test=64, seed=0)
    x, y = torch.from_numpy(ds.x_train), torch.from_numpy(ds.y_train)
    sets = []
    for k, (kind, params) in enumerate(TRIGGERS):
        record = make_poison(x, ds.y_train, make_trigger(kind, params, seed=k), rate_percent=10, seed=k, target=k)
        sets.append(record.apply(x, y))
    probe = Probe(torch.from_numpy(ds.x_test[:8]).clone(), [f"p{i}" for i in range(8)])
    return sets, torch.from_numpy(ds.x_test), torch.from_numpy(ds.y_test), probe


@pytest.fixture(scope="module")
def data():
    return make_data()


def _cfgs(k: int = K, **kw) -> list[TrainConfig]:
    # batch 96 on 256 images: steps of 96, 96 and a partial 64
    base = dict(epochs=1, batch_size=96, lr=0.05, momentum=0.9, progress_seconds=0)
    return [TrainConfig(**{**base, **kw}, seed=100 + i) for i in range(k)]


def _models(arch: str = "pmoe", k: int = K, **kw) -> list[torch.nn.Module]:
    out = []
    for i in range(k):
        seed_everything(i)  # as the caller seeds each cell's model for a separate run
        out.append(build_model(arch, 4, widen_factor=1, num_experts=4, top_k=16, **kw))
    return out


def _separate(data, cfgs, arch="pmoe"):
    sets, xt, yt, probe = data
    models = _models(arch, len(cfgs))
    hists = [fit(m, *sets[i], cfgs[i], xt, yt, probe=probe, device=CPU, log=None) for i, m in enumerate(models)]
    return models, hists


def _packed(data, cfgs, arch="pmoe", mode="vmap"):
    sets, xt, yt, probe = data
    models = _models(arch, len(cfgs))
    hists = fit_packed(models, sets[:len(cfgs)], cfgs, xt, yt, probes=[probe] * len(cfgs), device=CPU, log=None,
                       mode=mode)
    return models, hists


def _max_weight_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    return max((sa[n].double() - sb[n].double()).abs().max().item() for n in sa)


def _assert_same_history(h_sep, h_pk, loss_atol):
    assert h_pk.keys() == h_sep.keys()
    assert h_pk["config"] == h_sep["config"]
    assert h_pk["routing_init"] == h_sep["routing_init"]
    assert h_pk["routing"] == h_sep["routing"]  # the same top-k patches for every probe, expert and epoch
    for r_sep, r_pk in zip(h_sep["epochs"], h_pk["epochs"], strict=True):
        assert r_pk.keys() == r_sep.keys()
        for key in ("train_loss", "test_loss"):
            assert r_pk[key] == pytest.approx(r_sep[key], abs=loss_atol)
        assert r_pk["train_acc"] == r_sep["train_acc"]
        assert r_pk["test_acc"] == r_sep["test_acc"]


def test_packed_pmoe_matches_separate_fits(data):
    cfgs = _cfgs()
    sep_models, sep_hists = _separate(data, cfgs)
    pk_models, pk_hists = _packed(data, cfgs)
    for k in range(K):
        # fp32 on CPU: the vmapped (grouped) convolutions and linear layers sum in another order than the
        # separate ones (gradients differ by ~1e-7 relative after one step); measured after these 3 steps:
        # max |dw| 2.7e-5, 1.5e-6, 3.8e-5 for the three models, |d train_loss|, |d test_loss| <= 1.2e-7.
        # For scale: fit() itself, run with 2 threads instead of 1, moves the weights by 5e-3 after 6 steps at
        # lr 0.05 / batch 48: early training amplifies rounding noise (and near-tied top-k routing with it).
        for (name, a), b in zip(sep_models[k].state_dict().items(), pk_models[k].state_dict().values()):
            torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-3, msg=f"model {k} tensor {name}")
        _assert_same_history(sep_hists[k], pk_hists[k], loss_atol=1e-5)
    # each packed model followed its own data and seed, not its neighbours'
    assert _max_weight_diff(pk_models[0], sep_models[1]) > 100 * _max_weight_diff(pk_models[0], sep_models[0])


def test_packed_loop_mode_is_bit_identical(data):
    """The same stacked tensors run model by model: identical weights, also with Nesterov and weight decay."""
    cfgs = _cfgs(k=2, nesterov=True, weight_decay=5e-4)
    sep_models, sep_hists = _separate(data, cfgs)
    pk_models, pk_hists = _packed(data, cfgs, mode="loop")
    for k in range(2):
        assert _max_weight_diff(sep_models[k], pk_models[k]) == 0.0
        _assert_same_history(sep_hists[k], pk_hists[k], loss_atol=1e-6)  # loss sums: order of additions only


def test_packed_dense_wrn_matches_separate_fits(data):
    cfgs = _cfgs(k=2)
    sep_models, sep_hists = _separate(data, cfgs, arch="wrn")
    pk_models, pk_hists = _packed(data, cfgs, arch="wrn")
    for k in range(2):
        # measured max |dw| 1.4e-5 and 4.9e-6, |d loss| <= 1.5e-6 (a second epoch grows them to 1.9e-4, 7.9e-5)
        for (name, a), b in zip(sep_models[k].state_dict().items(), pk_models[k].state_dict().values()):
            torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-3, msg=f"model {k} tensor {name}")
        assert pk_hists[k]["routing"] == [None]
        _assert_same_history(sep_hists[k], pk_hists[k], loss_atol=1e-5)


def test_pack_of_one_is_fit(data):
    sets, xt, yt, _ = data
    cfg = _cfgs(k=1)
    (sep,), (h_sep,) = _separate(data, cfg)
    model = _models(k=1)
    (h_pk,) = fit_packed(model, sets[:1], cfg, xt, yt, probes=[data[3]], device=CPU, log=None)
    assert _max_weight_diff(sep, model[0]) == 0.0
    assert h_pk["routing"] == h_sep["routing"]


def test_packed_rejects_mismatched_configs_models_and_data(data):
    sets = data[0][:2]
    with pytest.raises(ValueError, match=r"config key 'lr' differs between model 0 \(0\.05\) and model 1 \(0\.1\)"):
        fit_packed(_models(k=2), sets, [_cfgs(k=1)[0], _cfgs(k=1, lr=0.1)[0]], device=CPU, log=None)
    models = _models(k=1) + _models(k=1, bn_momentum=0.1)
    with pytest.raises(ValueError, match=r"model 1 is not built like model 0.*momentum"):
        fit_packed(models, sets, _cfgs(k=2), device=CPU, log=None)
    with pytest.raises(ValueError, match="model 1 is not built like model 0"):
        fit_packed(_models(k=1) + _models("wrn", k=1), sets, _cfgs(k=2), device=CPU, log=None)
    short = [sets[0], (sets[1][0][:200], sets[1][1][:200])]
    with pytest.raises(ValueError, match=r"same number of images.*\[256, 200\]"):
        fit_packed(_models(k=2), short, _cfgs(k=2), device=CPU, log=None)
    with pytest.raises(ValueError, match="one dataset, config and probe entry per model"):
        fit_packed(_models(k=2), sets[:1], _cfgs(k=2), device=CPU, log=None)


def test_memory_estimate_and_check(monkeypatch, data):
    model, cfg = _models(k=1)[0], _cfgs(k=1, batch_size=128)[0]
    est = packed_memory_estimate(model, cfg, k=4, n_train=256, device=CPU)
    assert est["method"] == "counted" and est["total"] == 4 * est["per_model"] > est["step_per_model"] * 4 > 0
    half = packed_memory_estimate(model, _cfgs(k=1, batch_size=64)[0], k=4, n_train=256, device=CPU)
    assert half["step_per_model"] < est["step_per_model"]  # activations scale with the batch
    # no limit off CUDA; with a (pretended) 1 MiB device the pack is refused before training starts
    assert packed_model.available_memory(CPU) is None
    monkeypatch.setattr(packed_model, "available_memory", lambda device: 2**20)
    models = _models(k=2)
    before = [p.clone() for p in models[0].parameters()]
    with pytest.raises(ValueError, match=r"train\.pack = 2: .* needs about .* GiB .* only 0\.00 GiB is available"):
        fit_packed(models, data[0][:2], _cfgs(k=2), device=CPU, log=None)
    assert all(torch.equal(a, b) for a, b in zip(before, models[0].parameters()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_packed_matches_separate_fits_on_cuda(data, precision):
    """On the GPU (cuDNN sums in its own, not always deterministic, order; TF32 off): close, not identical."""
    dev = torch.device("cuda")
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    sets, xt, yt, probe = data
    cfgs = _cfgs(k=2, precision=precision)
    sep = _models(k=2)
    h_sep = [fit(m, *sets[i], cfgs[i], xt, yt, probe=probe, device=dev, log=None) for i, m in enumerate(sep)]
    pk = _models(k=2)
    h_pk = fit_packed(pk, sets[:2], cfgs, xt, yt, probes=[probe] * 2, device=dev, log=None)
    atol = 1e-3 if precision == "fp32" else 5e-2
    for k in range(2):
        assert h_pk[k]["precision"] == h_sep[k]["precision"]
        assert _max_weight_diff(sep[k], pk[k]) < atol
        assert h_pk[k]["epochs"][0]["train_loss"] == pytest.approx(h_sep[k]["epochs"][0]["train_loss"], abs=atol)
        assert str(next(pk[k].parameters()).device).startswith("cuda")
