"""The router-evasive backdoor: trigger positions, the evasion hinge, its gradient, the routing measure, and the
mechanism (trained with the term, the trigger reaches the experts' top-k less often than without it)."""

from __future__ import annotations

import pytest
import torch

from pmoe_backdoor.attacks.poison import asr_set, make_poison
from pmoe_backdoor.attacks.router_evasion import (
    EvasionConfig,
    RouterEvasionStep,
    evasion_loss,
    evasion_loss_from_features,
    fit_router_evasive,
    routing_log_probs,
    trigger_positions,
    trigger_rank_stats,
)
from pmoe_backdoor.attacks.triggers import make_trigger
from pmoe_backdoor.data.datasets import make_synthetic
from pmoe_backdoor.models.architectures import build_model
from pmoe_backdoor.models.routing import routing_indices, trigger_patch_stats
from pmoe_backdoor.runtime import to_input
from pmoe_backdoor.training.loop import TrainConfig, fit

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")
# a strong white 4x4 square on one grid position away from the border (row 3, col 3: position 27)
WHITE_SQUARE = {"size": 4, "value": 255, "row": 12, "col": 12}


def tiny_pmoe(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    # a fast BN momentum: a few dozen steps must leave eval-mode statistics that match the weights
    return build_model("pmoe", 10, bn_momentum=0.3, widen_factor=1)


@pytest.fixture(scope="module")
def poisoned_synthetic():
    ds = make_synthetic(10, n_train=640, n_test=300, seed=0)
    trigger = make_trigger("square", WHITE_SQUARE)
    x_train, y_train = torch.from_numpy(ds.x_train), torch.from_numpy(ds.y_train)
    record = make_poison(ds.x_train, ds.y_train, trigger, 10.0, seed=1, target=0)
    x_poisoned, y_poisoned = record.apply(x_train, y_train)
    mask = torch.zeros(len(y_poisoned), dtype=torch.bool)
    mask[record.indices] = True
    x_test, y_test = torch.from_numpy(ds.x_test), torch.from_numpy(ds.y_test)
    x_asr, _ = asr_set(x_test, y_test, trigger, target=0)
    return {"trigger": trigger, "x": x_poisoned, "y": y_poisoned, "mask": mask, "x_test": x_test,
            "y_test": y_test, "x_asr": x_asr}


# --- trigger positions -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("params, expected", [
    ({"size": 4, "value": 255, "row": 0, "col": 0}, [0]),  # exactly one patch
    ({"preset": "tian"}, [54, 55, 62, 63]),  # 6x6 at (24, 24): rows 24-29 -> grid rows 6-7, same for columns
    ({"preset": "badnets"}, [63]),  # 3x3 at (29, 29): inside the last patch
    ({"size": 4, "value": 255, "row": 2, "col": 2}, [0, 1, 8, 9]),  # straddles four patches
    ({"size": 1, "value": 255, "row": 4, "col": 31}, [15]),  # row 1, col 7
    (WHITE_SQUARE, [27]),
])
def test_trigger_positions_by_hand(params, expected):
    assert trigger_positions(make_trigger("square", params)) == expected


def test_trigger_positions_need_a_patch_located_trigger():
    with pytest.raises(ValueError, match="patch-located"):
        trigger_positions(make_trigger("blend", {"pattern": "noise"}, seed=0))


# --- the evasion hinge -------------------------------------------------------------------------------------------

def scored_moe(scores: torch.Tensor) -> tuple[torch.nn.Module, torch.Tensor]:
    """A tiny pMoE's MoE stage whose routers score position p of expert e with ``scores[e, p]``: the map has one
    channel per expert, each router reads its own channel only."""
    model = build_model("pmoe", 10, widen_factor=1)
    moe = model.moe
    experts, channels = moe.num_experts, moe.in_channels
    with torch.no_grad():
        moe.router.weight.zero_()
        for e in range(experts):
            moe.router.weight[e, e] = 1.0
    feats = torch.zeros(1, channels, 8, 8)
    feats[0, :experts] = scores.view(experts, 8, 8)
    return moe, feats


