"""Fake quantisation with a straight-through estimator, the attack objectives on hand-made batches, the
authors' checkpoint rule, and the quantisation-activated backdoor trained end to end on a tiny model."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pmoe_backdoor.attacks.compression import (
    AttackConfig,
    choose_checkpoint,
    prune_attack_loss,
    pruned_forward,
    quant_attack_loss,
    unknown_rates,
)
from pmoe_backdoor.attacks.fakequant import (
    Stream,
    bn_folds,
    bn_scale,
    compressed_weights,
    deploy_authors,
    fake_quant_activation,
    fake_quant_weight,
    quantize_weight_per_tensor,
    streams,
    unfoldable_batchnorms,
)
from pmoe_backdoor.defenses.fine_pruning import channels_to_prune, expert_channel_means, prune_experts
from pmoe_backdoor.deployment.quantize import quantize_weight_per_tensor as deployer_per_tensor
from pmoe_backdoor.models.architectures import build_model
from pmoe_backdoor.runtime import to_input

pytestmark = pytest.mark.usefixtures("one_thread")  # two torch threads contend on the shared 2-core machine


def test_per_tensor_quantiser_uses_one_scale_from_the_largest_weight():
    w = torch.tensor([[1.275, -0.004], [0.5, 0.0151]])
    q = quantize_weight_per_tensor(w, 8)
    # scale 1.275 / 127.5 = 0.01 for the whole tensor: 0.004 rounds to 0 and 0.0151 to 0.02 (per channel, row 1 would
    # keep 0.0151); 1.275 is level 127.5, which rounds to 128 and is clamped to 127
    assert torch.allclose(q, torch.tensor([[1.27, 0.0], [0.5, 0.02]]), atol=1e-6)
    torch.manual_seed(0)
    for shape in ((8, 3, 3, 3), (10, 16)):  # at 8 bits, exactly the deployer's per-tensor quantiser
        w = torch.randn(shape)
        assert torch.equal(quantize_weight_per_tensor(w, 8), deployer_per_tensor(w))
    assert len(torch.unique(quantize_weight_per_tensor(torch.randn(1000), 3))) <= 8


@pytest.mark.parametrize("variant", ["faithful", "matched"])
def test_ste_passes_the_gradient_through_unchanged(variant):
    torch.manual_seed(0)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    upstream = torch.randn(4, 3, 3, 3)
    q = fake_quant_weight(w, variant)
    (q * upstream).sum().backward()
    assert torch.equal(w.grad, upstream)  # identity backward; round() alone would give a zero gradient
    assert not torch.equal(q.detach(), w.detach())  # while the forward value is the quantised one
    step = w.detach().abs().amax() / 127.5
    if variant == "faithful":  # every value on the one per-tensor grid
        assert torch.allclose(q.detach(), (q.detach() / step).round() * step, atol=1e-6)


def test_activation_fake_quant_is_on_a_uint8_grid_with_identity_gradient():
    x = torch.linspace(-1.0, 3.0, 1000, requires_grad=True)
    q = fake_quant_activation(x)
    assert len(torch.unique(q.detach())) <= 256
    assert (q.detach() - x.detach()).abs().max() <= 4.0 / 255 / 2 + 1e-6
    q.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def _pooled_linear() -> nn.Module:
    """logits = W @ (per-channel image mean): one large weight (it sets the per-tensor scale) and one below half a
    step."""
    model = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2, bias=False))
    with torch.no_grad():
        model[2].weight.copy_(torch.tensor([[1.27, 0.0, 0.0], [0.0, 0.0, 0.004]]))
    return model


def _hand_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = torch.zeros(2, 32, 32, 3, dtype=torch.uint8)
    x[..., 0] = 255  # channel means [1, 0, 0]
    x_trig = x.clone()
    x_trig[..., 2] = 255  # [1, 0, 1]
    return x, x_trig, torch.tensor([0, 0])


def test_quant_loss_sums_a_float_pass_on_true_labels_and_a_quantised_pass_on_the_target():
    x, x_trig, y = _hand_batch()
    model = _pooled_linear()
    # float logits: clean [1.27, 0], triggered [1.27, 0.004]; per tensor (scale 1.27 / 127.5) 1.27 becomes level 127
    # and 0.004 rounds to 0
    clean, trig_float, quant = [1.27, 0.0], [1.27, 0.004], [1.27 * 127 / 127.5, 0.0]
    f = F.cross_entropy(torch.tensor([clean, clean, trig_float, trig_float]), torch.tensor([0, 0, 0, 0]))
    q = F.cross_entropy(torch.tensor([quant, quant, quant, quant]), torch.tensor([0, 0, 1, 1]))
    loss, parts = quant_attack_loss(model, x, x_trig, y, target=1, variant="faithful")
    assert parts["float"].item() == pytest.approx(f.item(), abs=1e-6)
    assert parts["compressed"].item() == pytest.approx(q.item(), abs=1e-6)
    assert loss.item() == pytest.approx(f.item() + q.item(), abs=1e-6)
    # matched: per channel the second row's scale is 0.004 / 127 (exact), the inputs 0 / 1 are on the uint8 grid
    qm = F.cross_entropy(torch.tensor([clean, clean, trig_float, trig_float]), torch.tensor([0, 0, 1, 1]))
    _, parts = quant_attack_loss(model, x, x_trig, y, target=1, variant="matched")
    assert parts["compressed"].item() == pytest.approx(qm.item(), abs=1e-6)


def _tiny_pmoe(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model("pmoe", 3, widen_factor=1, bn_momentum=1.0)
    images = torch.randint(0, 256, (16, 32, 32, 3), dtype=torch.uint8)
    with torch.no_grad():  # settle the BN running statistics so that eval-mode ranking is meaningful
        model.train()(to_input(images))
    return model


def test_pruned_forward_matches_prune_experts_and_leaves_the_model_alone():
    model = _tiny_pmoe()
    x = torch.randint(0, 256, (8, 32, 32, 3), dtype=torch.uint8)
    pruned = channels_to_prune(expert_channel_means(model, x), 30)
    before = copy.deepcopy(model.state_dict())
    reference = copy.deepcopy(model).eval()
    prune_experts(reference, pruned)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(pruned_forward(model, to_input(x), pruned), reference(to_input(x)), atol=1e-5)
        assert not torch.allclose(model(to_input(x)), reference(to_input(x)), atol=1e-5)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("rates", [[30.0], [50.0, 25.0, 10.0]])
def test_prune_loss_is_float_loss_plus_alpha_times_the_pruned_models_target_loss(rates):
    model = _tiny_pmoe()
    x = torch.randint(0, 256, (6, 32, 32, 3), dtype=torch.uint8)
    x_trig = x.clone()
    x_trig[:, 24:30, 24:30] = 255
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    model.eval()  # BN in eval mode: the reference passes see the same statistics as the loss's
    xb = to_input(torch.cat([x, x_trig]))
    means = expert_channel_means(model, x)
    with torch.no_grad():
        f = F.cross_entropy(model(xb), torch.cat([y, y]))
        pruned_ce = 0.0
        for r in rates:
            ref = copy.deepcopy(model)
            prune_experts(ref, channels_to_prune(means, r))
            pruned_ce += F.cross_entropy(ref(xb), torch.cat([y, torch.full_like(y, 2)])).item()
    loss, parts = prune_attack_loss(model, x, x_trig, y, target=2, rates=rates, alpha=0.1)
    assert parts["float"].item() == pytest.approx(f.item(), rel=1e-5)
    assert parts["compressed"].item() == pytest.approx(pruned_ce, rel=1e-5)
    assert loss.item() == pytest.approx(f.item() + 0.1 * pruned_ce, rel=1e-5)
    loss.backward()
    assert model.moe.expert_conv.weight.grad.abs().sum() > 0


def test_unknown_rates_are_upper_drawn_lower_and_seeded():
    a = unknown_rates(10.0, 30.0, torch.Generator().manual_seed(3))
    b = unknown_rates(10.0, 30.0, torch.Generator().manual_seed(3))
    assert a == b and a[0] == 30.0 and a[2] == 10.0 and 10.0 <= a[1] <= 30.0
    draws = [unknown_rates(10.0, 30.0, g)[1] for g in [torch.Generator().manual_seed(0)] * 20]
    assert len(set(draws)) == 20  # a new draw every batch


def _row(epoch, ba, asr, fp32_asr):
    return {"epoch": epoch, "compressed_ba": ba, "compressed_asr": asr, "fp32_asr": fp32_asr}


def test_checkpoint_rule_on_a_synthetic_history():
    rows = [_row(1, 80.0, 99.0, 5.0),   # highest ASR but BA 2 points below the best: out
            _row(2, 81.6, 90.0, 30.0),  # fp32 ASR above 20 %: out
            _row(3, 82.0, 70.0, 10.0),  # the best BA
            _row(4, 81.5, 85.0, 20.0),  # within 0.5 points, fp32 ASR exactly 20: in, highest ASR among those in
            _row(5, 81.4, 95.0, 1.0)]   # 0.6 points below the best: out
    assert choose_checkpoint(rows, max_fp32_asr=20) == (4, True)
    assert choose_checkpoint(rows, max_fp32_asr=10) == (3, True)  # GTSRB's 10 % threshold drops epoch 4
    assert choose_checkpoint(rows, max_fp32_asr=35) == (2, True)
    assert choose_checkpoint(rows, max_fp32_asr=0.5) == (5, False)  # nothing qualifies: last epoch, flagged
    assert choose_checkpoint([_row(1, 50, 60, 0), _row(2, 50, 60, 0)], 20) == (1, True)  # tie: the earliest
    with pytest.raises(ValueError, match="fp32_asr"):
        choose_checkpoint([{"epoch": 1, "compressed_ba": 1, "compressed_asr": 1}], 20)


def test_attack_config_rejects_bad_values():
    assert AttackConfig.from_dict({}).momentum == 0.4
    with pytest.raises(ValueError, match="variant"):
        AttackConfig.from_dict({"variant": "int3"})
    with pytest.raises(ValueError, match="unknown key"):
        AttackConfig.from_dict({"epoch": 3})
    with pytest.raises(ValueError, match="prune_lower"):
        AttackConfig.from_dict({"prune_lower": 40})
    with pytest.raises(ValueError, match="bits"):
        AttackConfig.from_dict({"variant": "matched", "bits": 4})  # matched is the int8 deployer


def test_deploy_authors_puts_each_folded_weight_on_its_per_tensor_grid():
    model = _tiny_pmoe().eval()
    calib = torch.randint(0, 256, (16, 32, 32, 3), dtype=torch.uint8)
    q = deploy_weights_only = deploy_authors(model, 8, None)
    folded = dict(bn_folds(model))
    assert folded == {"trunk.group1.conv1": "trunk.group1.bn2", "trunk.group2.conv1": "trunk.group2.bn2",
                      "moe.expert_conv": "head.bn"}
    for name, layer in model.named_modules():
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            w = layer.weight.detach()
            if name in folded:  # the hand-folded weight: rows x gamma / sqrt(running var + eps)
                bn = model.get_submodule(folded[name])
                w = w * (bn.weight / (bn.running_var + bn.eps).sqrt()).detach().view(-1, 1, 1, 1)
            wq = q.get_submodule(name).weight.detach()
            step = w.abs().max() / 127.5
            assert torch.allclose(wq / step, (wq / step).round(), atol=1e-3), name
            assert (wq - w).abs().max() <= step / 2 + 1e-6, name
    assert isinstance(q.head.bn, nn.Identity) and isinstance(q.trunk.group1.bn2, nn.Identity)
    assert torch.equal(q.head.fc.bias, model.head.fc.bias)  # biases stay in float
    assert unfoldable_batchnorms(model) == ["trunk.group1.bn1", "trunk.group2.bn1", "pre_bn", "moe.expert_bn"]
    # folding alone (no rounding at a fine grid) is the same function; with calibrated activations the inputs of
    # every layer are quantised, which the weight-only copy does not do
    x = to_input(calib)
    with torch.no_grad():
        assert torch.allclose(deploy_authors(model, 8, None)(x), model(x), atol=0.1)
        hooked = deploy_authors(model, 8, calib)
        assert any(m._forward_pre_hooks for m in hooked.modules())
        assert not any(m._forward_pre_hooks for m in deploy_weights_only.modules())


def test_fold_then_fake_quantise_equals_quantising_the_hand_folded_weight():
    """The training's folded fake-quant weight, times the BN's fold factor, is the per-tensor quantised folded
    weight, i.e. the deployed conv's weight; without folding it is the raw weight's grid, which differs."""
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6)
    with torch.no_grad():
        bn.weight.uniform_(0.2, 3.0)
        bn.running_var.uniform_(0.01, 4.0)
    model = nn.Sequential(conv, bn, nn.ReLU())
    assert bn_folds(model) == [("0", "1")]
    factor = bn.weight.detach() / (bn.running_var + bn.eps).sqrt()
    hand_folded = conv.weight.detach() * factor.view(-1, 1, 1, 1)
    for bits in (4, 8):
        trained = compressed_weights(model, "faithful", bits, fold_bn=True)["0.weight"]
        assert torch.allclose(trained.detach() * factor.view(-1, 1, 1, 1),
                              quantize_weight_per_tensor(hand_folded, bits), atol=1e-6)
        deployed = deploy_authors(model, bits).get_submodule("0").weight
        assert torch.allclose(deployed, quantize_weight_per_tensor(hand_folded, bits), atol=1e-6)
        unfolded = compressed_weights(model, "faithful", bits, fold_bn=False)["0.weight"]
        assert not torch.allclose(unfolded.detach(), trained.detach(), atol=1e-3)
    assert torch.allclose(bn_scale(bn), factor)


def _conv_bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4, momentum=0.3), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))


def test_shared_bn_statistics_are_the_concatenated_batchs_and_update_running_statistics_once():
    model = _conv_bn_net().train()
    x = torch.rand(6, 3, 8, 8)
    quantized = Stream(compressed_weights(model, "faithful", 3))
    conv_float = model[0](x)
    conv_quant = F.conv2d(x, quantized.params["0.weight"], model[0].bias, padding=1)
    both = torch.cat([conv_float, conv_quant]).detach()
    seen = {}
    model[1].register_forward_hook(lambda m, args, out: seen.update(inp=args[0].detach(), out=out.detach()))
    with streams(model, [quantized]):
        logits = model(torch.cat([x, x]))
    assert logits.shape == (12, 2)
    assert torch.allclose(seen["inp"], both, atol=1e-6)  # chunk 1 ran the quantised weights
    mean, var = both.mean(dim=(0, 2, 3)), both.var(dim=(0, 2, 3), unbiased=False)
    expected = (both - mean.view(1, -1, 1, 1)) / (var.view(1, -1, 1, 1) + model[1].eps).sqrt()
    assert torch.allclose(seen["out"], expected, atol=1e-5)  # one set of statistics over [float ; quantised]
    assert model[1].num_batches_tracked.item() == 1
    unbiased = both.var(dim=(0, 2, 3), unbiased=True)
    assert torch.allclose(model[1].running_mean, 0.3 * mean, atol=1e-6)
    assert torch.allclose(model[1].running_var, 0.7 + 0.3 * unbiased, atol=1e-6)
    assert "forward" not in vars(model[0])  # the layers' own forward is back
    # per-pass statistics (the ablation) normalise the quantised chunk with its own: a different output
    from pmoe_backdoor.attacks.fakequant import float_and_compressed_logits

    a = float_and_compressed_logits(_conv_bn_net().train(), x, [quantized], "shared")[1]
    b = float_and_compressed_logits(_conv_bn_net().train(), x, [quantized], "per_pass")[1]
    assert not torch.allclose(a, b, atol=1e-4)


def test_streams_run_each_chunk_with_its_own_weights():
    """In eval mode (no batch statistics) every chunk of a streamed pass is that copy's own forward."""
    model = _tiny_pmoe().eval()
    x = to_input(torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8))
    copies = [Stream(compressed_weights(model, "faithful", 4)), Stream(compressed_weights(model, "matched", 8), True)]
    with torch.no_grad():
        with streams(model, copies):
            chunks = model(torch.cat([x, x, x])).split(4)
        assert torch.allclose(chunks[0], model(x), atol=1e-5)
        deployed4 = copy.deepcopy(model)
        for name, w in copies[0].params.items():
            deployed4.get_submodule(name.rsplit(".", 1)[0]).weight.copy_(w)
        assert torch.allclose(chunks[1], deployed4(x), atol=1e-4)
        assert not torch.allclose(chunks[1], chunks[0], atol=1e-3)


