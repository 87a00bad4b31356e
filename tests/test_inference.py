"""The fast inference path (inference_model: fold_batchnorms and SparseExpertPool; the channels_last gating;
evaluate.predict_logits' CPU micro-batches) gives the plain eval forward's logits and routing."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from pmoe_backdoor import evaluate
from pmoe_backdoor.evaluate import cpu_forward_batch, predict_logits
from pmoe_backdoor.models.architectures import build_model
from pmoe_backdoor.models.inference import SparseExpertPool, fold_batchnorms
from pmoe_backdoor.runtime import cpu_has_bf16, to_input

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")


def _trained_like(name: str = "pmoe", widen: int = 2, seed: int = 0, top_k: int = 16) -> nn.Module:
    """A model whose BNs are not the identity (random affine and running statistics), with non-zero conv biases
    and router weights large enough that the top-k positions are far from ties, in eval mode."""
    torch.manual_seed(seed)
    model = build_model(name, 10, widen_factor=widen, top_k=top_k)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
            elif isinstance(m, nn.Conv2d) and m.bias is not None:
                m.bias.uniform_(-0.1, 0.1)
        if name == "pmoe":
            model.moe.router.weight.normal_(0.0, 0.3)
    return model.eval()


def _images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("widen", [1, 2])
@pytest.mark.parametrize("channels_last", [False, True])
def test_folded_copy_same_logits_and_routing(widen, channels_last):
    model = _trained_like(widen=widen)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    x = to_input(_images(24), channels_last)
    with torch.no_grad():
        ref, ref_idx = model(x, return_routing=True)
        out, idx = fold_batchnorms(model)(x, return_routing=True)
    assert _rel(out, ref) < 1e-4
    assert torch.equal(idx.sort(-1).values, ref_idx.sort(-1).values)


@pytest.mark.parametrize("top_k", [1, 63, 64])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_experts_at_their_routed_positions_only_give_the_dense_result(top_k, precision):
    """SparseExpertPool: k of 64 positions computed, the other 64 - k counted as one constant (none at k = 64)."""
    if precision == "bf16" and not cpu_has_bf16():
        pytest.skip("bf16 on this CPU is emulated and slow")
    model = _trained_like(widen=1, top_k=top_k)
    x = to_input(_images(16), True)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
        ref, ref_idx = model(x, return_routing=True)
        out, idx = fold_batchnorms(model)(x, return_routing=True)
    assert _rel(out.float(), ref.float()) < (1e-4 if precision == "fp32" else 3e-2)
    if precision == "fp32":  # in bf16 the folded convs round differently, which may reorder near-tied positions
        assert torch.equal(idx, ref_idx)


def test_folded_copy_of_the_dense_baseline():
    model = _trained_like("wrn", widen=1)
    x = to_input(_images(8), False)
    with torch.no_grad():
        assert _rel(fold_batchnorms(model)(x), model(x)) < 1e-4


def test_fold_batchnorms_replaces_only_the_foldable_bns_and_leaves_the_model():
    model = _trained_like(widen=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold_batchnorms(model)
    assert folded is not model
    for block in (folded.trunk.group1, folded.trunk.group2):
        assert isinstance(block.bn2, nn.Identity) and isinstance(block.bn1, nn.BatchNorm2d)
    assert isinstance(folded.head.bn, nn.Identity)
    assert isinstance(folded.pre_bn, nn.BatchNorm2d) and isinstance(folded.moe, SparseExpertPool)
    assert isinstance(folded.moe.moe.expert_bn, nn.BatchNorm2d)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert isinstance(model.trunk.group1.bn2, nn.BatchNorm2d)


def test_fold_batchnorms_returns_hooked_or_unknown_models_unchanged():
    model = _trained_like(widen=1)
    model.trunk.group1.conv2.register_forward_pre_hook(lambda m, args: None)
    assert fold_batchnorms(model) is model
    other = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    assert fold_batchnorms(other) is other


@pytest.mark.parametrize("channels_last", [False, True])
def test_predict_logits_equals_the_plain_forward(channels_last, monkeypatch):
    monkeypatch.setattr(evaluate, "CPU_FORWARD_BATCH", 16)
    model = _trained_like(widen=2).train()
    x = _images(2 * 16 + 5)  # micro-batches of 16, 16 and 5
    with torch.no_grad():
        model.eval()
        ref = model(to_input(x, channels_last))
        model.train()
    out = predict_logits(model, x, CPU, batch_size=1000, channels_last=channels_last)
    assert out.shape == ref.shape and _rel(out, ref) < 1e-4
    assert model.training and isinstance(model.trunk.group2.bn2, nn.BatchNorm2d)


def test_channels_last_gating_equals_nchw_gating_without_copies():
    model = _trained_like(widen=1)
    seen = []
    model.moe.expert_bn.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    with torch.no_grad():
        feats = model.features(to_input(_images(6), False))
        routed = model.moe.route(feats)
        model.moe.route = lambda f: routed  # the same gates for both layouts (the 1x1 router rounds per layout)
        model.moe(feats)
        model.moe(feats.contiguous(memory_format=torch.channels_last))
    nchw, nhwc = seen
    assert nhwc.is_contiguous(memory_format=torch.channels_last) and nchw.is_contiguous()
    assert torch.equal(nhwc, nchw)


def test_channels_last_gating_same_gradients():
    """In training too (the gated map keeps the channels_last layout there), not in vmapped packed training."""
    grads, gated = [], []
    for fmt in (torch.contiguous_format, torch.channels_last):
        model = _trained_like(widen=1).train().to(memory_format=fmt)
        model.moe.expert_bn.register_forward_hook(lambda m, i, o: gated.append(i[0]))
        x = to_input(_images(4), fmt == torch.channels_last)
        model(x).logsumexp(1).sum().backward()
        grads.append(model.moe.router.weight.grad.clone())
    assert _rel(grads[1], grads[0]) < 1e-4
    assert gated[1].is_contiguous(memory_format=torch.channels_last) and not gated[1].is_contiguous()


@pytest.mark.parametrize("widen", [2, 10])
def test_cpu_forward_batch_keeps_the_widest_map_under_the_budget(widen):
    # the widest eval map of the pmoe is group 1's (16 * widen channels at 32 x 32), float32; the experts' gated
    # input (4 experts x 64 * widen channels at 8 x 8) is as wide, not wider
    widest = 16 * widen * 32 * 32 * 4
    model = build_model("pmoe", 10, widen_factor=widen).eval()
    assert evaluate.widest_activation_bytes(model) == widest
    assert cpu_forward_batch(model) == evaluate.CPU_ACTIVATION_BYTES // widest


def test_predict_logits_takes_float_images_in_model_form():
    """STRIP's superimposed images arrive as float (N, 3, 32, 32) in [0, 1]: the same logits as their uint8 form."""
    model, x = _trained_like(widen=1), _images(20)
    as_float = to_input(x, channels_last=True).clone()
    assert torch.equal(predict_logits(model, as_float, CPU, 8), predict_logits(model, x, CPU, 8))


def test_compiled_inference_matches_and_is_rebuilt_only_when_the_weights_change():
    """PMOE_COMPILE_INFERENCE: the compiled forward gives the eager logits (the last, short batch padded to the compiled
    shape), is reused by the next call on the same model, and rebuilt after an in-place weight update."""
    import shutil

    model, x = _trained_like(widen=1), _images(21)
    eager = predict_logits(model, x, CPU, 8, compile=False)
    compiled = predict_logits(model, x, CPU, 8, compile=True)
    forward = evaluate._COMPILED[model][1]
    assert _rel(compiled, eager) < 1e-4 and torch.equal(compiled.argmax(1), eager.argmax(1))
    assert torch.equal(predict_logits(model, x, CPU, 8, compile=True), compiled)
    assert evaluate._COMPILED[model][1] is forward  # reused: no second compilation
    with torch.no_grad():
        model.head.fc.bias.add_(1.0)
    shifted = predict_logits(model, x, CPU, 8, compile=True)
    assert evaluate._COMPILED[model][1] is not forward
    assert _rel(shifted - 1.0, eager) < 1e-4
    if shutil.which("g++") or shutil.which("c++"):  # inductor's CPU backend needs a C++ compiler
        assert forward.ok is True, "torch.compile fell back to eager"