def test_hinge_is_zero_far_below_and_positive_on_top():
    k = 16
    base = torch.linspace(1.0, 0.0, 64).repeat(4, 1)  # position 0 best, position 63 worst, every expert
    moe, feats = scored_moe(base)
    assert moe.top_k == k
    # position 63 is the last of all: far below the k-th of the others, even with a margin of 0.5
    assert evasion_loss_from_features(moe, feats, [63], margin=0.5).item() == 0.0
    # position 0 is on top: its log-probability minus the k-th other's, the same for all four experts
    on_top = evasion_loss_from_features(moe, feats, [0], margin=0.0)
    expected = (base[0, 0] - base[0, k]).item()  # the others' k-th largest is position k (0 removed)
    assert on_top.item() == pytest.approx(expected, rel=1e-5)
    assert evasion_loss_from_features(moe, feats, [0], margin=0.5).item() == pytest.approx(expected + 0.5, rel=1e-5)


def test_hinge_boundary_is_the_top_k():
    """With margin 0 the hinge is zero just outside the top-k (rank k) and positive just inside it (rank k - 1)."""
    k = 16
    base = torch.linspace(1.0, 0.0, 64).repeat(4, 1)
    moe, feats = scored_moe(base)
    assert evasion_loss_from_features(moe, feats, [k], margin=0.0).item() == 0.0
    assert evasion_loss_from_features(moe, feats, [k - 1], margin=0.0).item() > 0.0
    # the max over trigger positions: one position inside the top-k is enough
    assert evasion_loss_from_features(moe, feats, [63, k - 1], margin=0.0).item() > 0.0


def test_hinge_reads_top_k_from_the_model():
    base = torch.linspace(1.0, 0.0, 64).repeat(4, 1)
    moe, feats = scored_moe(base)
    moe.top_k = 40  # position 30 is now well inside the top-k
    assert evasion_loss_from_features(moe, feats, [30]).item() > 0.0
    moe.top_k = 16
    assert evasion_loss_from_features(moe, feats, [30]).item() == 0.0


def test_hinge_averages_over_experts():
    base = torch.linspace(1.0, 0.0, 64).repeat(4, 1)
    base[1:] = base[1:].flip(-1)  # experts 1-3 put position 0 last
    moe, feats = scored_moe(base)
    loss = evasion_loss_from_features(moe, feats, [0]).item()
    assert loss == pytest.approx((base[0, 0] - base[0, 16]).item() / 4, rel=1e-5)


def test_hinge_of_an_empty_batch_is_zero_and_bad_positions_fail():
    moe, feats = scored_moe(torch.zeros(4, 64))
    assert evasion_loss_from_features(moe, feats[:0], [0]).item() == 0.0
    for bad in ([], [64], [1, 1], list(range(49))):  # 49 positions leave 15 < k others
        with pytest.raises(ValueError):
            evasion_loss_from_features(moe, feats, bad)


def test_log_probs_order_positions_as_routing_probs():
    model = tiny_pmoe(0).eval()
    x = to_input(torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8), channels_last=False)
    with torch.no_grad():
        feats = model.features(x)
        log_probs, probs = routing_log_probs(model.moe, feats), model.moe.routing_probs(feats)
    torch.testing.assert_close(log_probs.exp(), probs)


@pytest.mark.parametrize("seed", [0, 1])
def test_one_step_lowers_the_trigger_scores(seed, poisoned_synthetic):
    """The hinge's gradient: one SGD step on the evasion term alone lowers the trigger positions' router
    log-probabilities and their best rank on the triggered batch (BN in eval mode, so only the weights move)."""
    model = tiny_pmoe(seed).eval()
    positions = trigger_positions(poisoned_synthetic["trigger"])
    x = to_input(poisoned_synthetic["x_asr"][:64], channels_last=False)

    def trigger_score_and_rank() -> tuple[float, float]:
        with torch.no_grad():
            scores = routing_log_probs(model.moe, model.features(x))
        stats = trigger_rank_stats(model, x, positions)
        return scores[..., positions].mean().item(), stats["mean_best_rank"]

    score0, rank0 = trigger_score_and_rank()
    # margin 1 nat: at initialisation all 64 router scores lie within ~1e-3, so every (image, expert) counts
    loss = evasion_loss(model, x, positions, margin=1.0)
    assert loss.item() > 0.5
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.zero_grad()
    loss.backward()
    opt.step()
    score1, rank1 = trigger_score_and_rank()
    assert score1 < score0
    assert rank1 > rank0  # a larger rank number is further from the top
    assert evasion_loss(model, x, positions, margin=1.0).item() < loss.item()