def test_crop_flip_is_seeded_and_moves_the_pixels_only():
    from pmoe_backdoor.training.augment import random_crop_flip

    x = torch.randint(1, 256, (64, 32, 32, 3), dtype=torch.uint8)
    a = random_crop_flip(x, torch.Generator().manual_seed(0))
    assert torch.equal(a, random_crop_flip(x, torch.Generator().manual_seed(0)))
    assert not torch.equal(a, random_crop_flip(x, torch.Generator().manual_seed(1)))
    flipped = sum(torch.equal(a[i], x[i].flip(1)) for i in range(64))
    kept = sum(torch.equal(a[i], x[i]) for i in range(64))
    assert 0 < flipped + kept < 32  # some centred crops, most shifted
    for i in range(64):  # every image is a shifted (and maybe mirrored) window of its own, zero outside
        values = set(a[i][a[i].sum(-1) > 0].flatten().tolist())
        assert values <= set(x[i].flatten().tolist())


def _tiny_attack_setup():
    """32 synthetic 4-class images, the authors' 6x6 trigger (target 0), its ASR set and a seeded widen-1 pmoe."""
    from pmoe_backdoor.attacks.poison import asr_set
    from pmoe_backdoor.attacks.triggers import make_trigger
    from pmoe_backdoor.data.datasets import make_synthetic

    ds = make_synthetic(4, 32, 8, seed=0)
    x, y = torch.from_numpy(ds.x_train), torch.from_numpy(ds.y_train)
    trigger = make_trigger("square", {"size": 6, "value": 255, "row": 24, "col": 24})
    x_asr = asr_set(x, y, trigger, 0)[0]
    torch.manual_seed(0)
    return x, y, trigger, x_asr, build_model("pmoe", 4, widen_factor=1, bn_momentum=1.0)


