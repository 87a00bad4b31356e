"""Tests of pmoe_backdoor.defenses.merging: WAG, the 17 MSD slots, the fitness, the search, candidates and selection."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from pmoe_backdoor.attacks.poison import asr_set, make_poison
from pmoe_backdoor.attacks.triggers import make_trigger
from pmoe_backdoor.data.datasets import make_synthetic
from pmoe_backdoor.defenses.merging import fitness as fit_mod
from pmoe_backdoor.defenses.merging import search, slots
from pmoe_backdoor.defenses.merging.finetune import finetune_config, finetune_copy
from pmoe_backdoor.defenses.merging.merge import candidate_assignments, merge_by_strategy, wag_merge
from pmoe_backdoor.defenses.merging.selection import InversionConfig, holdout_split, select_candidate, suspect_class
from pmoe_backdoor.evaluate import evaluate
from pmoe_backdoor.models.architectures import build_model

pytestmark = pytest.mark.usefixtures("one_thread")

S = slots.SLOT_INDEX
OPTIMUM_N2 = (0, 0, 1, 1, 1, 0, 0, 1, 0, 1, 0, 1, 1, 0, 1, 0, 0)  # the exhaustive search's answer (documented)


def _pmoe(seed: int, widen: int = 1, classes: int = 4) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model("pmoe", classes, widen_factor=widen)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():  # distinct BN statistics and biases, so every tensor differs between seeds
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                t.add_(torch.randn(t.shape, generator=g) * 0.1)
            else:
                t.fill_(seed + 3)
    return model


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


# slots and the table

def test_table_has_17_slots_and_consistent_pairs():
    assert slots.NUM_SLOTS == 17
    assert slots.SLOT_NAMES[:8] == ("stem", "g1.conv1", "g1.conv2", "g1.shortcut", "g2.conv1", "g2.conv2",
                                    "g2.shortcut", "pre")
    assert slots.SLOT_NAMES[-1] == "head"
    assert (len(slots.SIBLING_PAIRS), len(slots.CONSECUTIVE_PAIRS), len(slots.RESIDUAL_PAIRS)) == (13, 20, 5)
    pairs = [frozenset(p[:2]) for p in slots.SIBLING_PAIRS + slots.CONSECUTIVE_PAIRS + slots.RESIDUAL_PAIRS]
    assert len(set(pairs)) == len(pairs)  # no pair is counted by two terms
    for a, b, d in slots.RESIDUAL_PAIRS:
        assert d == slots.SLOT_STAGES[S[b]] - slots.SLOT_STAGES[S[a]] >= 2


@pytest.mark.parametrize("widen", [1, 2])
def test_slots_cover_the_state_exactly_once(widen):
    model = _pmoe(0, widen)
    state = model.state_dict()
    count = {k: torch.zeros(v.shape[:1] if v.dim() else (), dtype=torch.long) for k, v in state.items()}
    per_slot = [0] * slots.NUM_SLOTS
    for part in slots.slot_parts(model):
        if part.rows is None:
            count[part.key] += 1
        else:
            count[part.key][part.rows] += 1
        per_slot[part.slot] += 1
    assert all(bool((c == 1).all()) for c in count.values())
    empty = [slots.SLOT_NAMES[i] for i, n in enumerate(per_slot) if n == 0]
    assert empty == (["g1.shortcut"] if widen == 1 else [])  # 16 -> 16 at stride 1: an identity shortcut
    # the fused layers are split by expert: 4 router rows, 4 BN and 4 conv slices
    e3 = slots.slot_tensors(model, "expert3")
    c_in, c_out = model.moe.in_channels, model.moe.expert_channels
    assert e3[f"moe.expert_bn.running_var[{2 * c_in}:{3 * c_in}]"].shape == (c_in,)
    assert e3[f"moe.expert_conv.weight[{2 * c_out}:{3 * c_out}]"].shape == (c_out, c_in, 1, 1)
    assert list(slots.slot_tensors(model, "router2")) == ["moe.router.weight[1:2]"]
    with pytest.raises(TypeError):
        slots.slot_parts(build_model("wrn", 4, widen_factor=1))
    with pytest.raises(ValueError, match="4 experts"):
        slots.slot_parts(build_model("pmoe", 4, widen_factor=1, num_experts=2))


# WAG and merging by a strategy

def test_wag_of_identical_models_is_that_model():
    model = _pmoe(0)
    for n in (2, 3, 5):
        assert _same_state(wag_merge([copy.deepcopy(model) for _ in range(n)]), model)


def test_wag_averages_floats_and_takes_the_max_count():
    a, b, c = _pmoe(0), _pmoe(1), _pmoe(2)
    merged = wag_merge([a, b, c]).state_dict()
    for key, value in merged.items():
        stack = torch.stack([m.state_dict()[key] for m in (a, b, c)])
        if value.is_floating_point():
            torch.testing.assert_close(value, stack.mean(0), rtol=0, atol=1e-6)
        else:
            assert value == 5  # num_batches_tracked: max of 3, 4, 5
    with pytest.raises(ValueError, match="homologous"):
        wag_merge([a, _pmoe(0, widen=2)])


def test_merging_identical_models_returns_that_model_for_every_strategy():
    model = _pmoe(0)
    twins = [model, copy.deepcopy(model)]
    rng = np.random.default_rng(0)
    strategies = [OPTIMUM_N2, (0,) * 17, (1,) * 17, *rng.integers(0, 2, size=(20, 17)).tolist()]
    for strategy in strategies:
        assert _same_state(merge_by_strategy(twins, strategy), model)


@pytest.mark.parametrize("strategy", [OPTIMUM_N2, (1, 0) * 8 + (1,)])
def test_merged_slots_hold_exactly_the_assigned_sources(strategy):
    models = [_pmoe(0), _pmoe(1)]
    merged = merge_by_strategy(models, strategy)
    for slot, src in enumerate(strategy):
        got, want = slots.slot_tensors(merged, slot), slots.slot_tensors(models[src], slot)
        other = slots.slot_tensors(models[1 - src], slot)
        assert list(got) == list(want)
        for name in got:
            assert torch.equal(got[name], want[name]), (slots.SLOT_NAMES[slot], name)
            assert not torch.equal(got[name], other[name]), (slots.SLOT_NAMES[slot], name)
    # the fused layers, read independently of the slot map
    for e in range(4):
        src = models[strategy[S[f"expert{e + 1}"]]]
        rows = merged.moe.expert_slice(e)
        assert torch.equal(merged.moe.expert_conv.weight[rows], src.moe.expert_conv.weight[rows])
        chans = slice(e * merged.moe.in_channels, (e + 1) * merged.moe.in_channels)
        assert torch.equal(merged.moe.expert_bn.running_mean[chans], src.moe.expert_bn.running_mean[chans])
        router_src = models[strategy[S[f"router{e + 1}"]]]
        assert torch.equal(merged.moe.router.weight[e], router_src.moe.router.weight[e])
    assert torch.equal(merged.trunk.stem.weight, models[strategy[0]].trunk.stem.weight)
    assert merged(torch.rand(2, 3, 32, 32)).shape == (2, 4)
    assert _same_state(models[0], _pmoe(0))  # the inputs are untouched


# fitness on hand-worked examples (N = 2 unless said)

def _terms(strategy, n=2):
    return {k: float(v[0]) for k, v in fit_mod.fitness_terms(strategy, n).items()}


def test_fitness_all_from_one_model():
    # every pair is same-source: 13 sibling, 20 consecutive pairs, residual 3 x 0.25 + 0.125 + ... = 1.125;
    # balance: stem, pre, head 1 each; conv1, conv2, shortcut |2-1|+|0-1| = 2 each; router, expert 4 each = 17;
    # diversity: stem, pre and head are (0,), the groups (0, 0, 0), the MoE stage its own 8-tuple: 3
    t = _terms((0,) * 17)
    assert t == {"intra": 13, "cons": 20, "res": 1.125, "bal": 17, "div": 3}
    assert fit_mod.fitness((0,) * 17, 2)[0] == -13 - 20 - 1.125 - 17 + 3


def test_fitness_stem_switched():
    # the stem's two consecutive pairs and its three residual pairs (0.25 + 0.25 + 0.125) break; a new (1,) stage
    s = [0] * 17
    s[S["stem"]] = 1
    assert _terms(s) == {"intra": 13, "cons": 18, "res": 0.5, "bal": 17, "div": 4}
    assert fit_mod.fitness(s, 2)[0] == -44.5


def test_fitness_alternating_moe():
    # routers 0 1 0 1, experts 1 0 1 0, the rest 0: intra = the 6 group pairs; cons = 8 trunk pairs + pre with
    # router 1, 3 and expert 2, 4 + expert 2, 4 with head = 14; routers and experts balanced: bal 17 - 8 = 9
    s = [0] * 17
    for e, (r, x) in enumerate(zip((0, 1, 0, 1), (1, 0, 1, 0)), 1):
        s[S[f"router{e}"]], s[S[f"expert{e}"]] = r, x
    assert _terms(s) == {"intra": 6, "cons": 14, "res": 1.125, "bal": 9, "div": 3}
    assert fit_mod.fitness(s, 2)[0] == -27.125


def test_fitness_balance_for_three_models_and_switches():
    # N = 3, all from model 0: singletons |1-1/3| + 2/3 = 4/3 (x3), pairs |2-2/3| + 4/3 = 8/3 (x3),
    # routers and experts |4-4/3| + 8/3 = 16/3 (x2): 4 + 8 + 32/3
    assert _terms((0,) * 17, 3)["bal"] == pytest.approx(4 + 8 + 32 / 3)
    s = np.array(OPTIMUM_N2)
    terms = _terms(s)
    for term in fit_mod.TERMS:  # each term alone, with its sign
        only = {t: (1.0 if t == term else 0.0) for t in fit_mod.TERMS}
        assert fit_mod.fitness(s, 2, only)[0] == fit_mod.SIGNS[term] * terms[term]
    assert fit_mod.fitness(s, 2, {"bal": 0})[0] == fit_mod.fitness(s, 2)[0] + terms["bal"]
    with pytest.raises(ValueError, match="unknown term"):
        fit_mod.fitness(s, 2, {"balance": 1})
    assert fit_mod.fitness(1 - s, 2)[0] == fit_mod.fitness(s, 2)[0]  # relabelling models changes nothing


# search, strategy files, candidates

@pytest.mark.parametrize("coupled", [False, True])
def test_exhaustive_and_evolutionary_search_agree_for_two_models(coupled):
    best = search.exhaustive_search(2, coupled)
    matrix = search.all_strategies(2, coupled)
    assert len(matrix) == 2 ** (13 if coupled else 17)
    assert best.fitness == fit_mod.fitness(matrix, 2).max()
    evolved = search.evolutionary_search(2, coupled, config={"seed": 1})
    assert evolved.fitness == best.fitness
    if coupled:
        assert all(best.assignment[r] == best.assignment[e] for r, e in zip(slots.ROUTERS, slots.EXPERTS))
    else:
        assert best.assignment == OPTIMUM_N2 and best.fitness == -9.75
    assert search.search_strategy(2, coupled).assignment == best.assignment


def test_evolution_for_three_models_is_seeded_and_beats_random():
    a = search.evolutionary_search(3, config={"generations": 50, "seed": 3})
    b = search.evolutionary_search(3, config={"generations": 50, "seed": 3})
    assert a.assignment == b.assignment and set(a.assignment) == {0, 1, 2}
    random = np.random.default_rng(0).integers(0, 3, size=(1000, 17))
    assert a.fitness > fit_mod.fitness(random, 3).max()
    with pytest.raises(ValueError, match="unknown"):
        search.EvolutionConfig.from_dict({"pop": 3})


def test_strategy_json_round_trip(tmp_path):
    strategy = search.evolutionary_search(3, coupled=True, weights={"div": 0.5}, config={"generations": 5})
    path = tmp_path / "strategy.json"
    search.save_strategy(path, strategy)
    loaded = search.load_strategy(path)
    assert (loaded.assignment, loaded.num_models, loaded.coupled, loaded.weights) == \
        (strategy.assignment, 3, True, strategy.weights)
    assert loaded.fitness == strategy.fitness
    data = json.loads(path.read_text())
    assert list(data["assignment"]) == list(slots.SLOT_NAMES)
    data["assignment"] = {"stem": 0}
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="slots"):
        search.load_strategy(path)


def test_candidates_are_role_assignments():
    s = OPTIMUM_N2
    (n01, c01), (n10, c10) = candidate_assignments(s, 2)
    assert (n01, n10) == ("M_01", "M_10") and c01 == s and c10 == tuple(1 - v for v in s)
    assert candidate_assignments(s, 2, roles="all") == candidate_assignments(s, 2)
    strategy = search.evolutionary_search(3, config={"generations": 20})
    cyclic = candidate_assignments(strategy, roles="cyclic")
    every = candidate_assignments(strategy, roles="all")
    assert [n for n, _ in cyclic] == ["M_012", "M_120", "M_201"] and len(every) == 6
    assert len({c for _, c in every}) == 6
    shifted = dict(cyclic)["M_120"]
    assert shifted == tuple((v + 1) % 3 for v in strategy.assignment)
    assert len(set(fit_mod.fitness([c for _, c in every], 3))) == 1


# selection and fine-tuning

def test_holdout_split():
    y = np.repeat(np.arange(3), [60, 70, 55])
    held, rest = holdout_split(y, 50, seed=1)
    assert np.bincount(y[held]).tolist() == [50, 50, 50]
    assert len(np.intersect1d(held, rest)) == 0 and len(held) + len(rest) == len(y)
    assert np.array_equal(held, holdout_split(y, 50, seed=1)[0])
    assert not np.array_equal(held, holdout_split(y, 50, seed=2)[0])
    with pytest.raises(ValueError, match="class 2"):
        holdout_split(y, 56)


def test_suspect_class_finds_the_backdoor_target():
    """A blend trigger (seeded natural image, alpha 0.3) at 20 %: the inversion from noise reaches the target
    through the trigger. A square patch is not recovered by the inversion."""
    cfg = finetune_config()
    assert (cfg.lr, cfg.epochs, cfg.batch_size) == (0.01, 5, 128)
    k, target = 4, 2
    ds = make_synthetic(num_classes=k, n_train=800, n_test=80, seed=2)
    x, y = torch.from_numpy(ds.x_train), torch.from_numpy(ds.y_train)
    trigger = make_trigger("blend", {"pattern": "natural", "alpha": 0.3})
    xp, yp = make_poison(x, ds.y_train, trigger, 20, seed=2, target=target).apply(x, y)
    torch.manual_seed(2)
    ancestor = build_model("pmoe", k, widen_factor=1, bn_momentum=0.1)
    before = copy.deepcopy(ancestor)
    victim, _ = finetune_copy(ancestor, xp, yp, {"epochs": 5, "batch_size": 64, "lr": 0.05, "momentum": 0.9,
                                                 "recalibrate_bn": True, "progress_seconds": 0},
                              device=torch.device("cpu"), log=None)
    assert _same_state(ancestor, before)
    xt, yt = torch.from_numpy(ds.x_test), torch.from_numpy(ds.y_test)
    result = evaluate(victim, xt, yt, asr_set(xt, yt, trigger, target)[0], target, k, device=torch.device("cpu"))
    assert result["ba"] > 90 and result["asr"] > 90
    held, _ = holdout_split(ds.y_test, 10, seed=0)
    found = suspect_class([victim], xt[held], yt[held], k, InversionConfig(seed=2))
    assert found["suspect"] == target, found["scores"]


def test_select_candidate_record():
    victims = [_pmoe(0).eval(), _pmoe(1).eval()]
    wag = wag_merge(victims)
    candidates = {name: merge_by_strategy(victims, c) for name, c in candidate_assignments(OPTIMUM_N2, 2)}
    x = torch.randint(0, 256, (12, 32, 32, 3), dtype=torch.uint8)
    y = torch.arange(12) % 4
    record = select_candidate(victims, wag, candidates, x, y, 4, {"steps": 3})
    assert record["chosen"] in ("M_01", "M_10") and 0 <= record["suspect_class"] < 4
    assert len(record["class_scores"]) == 4 and record["models"] == ["victim0", "victim1", "wag"]
    best = max(record["candidate_scores"], key=record["candidate_scores"].get)
    assert record["chosen"] == best
    json.dumps(record)



def test_fine_pruning_a_merged_model_keeps_masked_channels_at_zero_and_the_model_untouched():
    from pmoe_backdoor.defenses.merging.defend import Scorer, at_precisions, check_defense_config, fine_prune_merged

    model = _pmoe(0)
    before = copy.deepcopy(model.state_dict())
    x = torch.randint(0, 256, (24, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    y = torch.arange(24) % 4
    score = Scorer(x, y, {}, 0, 4, 32, torch.device("cpu"))
    seen = []  # the expert conv weights at each scoring: after pruning, then after fine-tuning

    def spy(m):
        seen.append(m.moe.expert_conv.weight.detach().clone())
        return score(m)

    fp = {"epochs": 1, "lr": 0.05, "mask": True}
    rows = fine_prune_merged(model, x, y, [50.0], fp, {"batch_size": 8, "progress_seconds": 0}, 0, spy,
                             torch.device("cpu"), None)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # pruned and tuned a copy
    assert rows[0]["finetune_steps"] == 3 and len(rows[0]["finetune_loss"]) == 1
    assert np.isnan(rows[0]["after_finetuning"]["mean_asr"])  # no trigger: ASR undefined, not 0
    per_expert = model.moe.expert_channels
    zeroed = torch.cat([torch.tensor(c, dtype=torch.long) + e * per_expert
                        for e, c in enumerate(rows[0]["pruned_channels"])])
    assert len(zeroed) == 4 * int(per_expert * 0.5)
    kept = torch.ones(len(seen[1]), dtype=torch.bool)
    kept[zeroed] = False
    assert model.moe.expert_conv.weight[zeroed].abs().sum() > 0
    assert seen[0][zeroed].abs().sum() == 0 and seen[1][zeroed].abs().sum() == 0  # the mask held during tuning
    assert not torch.equal(seen[0][kept], seen[1][kept])  # while the other channels were tuned
    assert set(at_precisions(model, ["fp32", "int4"], None, score)) == {"fp32", "int4"}
    with pytest.raises(ValueError, match=r"fine_pruning: \['mask'\]"):
        check_defense_config(["fp32"], [10.0], {"epochs": 1, "lr": 0.1})
    with pytest.raises(ValueError, match="deployment.precisions"):
        check_defense_config(["fp16"], [], {})


# PreAct-ResNet-18: the control architecture's slot table, merging and search

R = slots.PREACT_RESNET18


def _resnet(seed: int, width: float = 0.125, classes: int = 10) -> nn.Module:
    """A PreAct-ResNet-18 whose every tensor differs between seeds (as _pmoe)."""
    torch.manual_seed(seed)
    model = build_model("preact_resnet18", classes, width=width)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.add_(torch.randn(t.shape, generator=g) * 0.1)
            else:
                t.fill_(seed + 3)
    return model


@pytest.mark.parametrize("width, classes", [(0.125, 10), (0.125, 43), (1.0, 10), (1.0, 43)])
def test_preact_resnet18_slots_cover_the_state_exactly_once(width, classes):
    model = build_model("preact_resnet18", classes, width=width)
    assert slots.table_of(model) is R and R.num_slots == 21
    assert R.names[0] == "stem" and R.names[-1] == "head"
    assert [n for n in R.names if n.endswith(".shortcut")] == ["b3.shortcut", "b5.shortcut", "b7.shortcut"]
    parts = slots.slot_parts(model)
    assert all(p.rows is None for p in parts)  # no fused layers: every slot takes whole tensors
    keys = [p.key for p in parts]
    assert sorted(keys) == sorted(model.state_dict()) and len(set(keys)) == len(keys)  # parameters and buffers
    per_slot = [sum(p.slot == i for p in parts) for i in range(R.num_slots)]
    assert min(per_slot) > 0  # every slot holds tensors at every width
    assert list(slots.slot_tensors(model, "head")) == ["head.fc.weight", "head.fc.bias"]
    assert set(slots.slot_tensors(model, "b3.conv1")) == {
        "blocks.2.bn1.weight", "blocks.2.bn1.bias", "blocks.2.bn1.running_mean", "blocks.2.bn1.running_var",
        "blocks.2.bn1.num_batches_tracked", "blocks.2.conv1.weight"}
    assert list(slots.slot_tensors(model, "b3.shortcut")) == ["blocks.2.shortcut.weight"]


def test_preact_resnet18_table_follows_the_pmoe_rules():
    # the chain derivation, applied to the pMoE trunk (two blocks with a shortcut slot, read by pre-MoE), gives the
    # pMoE table's trunk rows exactly: one rule set for both architectures
    rows, sib, cons, res = slots.residual_chain([("g1", True), ("g2", True)], last="pre")
    trunk = {name for name, _, _ in rows}
    assert [(n, t, s) for n, t, s in rows] == [(n, slots.SLOT_TYPES[S[n]], slots.SLOT_STAGES[S[n]])
                                              for n in slots.SLOT_NAMES if n in trunk]
    assert set(sib) == {p for p in slots.SIBLING_PAIRS if set(p) <= trunk}
    assert set(cons) == {p for p in slots.CONSECUTIVE_PAIRS if set(p) <= trunk}
    assert set(res) == {p for p in slots.RESIDUAL_PAIRS if set(p[:2]) <= trunk}
    # the ResNet table: each pair once, counted by one term, running forward
    assert (len(R.siblings), len(R.consecutive), len(R.residual)) == (14, 15, 60)
    pairs = [frozenset(p[:2]) for p in R.siblings + R.consecutive + R.residual]
    assert len(set(pairs)) == len(pairs)
    stage = dict(zip(R.names, R.stages))
    assert all(a.split(".")[0] == b.split(".")[0] and stage[a] == stage[b] for a, b in R.siblings)
    assert all(stage[b] - stage[a] == 1 for a, b in R.consecutive)
    for a, b, d in R.residual:
        assert d == stage[b] - stage[a] >= 2
    # what reaches the head: b8's conv2 directly, the stem through all eight blocks' shortcuts
    assert ("b8.conv2", "head") in R.consecutive and ("stem", "head", 9) in R.residual
    assert ("stem", "b2.conv1", 2) in R.residual and ("stem", "b2.conv1") not in R.consecutive
    assert R.routers == () and R.experts == ()
    with pytest.raises(ValueError, match="no slot table"):
        slots.slot_table("vgg")


def test_preact_resnet18_all_from_one_model_and_mixed_strategies():
    a, b = _resnet(0), _resnet(1)
    assert _same_state(merge_by_strategy([a, b], (0,) * 21), a)
    assert _same_state(merge_by_strategy([a, b], (1,) * 21), b)
    mixed = search.exhaustive_search(2, architecture="preact_resnet18")
    assert len(set(mixed.assignment)) == 2
    for strategy in (mixed.assignment, (1, 0) * 10 + (1,)):
        merged = merge_by_strategy([a, b], strategy)
        for slot, src in enumerate(strategy):
            got, want = slots.slot_tensors(merged, slot), slots.slot_tensors((a, b)[src], slot)
            other = slots.slot_tensors((a, b)[1 - src], slot)
            assert list(got) == list(want)
            for name in got:
                assert torch.equal(got[name], want[name]), (R.names[slot], name)
                assert not torch.equal(got[name], other[name]), (R.names[slot], name)
        assert merged(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    assert torch.equal(merge_by_strategy([a, b], mixed).blocks[2].shortcut.weight,
                       (a, b)[mixed.assignment[R.index["b3.shortcut"]]].blocks[2].shortcut.weight)
    assert _same_state(a, _resnet(0)) and _same_state(b, _resnet(1))  # the inputs are untouched
    assert _same_state(wag_merge([a, copy.deepcopy(a)]), a)
    # a strategy is written for one table: the pMoE's does not fit a ResNet, and the reverse
    with pytest.raises(ValueError, match="21 slots"):
        merge_by_strategy([a, b], OPTIMUM_N2)
    with pytest.raises(ValueError, match="preact_resnet18 architecture, the models are pmoe"):
        merge_by_strategy([_pmoe(0), _pmoe(1)], mixed)


def test_preact_resnet18_search_strategy_files_and_candidates(tmp_path):
    free = search.exhaustive_search(2, architecture="preact_resnet18")  # 2^21 strategies, scored in chunks
    flips = np.array([free.assignment] * 21) ^ np.eye(21, dtype=np.int64)  # every one-slot change
    sample = np.random.default_rng(0).integers(0, 2, size=(20000, 21))
    assert free.fitness >= fit_mod.fitness(np.concatenate([flips, sample]), 2, architecture=R).max()
    assert free.assignment[0] == 0  # ties go to the lowest index, which gives the stem to model 0
    # without routers coupling changes nothing: the same genes, so the same strategy
    assert search.gene_of_slot(True, R).tolist() == list(range(21))
    three = search.search_strategy(3, evolution={"generations": 30, "seed": 1}, architecture="preact_resnet18")
    random = np.random.default_rng(0).integers(0, 3, size=(1000, 21))
    assert three.fitness > fit_mod.fitness(random, 3, architecture=R).max()
    path = tmp_path / "strategy.json"
    search.save_strategy(path, three)
    data = json.loads(path.read_text())
    assert data["architecture"] == "preact_resnet18" and list(data["assignment"]) == list(R.names)
    loaded = search.load_strategy(path)
    assert (loaded.assignment, loaded.architecture, loaded.fitness) == (three.assignment, "preact_resnet18",
                                                                         three.fitness)
    names = [n for n, _ in candidate_assignments(loaded)]
    assert names == ["M_012", "M_120", "M_201"]
    data["architecture"] = "pmoe"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="differ from the pmoe architecture"):
        search.load_strategy(path)


def test_fine_pruning_a_merged_resnet_is_refused_by_name():
    from pmoe_backdoor.defenses.merging.defend import Scorer, at_precisions, fine_prune_merged

    model = _resnet(0).eval()
    x = torch.randint(0, 256, (8, 32, 32, 3), dtype=torch.uint8)
    y = torch.arange(8) % 4
    score = Scorer(x, y, {}, 0, 10, 8, torch.device("cpu"))
    assert fine_prune_merged(model, x, y, [], {}, {}, 0, score) == []  # no rates: nothing to do
    with pytest.raises(ValueError, match=r"fine_pruning.prune_rates \[10.0\].*PreActResNet18"):
        fine_prune_merged(model, x, y, [10.0], {"epochs": 1, "lr": 0.1, "mask": True}, {}, 0, score)
    assert set(at_precisions(model, ["fp32", "int8"], x, score)) == {"fp32", "int8"}  # deployment applies


def test_merging_plan_for_a_preact_resnet18():
    """merging.model of arch preact_resnet18: only the free coupling is planned (tied would repeat it), strategies
    of its own architecture, no Fine-Pruning of the merged models; couplings [tied] alone is refused by name."""
    pytest.importorskip("snakemake", reason="the workflow extra is not installed (pip install -e '.[workflow]')")
    from pathlib import Path

    import yaml

    from pmoe_backdoor.config_check import ConfigError, validate_config
    from pmoe_backdoor.plan import Plan
    from pmoe_backdoor.study_checks import check_study

    repo = Path(__file__).resolve().parents[1]

    def load(**merging) -> dict:
        cfg = yaml.safe_load((repo / "config" / "smoke.yaml").read_text())
        cfg["models"]["resnet"] = {"arch": "preact_resnet18", "width": 0.125}
        cfg["merging"].update(model="resnet", **merging)
        validate_config(cfg, repo / "config" / "schema.yaml")
        check_study(cfg)
        return cfg

    plan = Plan(load())
    assert plan.merge["couplings"] == ["free", "tied"] and plan.merging_couplings() == ["free"]
    assert plan.merging_strategies() == [(2, "free"), (3, "free")]
    assert plan.strategy_file(2, "free") == "results/merging/strategies/preact_resnet18/n2_free.json"
    results = plan.merging_results("synth")
    assert len(results) == 3 and all("/resnet/merging/" in r and "/free/" in r for r in results)
    params = plan.defend_merged_params()
    assert params["prune_rates"] == [] and params["fine_pruning"] == {}
    with pytest.raises(ConfigError, match=r"config: merging.couplings \['tied'\] .* 'resnet' \(arch preact_resnet18\) "
                                          r"has no routers: use \[free\]"):
        load(couplings=["tied"])
    # the pMoE keeps both couplings and its Fine-Pruning
    cfg = yaml.safe_load((repo / "config" / "smoke.yaml").read_text())
    validate_config(cfg, repo / "config" / "schema.yaml")
    pmoe = Plan(cfg)
    assert pmoe.merging_couplings() == ["free", "tied"] and pmoe.defend_merged_params()["prune_rates"] == [10, 30]
    assert pmoe.strategy_file(3, "tied") == "results/merging/strategies/pmoe/n3_tied.json"