# --- the routing measure -----------------------------------------------------------------------------------------

def test_rank_stats_agree_with_the_models_routing(poisoned_synthetic):
    model = tiny_pmoe(0)
    with torch.no_grad():  # routers far from their near-uniform init, so that no two positions tie
        model.moe.router.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(0))
    x = poisoned_synthetic["x_asr"][:40]
    positions = [27, 28, 35]
    stats = trigger_rank_stats(model, x, positions, batch_size=16)
    reference = trigger_patch_stats(routing_indices(model, x), positions)
    assert stats["image_reach_rate"] == pytest.approx(reference["reached_fraction"])
    assert stats["expert_selection_rate"] == pytest.approx(sum(reference["per_expert_fraction"]) / 4)
    # best rank by sorting, image by image
    with torch.no_grad():
        probs = model.eval().moe.routing_probs(model.features(to_input(x, channels_last=False)))
    order = probs.argsort(dim=-1, descending=True)
    rank_of = order.argsort(dim=-1)  # (N, E, 64): each position's place in its expert's ordering
    best = rank_of[..., positions].amin(dim=-1).double()
    assert stats["mean_best_rank"] == pytest.approx(best.mean().item())
    assert stats["per_expert_best_rank"] == pytest.approx(best.mean(dim=0).tolist())
    # selected in some expert's top-k <=> best rank < k
    assert stats["expert_selection_rate"] == pytest.approx((best < model.moe.top_k).double().mean().item())
    defense_best = probs.amax(dim=1).argsort(-1, descending=True).argsort(-1)[:, positions].amin(-1)
    assert stats["defense_rank"] == pytest.approx(defense_best.double().mean().item())
    assert stats["defense_top_m_rate"] == pytest.approx((defense_best < 4).double().mean().item())


# --- the config --------------------------------------------------------------------------------------------------

def test_config_from_dict_checks():
    assert EvasionConfig.from_dict({"weight": 3, "margin": 0.0}).weight == 3
    with pytest.raises(ValueError, match="unknown"):
        EvasionConfig.from_dict({"wieght": 1.0})
    for bad in ({"weight": -1.0}, {"margin": -0.5}, {"rank_images": 0}, {"epochs": 10}):
        with pytest.raises(ValueError):
            EvasionConfig.from_dict(bad)


# --- training ----------------------------------------------------------------------------------------------------

def train(data: dict, seed: int, weight: float, mask: torch.Tensor | None = None, epochs: int = 2,
          init_seed: int | None = None) -> tuple[torch.nn.Module, dict]:
    model = tiny_pmoe(seed if init_seed is None else init_seed)
    cfg = TrainConfig(epochs=epochs, batch_size=64, lr=0.1, seed=seed, eval_every=0)
    history = fit_router_evasive(model, data["x"], data["y"], data["mask"] if mask is None else mask,
                                 data["trigger"], cfg, EvasionConfig(weight=weight), data["x_test"], data["y_test"],
                                 data["x_asr"], target=0, device=CPU, log=None)
    return model, history


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


def test_same_seed_same_result(poisoned_synthetic):
    a, ha = train(poisoned_synthetic, seed=3, weight=1.0, epochs=1)
    b, hb = train(poisoned_synthetic, seed=3, weight=1.0, epochs=1)
    assert same_weights(a, b)
    drop = ("train_seconds", "images_per_s", "eval_seconds")
    assert [{k: v for k, v in r.items() if k not in drop} for r in ha["epochs"]] == \
        [{k: v for k, v in r.items() if k not in drop} for r in hb["epochs"]]