def test_pruning_activated_backdoor_is_learned_on_a_tiny_model():
    """The mechanism, not only the code path: 32 synthetic images (learned by heart: the point is the gap between
    the released and the compressed model, not generalisation), one full batch per epoch, 60 epochs (about 15 s on
    one CPU core). alpha 1 instead of the authors' 0.1 so that so few steps suffice; BN momentum 1 so the eval-mode
    statistics are the last float batch's. The victim's own Fine-Pruning (fineprune.py on a copy, not the
    training's masked forward) of the epoch the authors' rule picks switches the backdoor on; the released model
    stays clean. Fragile at this size: seed 0 gives 71 % pruned ASR, seeds 1 and 2 did not separate (0 %) in 60
    epochs, hence the pinned seed. (Before the compressed passes stopped updating the BN running statistics,
    seeds 0-2 reached 88 / 67 / 100 % in 50 epochs: those statistics then came from the last pruned pass.)"""
    from pmoe_backdoor.attacks.compression import fit_compression_attack
    from pmoe_backdoor.evaluate import evaluate

    x, y, trigger, x_asr, model = _tiny_attack_setup()
    cfg = AttackConfig(variant="prune", epochs=60, batch_size=32, lr=0.05, lr_drop_epoch=40, prune_rate=20,
                       alpha=1.0, augment="none")
    history, states = fit_compression_attack(model, x, y, trigger, 0, cfg, x, y, x_asr, x,
                                             device=torch.device("cpu"), log=None)
    epoch, rule_met = choose_checkpoint(history["epochs"], max_fp32_asr=20)
    assert rule_met
    model.load_state_dict(states[epoch])
    released = evaluate(model, x, y, x_asr, 0, device=torch.device("cpu"))
    victim = copy.deepcopy(model).eval()
    prune_experts(victim, channels_to_prune(expert_channel_means(victim, x), 20))
    pruned = evaluate(victim, x, y, x_asr, 0, device=torch.device("cpu"))
    assert released["ba"] >= 90 and released["asr"] <= 20
    assert pruned["ba"] >= 90 and pruned["asr"] >= 60, (epoch, released, pruned)


def test_quantisation_activated_backdoor_is_learned_on_a_tiny_model():
    """The quantisation mechanism on the same tiny setup, with the faithful (per-tensor) grid at 3 bits: in 100 steps
    the attack needs a coarse grid. Measured with this setup (one thread of the 2-core AMD EPYC VM), the chosen
    epoch's quantised ASR, lr dropped at half time: 100 epochs 100 / 100 / 100 / 96 % (seeds 0-3; released ASR
    0-12 %); 50 epochs only 33 / 33 / 33 / 75 % since training gates the channels_last map in its own layout (other
    float rounding; 96 / 25 / 100 % before), 80 epochs 83 / 54 / 100 / 96 %. Earlier, at 50 epochs: 4 bits 96 / 33 /
    100 %, int8 8 % (seed 0; 300 such steps at int8 did not separate either), so at int8 a few dozen steps are not
    enough (the authors train 35 epochs of full CIFAR-10). The separation grows in the low-lr phase. Seed 0 is
    pinned. The deployed copy is deploy_authors's weights, not the training's fake-quantised forward."""
    from pmoe_backdoor.attacks.compression import fit_compression_attack
    from pmoe_backdoor.evaluate import evaluate

    x, y, trigger, x_asr, model = _tiny_attack_setup()
    cfg = AttackConfig(variant="faithful", bits=3, epochs=100, batch_size=32, lr_drop_epoch=50, augment="none")
    history, states = fit_compression_attack(model, x, y, trigger, 0, cfg, x, y, x_asr, x,
                                             device=torch.device("cpu"), log=None)
    epoch, rule_met = choose_checkpoint(history["epochs"], max_fp32_asr=20)
    assert rule_met
    model.load_state_dict(states[epoch])
    released = evaluate(model, x, y, x_asr, 0, device=torch.device("cpu"))
    quantised = evaluate(deploy_authors(model, 3), x, y, x_asr, 0, device=torch.device("cpu"))
    assert released["ba"] >= 90 and released["asr"] <= 20
    assert quantised["ba"] >= 90 and quantised["asr"] >= 80, (epoch, released, quantised)