def test_no_poisoned_images_no_term(poisoned_synthetic):
    """Batches without poisoned images add nothing: with an all-False mask, weight 1 trains exactly as weight 0;
    with the real mask it does not."""
    nothing = torch.zeros_like(poisoned_synthetic["mask"])
    plain, _ = train(poisoned_synthetic, seed=0, weight=0.0, mask=nothing, epochs=1)
    unmarked, _ = train(poisoned_synthetic, seed=0, weight=1.0, mask=nothing, epochs=1)
    evasive, _ = train(poisoned_synthetic, seed=0, weight=1.0, epochs=1)
    assert same_weights(plain, unmarked)
    assert not same_weights(plain, evasive)


def test_weight_zero_is_plain_poisoned_training(poisoned_synthetic):
    """The baseline of the trade-off is the study's ordinary training: weight 0 through the evasive step gives
    the weights ``fit`` gives with the same recipe, init and shuffling."""
    d = poisoned_synthetic
    baseline, _ = train(d, seed=2, weight=0.0, epochs=1)
    plain = tiny_pmoe(2)
    fit(plain, d["x"], d["y"], TrainConfig(epochs=1, batch_size=64, lr=0.1, seed=2, eval_every=0), device=CPU,
        log=None)
    assert same_weights(baseline, plain)


def test_the_step_trains_the_term_in_bf16_autocast(poisoned_synthetic):
    """The study trains in bf16 autocast: the routers must read the pre-MoE map inside the autocast region (bf16
    activations into fp32 router weights outside it fail), and the term must still move the routers."""
    d = poisoned_synthetic
    model = tiny_pmoe(0)
    before = model.moe.router.weight.detach().clone()
    cfg = TrainConfig(epochs=1, batch_size=64, lr=0.1, seed=0, eval_every=0)
    history = {"epochs": [], "routing": []}
    step = RouterEvasionStep(model, (d["x"], d["y"], d["mask"]), trigger_positions(d["trigger"]), cfg,
                             EvasionConfig(weight=1.0), (None, None), None, 0, history, None, CPU, "bf16")
    step.start_epoch(1)
    idx = torch.cat([torch.nonzero(d["mask"]).flatten()[:8], torch.nonzero(~d["mask"]).flatten()[:56]])
    step.train_batch(idx)
    row = step.end_epoch(1, 1.0, evaluate_now=False)[0]
    assert row["train_evasion"] > 0 and not torch.equal(model.moe.router.weight, before)


def test_needs_a_pmoe(poisoned_synthetic):
    d = poisoned_synthetic
    with pytest.raises(TypeError, match="pMoE"):
        fit_router_evasive(build_model("wrn", 10, widen_factor=1), d["x"], d["y"], d["mask"], d["trigger"],
                           TrainConfig(epochs=1), EvasionConfig(), device=CPU, log=None)


@pytest.mark.parametrize("seed", [0, 1])
def test_evasion_keeps_the_trigger_out_of_the_top_k(seed, poisoned_synthetic):
    """Same init, same shuffling: trained with the evasion term (weight 1) the trigger's position is selected by
    the experts' routers on triggered test images far less often than after plain poisoned training (weight 0)."""
    _, plain = train(poisoned_synthetic, seed=seed, weight=0.0)
    _, evasive = train(poisoned_synthetic, seed=seed, weight=1.0)
    p, e = plain["epochs"][-1], evasive["epochs"][-1]
    print(f"seed {seed}: plain {p}\nevasive {e}")
    assert p["expert_selection_rate"] > 0.2  # plain poisoning routes the white square to the experts
    assert e["expert_selection_rate"] < p["expert_selection_rate"] - 0.2
    assert e["image_reach_rate"] < p["image_reach_rate"]
    assert e["mean_best_rank"] > p["mean_best_rank"]
    assert e["defense_top_m_rate"] <= p["defense_top_m_rate"]
    for key in ("ba", "asr"):
        assert 0.0 <= e[key] <= 100.0