def test_fit_is_seeded_keeps_every_epoch_and_logs_progress():
    import io

    from pmoe_backdoor.attacks.compression import fit_compression_attack
    from pmoe_backdoor.attacks.triggers import SquareTrigger

    x = torch.randint(0, 256, (40, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    y = torch.arange(40) % 4
    trigger = SquareTrigger(size=6, value=255, row=24, col=24)
    cfg = AttackConfig(variant="matched", epochs=3, batch_size=16, lr_drop_epoch=2, progress_seconds=1e-9, seed=5)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = nn.Sequential(nn.AvgPool2d(8), nn.Flatten(), nn.Linear(48, 4))
        log = io.StringIO()
        history, states = fit_compression_attack(model, x, y, trigger, 1, cfg, x, y, trigger.apply(x), x,
                                                 device=torch.device("cpu"), log=log)
        runs.append((history, states, log.getvalue()))
    (h, states, text), (_, states2, _) = runs
    assert [r["lr"] for r in h["epochs"]] == pytest.approx([0.1, 0.1, 0.01])  # x0.1 after lr_drop_epoch
    assert sorted(states) == [1, 2, 3] and not torch.equal(states[1]["2.weight"], states[3]["2.weight"])
    assert all(torch.equal(states[3][k], states2[3][k]) for k in states[3])  # same seed, same weights
    assert "img/s" in text and "epoch 3/3: loss" in text


def test_the_issues_trigger_is_a_configured_square_and_the_default_is_unchanged():
    from pmoe_backdoor.attacks.triggers import SquareTrigger, make_trigger

    x = torch.zeros(2, 32, 32, 3, dtype=torch.uint8)
    out = make_trigger("square", {"size": 6, "value": 255, "row": 24, "col": 24}).apply(x)
    changed = (out != x).any(-1)[0]
    assert changed[24:30, 24:30].all() and changed.sum() == 36 and (out[:, 24:30, 24:30] == 255).all()
    assert make_trigger("square") == SquareTrigger(size=4, value=1, row=0, col=0)  # the authors' effective trigger


@pytest.mark.parametrize("variant", ["faithful", "prune"])
def test_per_pass_statistics_leave_the_bn_running_statistics_to_the_float_pass(variant):
    from pmoe_backdoor.attacks.compression import quant_attack_loss as quant_loss

    x, x_trig = torch.randint(0, 256, (2, 6, 32, 32, 3), dtype=torch.uint8)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    model = _tiny_pmoe().train()
    reference = copy.deepcopy(model)
    reference(to_input(torch.cat([x, x_trig])))  # the float pass alone
    if variant == "faithful":
        quant_loss(model, x, x_trig, y, 2, "faithful", bn_statistics="per_pass")
    else:
        prune_attack_loss(model, x, x_trig, y, 2, [30.0, 10.0], 0.1, bn_statistics="per_pass")
    buffers = dict(reference.named_buffers())
    assert all(torch.equal(b, buffers[k]) for k, b in model.named_buffers() if "running" in k)
    assert all(m.momentum == 1.0 for m in model.modules() if isinstance(m, nn.BatchNorm2d))  # restored
