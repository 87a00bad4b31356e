"""STRIP, Activation Clustering, Spectral Signatures: hand-worked numbers for their statistics and
thresholds, and each defense on a tiny model trained here with a strong trigger (detected) and on the same model
trained on clean data (not flagged). Neural Cleanse's schedules: hand-worked cost trajectories."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pmoe_backdoor.data.datasets import make_synthetic
from pmoe_backdoor.defenses import schema_defaults
from pmoe_backdoor.defenses.activation_clustering import (
    activation_clustering,
    fast_ica,
    penultimate_features,
    precision_recall,
    silhouette,
    two_means,
)
from pmoe_backdoor.defenses.neural_cleanse import CostSchedule, NCConfig, neural_cleanse
from pmoe_backdoor.defenses.spectral_signatures import removal_count, spectral_scores, spectral_signatures
from pmoe_backdoor.defenses.strip import strip_defense, strip_rates, strip_threshold, superimpose
from pmoe_backdoor.runtime import to_input

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES, POISONED, TRIGGER = 10, 30, 12  # 5 % of 600 images relabelled to class 0; a 12x12 white corner


class TinyNet(nn.Module):
    """Two strided convolutions and a head like the pmoe's (global mean, then ``head.fc``)."""

    def __init__(self, classes: int, pool: str = "mean"):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 16, 3, 2, 1), nn.Conv2d(16, 32, 3, 2, 1)
        self.head = nn.Module()
        self.head.fc = nn.Linear(32, classes)
        self.pool = pool

    def forward(self, x):
        f = F.relu(self.c2(F.relu(self.c1(x))))
        return self.head.fc(f.mean((2, 3)) if self.pool == "mean" else f.amax((2, 3)))


def train_tiny(x: torch.Tensor, y: torch.Tensor, epochs: int, pool: str = "mean") -> TinyNet:
    torch.manual_seed(0)
    model = TinyNet(CLASSES, pool)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), 50):
            b = perm[i:i + 50]
            loss = F.cross_entropy(model(to_input(x[b])), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def add_trigger(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    x[:, -TRIGGER:, -TRIGGER:, :] = 255  # white survives STRIP's saturating add; the dimmed data never reach it
    return x


@pytest.fixture(scope="module")
def models():
    """A backdoored and a clean TinyNet on dimmed synthetic data (~8 s on one core), with their training sets."""
    ds = make_synthetic(CLASSES, 600, 300, seed=0)
    dim = lambda a: torch.from_numpy((a * 0.4).astype(np.uint8))  # noqa: E731
    x, y, x_test, y_test = dim(ds.x_train), torch.from_numpy(ds.y_train), dim(ds.x_test), torch.from_numpy(ds.y_test)
    poisoned = np.sort(np.random.default_rng(0).choice(len(y), POISONED, replace=False))
    out = {"x_test": x_test, "y_test": y_test, "poisoned": poisoned}
    for name in ("backdoored", "clean"):
        xt, yt = x.clone(), y.clone()
        if name == "backdoored":
            xt[poisoned], yt[poisoned] = add_trigger(xt[poisoned]), 0
        out[name] = (train_tiny(xt, yt, 25), xt, yt)
    return out


def test_premise_the_backdoor_works(models):
    model, _, _ = models["backdoored"]
    x, y = models["x_test"], models["y_test"]
    with torch.no_grad():
        assert (model(to_input(x)).argmax(1) == y).float().mean() > 0.9
        for name, floor, ceil in (("backdoored", 0.95, 1.0), ("clean", 0.0, 0.2)):
            pred = models[name][0](to_input(add_trigger(x[y != 0]))).argmax(1)
            assert floor <= (pred == 0).float().mean() <= ceil


# ----- STRIP -----

def test_superimpose_modes():
    a = torch.tensor([[200, 10]], dtype=torch.uint8)
    b = torch.tensor([[100, 20]], dtype=torch.uint8)
    torch.testing.assert_close(superimpose(a, b, "add"), torch.tensor([[255.0, 30.0]]) / 255)  # saturates
    torch.testing.assert_close(superimpose(a, b, "average"), torch.tensor([[150.0, 15.0]]) / 255)
    with pytest.raises(ValueError, match="superimpose"):
        superimpose(a, b, "blend")


def test_strip_threshold_hand_worked():
    h = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0])
    # linear interpolation: the 10 % quantile of 5 sorted values lies at position 0.4 -> 0.4
    assert strip_threshold(h, 0.10, "empirical") == pytest.approx(0.4)
    # normal fit: mean 2, sample std sqrt(2.5); its 1 % quantile is 2 - 2.3263 * 1.5811 = -1.678
    assert strip_threshold(h, 0.01, "normal") == pytest.approx(2 - 2.326348 * 2.5 ** 0.5, abs=1e-4)
    r = strip_rates(1.5, torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0.5, 1.0, 2.0]))
    assert r == pytest.approx({"frr": 0.25, "far": 1 / 3, "detection": 2 / 3})
    with pytest.raises(ValueError, match="frr"):
        strip_threshold(h, 0.0)


@pytest.mark.parametrize("name, flagged", [("backdoored", True), ("clean", False)])
def test_strip_on_trained_models(models, name, flagged):
    model = models[name][0]
    x, y = models["x_test"], models["y_test"]
    rest = x[100:200]
    # the empirical quantile: this confident model's clean entropies pile up near 0, where the normal fit's 1 %
    # quantile falls below every entropy (test_strip_normal_threshold_is_the_default)
    r = strip_defense(model, x[:100], rest, {"white": add_trigger(rest[y[100:200] != 0])}, overlays=20, frr=0.01,
                      flag_rate=0.5, seed=0, threshold_method="empirical")
    assert r["flagged"] is flagged
    assert r["frr"] <= 0.05  # about the 1 % asked for, on other clean inputs
    if flagged:
        assert r["triggers"]["white"]["entropy_mean"] < r["clean_entropy_mean"] / 3


# ----- Activation Clustering -----

def test_silhouette_and_two_means_hand_worked():
    pts = np.array([[0.0], [1.0], [10.0], [11.0]])
    labels = two_means(pts, seed=0)
    assert labels[0] == labels[1] != labels[2] == labels[3]
    # points 0 and 3: a = 1, b = (10 + 11) / 2 = 10.5 -> 9.5 / 10.5; points 1 and 2: a = 1, b = (9 + 10) / 2 = 9.5
    # -> 8.5 / 9.5; the mean of the four
    assert silhouette(pts, labels) == pytest.approx((9.5 / 10.5 + 8.5 / 9.5) / 2)
    assert silhouette(pts, np.zeros(4, dtype=int)) == 0.0
    assert precision_recall(np.array([1, 2, 3, 4]), np.array([3, 4, 5])) == {"precision": 0.5, "recall": 2 / 3}


@pytest.mark.parametrize("rule", ["exclusionary", "size"])
@pytest.mark.parametrize("name", ["backdoored", "clean"])
def test_activation_clustering_on_trained_models(models, name, rule):
    model, x, y = models[name]
    feats = penultimate_features(model, x)
    assert feats.shape == (len(x), 32)
    truth = models["poisoned"] if name == "backdoored" else np.zeros(0, dtype=np.int64)
    r = activation_clustering(feats, y, truth, dims=10, size_threshold=0.35, silhouette_threshold=0.5, seed=0,
                              rule=rule, reduction="pca")
    if name == "backdoored":
        assert r["flagged_labels"] == [0]
        assert r["labels"][0]["poisoned_in_label"] == POISONED
        if rule == "size":  # the poison is the smaller cluster (30 of 88)
            assert r["poison_precision"] > 0.5 and r["poison_recall"] > 0.5
        else:  # measured: without its clean part the label is the trigger's alone, so both clusters fail
            assert r["poison_recall"] == 1.0 and r["called_poisoned"] == r["labels"][0]["samples"]
    else:
        assert not r["flagged"] and r["flagged_labels"] == []


def planted_features(poison_share: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Penultimate-like features: 6 labels of 200 samples around their own means (16-d, spread 1, means 8 apart);
    label 1 in two natural sub-clusters (its mean +- 2.5 along one axis); label 0 with ``poison_share`` of
    poison: samples of the other labels' means shifted by one trigger vector, tight (spread 0.3)."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 8 / np.sqrt(2 * 16), (6, 16))
    y = np.repeat(np.arange(6), 200)
    f = means[y] + rng.normal(0, 1, (len(y), 16))
    f[y == 1, 0] += np.where(np.arange(200) % 2 == 0, 2.5, -2.5)
    poisoned = np.flatnonzero(y == 0)[: int(poison_share * 200)]
    trigger = np.zeros(16)
    trigger[1] = 12.0
    sources = rng.integers(1, 6, len(poisoned))
    f[poisoned] = means[sources] + trigger + rng.normal(0, 0.3, (len(poisoned), 16))
    return torch.from_numpy(f), torch.from_numpy(y), poisoned


def test_exclusionary_reclassification_flags_a_poison_majority_label_the_size_rule_misses():
    feats, y, poisoned = planted_features(0.6)
    size = activation_clustering(feats, y, poisoned, rule="size", reduction="pca", seed=0)
    assert size["labels"][0]["relative_size"] == pytest.approx(0.4)  # the split is right, the clean part smaller
    assert size["flagged_labels"] == []  # 0.4 > size_threshold 0.35: the size rule misses it
    r = activation_clustering(feats, y, poisoned, rule="exclusionary", reduction="pca", seed=0)
    assert r["flagged_labels"] == [0]  # and not label 1, whose sub-clusters come out as label 1
    assert r["poison_recall"] == 1.0
    sub = r["labels"][1]["reclassification"]
    assert [t["poisonous"] for t in sub] == [False, False] and all(t["own"] > t["other"] for t in sub)
    # both of label 0's clusters fail (without its clean part the label is the far-off poison alone), so the whole
    # label is called; measured the same with 20 % poison
    assert r["poison_precision"] == pytest.approx(0.6)
    assert all(t["poisonous"] for t in r["labels"][0]["reclassification"])
    with pytest.raises(ValueError, match="rule"):
        activation_clustering(feats, y, poisoned, rule="majority")


def test_ica_reduction_runs_and_is_seeded():
    feats, y, poisoned = planted_features(0.2)
    label0 = feats[y == 0].numpy()
    a, b = fast_ica(label0, 10, seed=3), fast_ica(label0, 10, seed=3)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (200, 10)
    np.testing.assert_allclose(a.std(0), 1.0, atol=1e-6)  # unit-variance sources
    np.testing.assert_allclose(np.corrcoef(a.T), np.eye(10), atol=1e-6)  # uncorrelated
    runs = [activation_clustering(feats, y, poisoned, reduction="ica", seed=5) for _ in range(2)]
    assert runs[0]["labels"] == runs[1]["labels"] and runs[0]["reduction"] == "ica"
    assert runs[0]["flagged_labels"] == runs[1]["flagged_labels"]  # same seed, same result (whatever it is: the
    #                                                                 whitened split is what makes ica no default)
    with pytest.raises(ValueError, match="reduction"):
        activation_clustering(feats, y, poisoned, reduction="umap")


def test_schema_defaults_are_the_faithful_rules():
    assert schema_defaults("activation_clustering")["rule"] == "size"
    assert schema_defaults("strip")["threshold"] == "normal" and schema_defaults("strip")["overlays"] == 100
    assert schema_defaults("spectral_signatures")["epsilon"] == 0.1
    assert schema_defaults("neural_cleanse")["budget"] == "fast"


def test_penultimate_features_are_the_input_of_the_last_linear_layer(models):
    model, x, _ = models["clean"]
    feats = penultimate_features(model, x[:7], batch_size=3)
    with torch.no_grad():
        torch.testing.assert_close(model.head.fc(feats), model(to_input(x[:7])))


# ----- Spectral Signatures -----

def test_spectral_signatures_epsilon_from_config_and_random_baseline():
    feats, y, poisoned = planted_features(0.2)
    r = spectral_signatures(feats, y, poisoned, 0.05)
    assert r["epsilon"] == 0.05 and r["removed"] == 6 * removal_count(200, 0.05)  # 15 of each label's 200
    assert r["random_removal_recall"] == pytest.approx(90 / 1200) == r["removed_fraction"]
    assert r["poison_recall"] > r["random_removal_recall"]
    assert "this project's" in r["model_verdict"]


def test_spectral_scores_and_removal_hand_worked():
    feats = np.array([[1.0, 0.0], [-1.0, 0.0], [3.0, 0.0], [-3.0, 0.0]])  # centred already; top direction x
    scores, strength = spectral_scores(feats)
    np.testing.assert_allclose(scores, [1.0, 1.0, 9.0, 9.0])
    assert strength == pytest.approx(20 / 4)  # sigma_1^2 = 1 + 1 + 9 + 9
    assert removal_count(100, 0.1) == 15 and removal_count(10, 0.9) == 10 and removal_count(7, 0.0) == 0


@pytest.mark.parametrize("name", ["backdoored", "clean"])
def test_spectral_signatures_on_trained_models(models, name):
    model, x, y = models[name]
    truth = models["poisoned"] if name == "backdoored" else np.zeros(0, dtype=np.int64)
    eps = len(truth) / int((y == 0).sum())
    r = spectral_signatures(penultimate_features(model, x), y, truth, eps)
    if name == "backdoored":
        assert r["flagged_labels"] == [0] and r["poison_recall"] > 0.8
    else:
        assert not r["flagged"]
    with pytest.raises(ValueError, match="epsilon"):
        spectral_signatures(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long), truth, 1.5)


# ----- Neural Cleanse's two schedules -----

def run_schedule(cfg: NCConfig, asr: list[float], l1: list[float] | None = None) -> list[tuple]:
    s = CostSchedule(cfg)
    out = []
    for i, a in enumerate(asr):
        improved, stop = s.step(a, (l1 or [100.0 - i] * len(asr))[i])
        out.append((round(s.cost, 10), improved, stop))
    return out


def test_original_schedule_hand_worked():
    cfg = NCConfig.from_dict({"schedule": "original", "epochs": 100})
    assert (cfg.patience, cfg.early_stop_patience, cfg.attack_threshold) == (5, 25, 0.99)
    # gtsrb_visualize_example.py's COST_MULTIPLIER 2 and EARLY_STOP_THRESHOLD 1.0 (not visualizer.py's defaults)
    assert (cfg.cost_up, cfg.cost_down, cfg.early_stop_threshold) == (2.0, 2.0 ** 1.5, 1.0)
    costs = [c for c, _, _ in run_schedule(cfg, [1.0] * 14 + [0.5] * 5)]
    # cost 0 until 5 successes in a row, then 1e-3; that epoch counts as the first success at the new cost, so
    # epochs 6-9 make 5 -> x2 after epoch 9, again after 14; 5 failures (15-19) -> / 2^1.5
    assert costs[:4] == [0.0] * 4 and costs[4:8] == [1e-3] * 4
    assert costs[8:13] == [2e-3] * 5 and costs[13] == pytest.approx(4e-3)
    assert costs[18] == pytest.approx(4e-3 / 2 ** 1.5)
    # a success at 0.985 is not one for the original's 0.99 threshold
    assert run_schedule(cfg, [0.985] * 6)[-1][0] == 0.0


def test_original_schedule_early_stop_needs_the_cost_to_move_both_ways():
    cfg = NCConfig.from_dict({"schedule": "original", "patience": 1, "early_stop_patience": 2})
    # constant norm after the first success: no improvement, but the cost only went up -> no stop
    steps = run_schedule(cfg, [1.0] * 6, [50.0] * 6)
    assert not any(stop for _, _, stop in steps) and steps[0][1] is True
    # epoch 1 switches the cost on and (patience 1) moves it up; epochs 2-4 bring no new best (stale 1, 2, 3); the
    # failure of epoch 3 moves the cost down after that epoch's stop check, so the stop comes at epoch 4
    steps = run_schedule(cfg, [1.0, 1.0, 0.0, 1.0], [50.0] * 4)
    assert [stop for _, _, stop in steps] == [False, False, False, True]


def test_fast_schedule_is_the_former_default():
    cfg = NCConfig.from_dict({"early_stop_patience": 3})
    assert cfg.schedule == "fast" and cfg.init_cost == 1e-3 and cfg.patience == 2
    steps = run_schedule(cfg, [1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0], [10.0, 9.95, 9.0, 9.0, 9.0, 9.0, 9.0])
    costs = [c for c, _, _ in steps]
    assert costs == pytest.approx([1e-3, 2e-3, 2e-3, 2e-3 / 2 ** 1.5, 2e-3 / 2 ** 1.5, 4e-3 / 2 ** 1.5,
                                   4e-3 / 2 ** 1.5])
    # 9.95 is not below 0.99 x 10: no new best; no improvement for 3 epochs after the first -> stop after epoch 4
    assert [imp for _, imp, _ in steps][:2] == [True, False]
    assert [stop for _, _, stop in steps][:4] == [False, False, False, True]
    with pytest.raises(ValueError, match="schedule"):
        NCConfig.from_dict({"schedule": "slow"})


# ----- the blindspot table -----

def test_blindspot_table_rates_and_claims(tmp_path):
    import json

    from pmoe_backdoor.reporting.blindspot import blindspot_table

    def write(name, obj):
        (tmp_path / name).write_text(json.dumps(obj))
        return str(tmp_path / name)

    run = lambda attack, seed: {"dataset": "g", "model": "pmoe", "attack": attack, "seed": seed}  # noqa: E731
    # summaries as the generic defense job writes them: the registry name, the decision, the target found or None
    defenses = [write(f"nc_{a}_{s}_{p}.json", {**run(a, s), "defense_name": "neural_cleanse", "precision": p,
                                                "flagged": flag, "target_found": None})
                for a, s, p, flag in [("square-10", 0, "int8_dynamic", False), ("square-10", 1, "int8_dynamic", False),
                                      ("square-10", 0, "int4", True), ("square-10", 1, "int4", False),
                                      ("clean", 0, "int4", True)]]
    deployed = [write(f"dep_{s}.json", [{**run("square-10", s), "precision": p, "ba": 90.0, "asr": asr}
                                        for p, asr in (("int8_dynamic", 99.5), ("int4", 80.0 + s))])
                for s in (0, 1)]
    fine_pruned = [write("fp.json", [{**run("square-10", 0), "fine_pruned": "clean 30 %", "precision": "int4",
                                      "ba": 85.0, "asr": 12.0}])]
    # label-level summaries: flagging some label detects the model; the target column asks whether it was the target
    defenses += [write(f"ss_{a}_{s}.json", {**run(a, s), "defense_name": "spectral_signatures", "precision": "int4",
                                            "target": 0, "flagged_labels": labels, "flagged": bool(labels),
                                            "target_found": None if a == "clean" else 0 in labels,
                                            "poison_recall": 0.6, "random_removal_recall": 0.15})
                 for a, s, labels in [("square-10", 0, [3]), ("square-10", 1, [0, 3]), ("clean", 0, [5])]]
    defenses[3] = write("nc_target.json", {**run("square-10", 1), "defense_name": "neural_cleanse",
                                           "precision": "int4", "flagged": False, "target": 0,
                                           "detected_target": False, "target_found": False})
    # input-level summaries: the share of triggered inputs flagged, of clean ones rejected, of triggers localised
    defenses += [write(f"ra_{s}.json", {**run("square-10", s), "defense_name": "router_ablation", "precision": "int4",
                                        "flagged": True, "target_found": True, "detection": d, "frr": 0.01,
                                        "localisation": loc, "asr_after": 10.0})
                 for s, d, loc in ((0, 0.9, 1.0), (1, 0.7, 0.5))]
    out = [str(tmp_path / f"t.{e}") for e in ("csv", "md", "tex")]
    t = blindspot_table(defenses, deployed, fine_pruned, 20.0, "gtsrb", *out)
    rows = {(r["defense"], r["trigger"], r["precision"]): r for r in t.to_dict("records")}
    ra = rows[("Router ablation", "square", "int4")]
    assert (ra["inputs_detected_mean"], ra["frr_mean"], ra["localised_mean"]) == pytest.approx((80.0, 1.0, 75.0))
    assert np.isnan(rows[("Spectral Signatures", "square", "int4")]["inputs_detected_mean"])  # not input-level
    assert "| 80 | 1.0 | 75 |" in open(out[1]).read()
    ss = rows[("Spectral Signatures", "square", "int4")]
    assert ss["detected_mean"] == 100.0 and ss["target_found_mean"] == 50.0
    assert (ss["poison_recall_mean"], ss["random_removal_recall_mean"]) == (0.6, 0.15)  # in the CSV, not the page
    assert rows[("Spectral Signatures", "clean", "int4")]["detected_mean"] == 100.0
    assert np.isnan(rows[("Spectral Signatures", "clean", "int4")]["target_found_mean"])  # no target on a clean model
    assert rows[("Neural Cleanse", "square", "int4")]["target_found_mean"] == 0.0  # the summaries without it: skipped
    assert np.isnan(rows[("Neural Cleanse", "square", "int8_dynamic")]["target_found_mean"])
    assert "Target label flagged %" in open(out[1]).read()
    nc8 = rows[("Neural Cleanse", "square", "int8_dynamic")]
    assert nc8["models"] == 2 and nc8["detected_mean"] == 0.0 and nc8["asr_mean"] == 99.5
    assert nc8["agrees"] is True  # 0 % detected and ASR above 99 %, as the paper says
    nc4 = rows[("Neural Cleanse", "square", "int4")]
    assert nc4["detected_mean"] == 50.0 and nc4["asr_mean"] == 80.5 and nc4["asr_std"] == pytest.approx(0.5 ** 0.5)
    assert nc4["paper"] == "NC detects (GTSRB)" and nc4["agrees"] is True
    assert rows[("Neural Cleanse", "clean", "int4")]["detected_mean"] == 100.0  # a false positive
    assert rows[("Neural Cleanse", "clean", "int4")]["agrees"] is None
    fp = rows[("Fine-Pruning (clean 30 %)", "square", "int4")]
    assert fp["detected_mean"] == 100.0 and fp["asr_after_mean"] == 12.0 and fp["asr_mean"] == 80.0
    # on CIFAR-10 the paper says NC fails at int4: 50 % detected disagrees
    t = blindspot_table(defenses, deployed, fine_pruned, 20.0, "cifar10", *out)
    assert t[(t.defense == "Neural Cleanse") & (t.precision == "int4") & (t.trigger == "square")].agrees.item() is False
    # a summary that is not a registered defense's is an error naming the file
    bad = write("bad.json", {**run("square-10", 0), "precision": "int4", "flagged": True})
    with pytest.raises(ValueError, match="bad.json: not a defense summary"):
        blindspot_table([bad], deployed, fine_pruned, 20.0, "gtsrb", *out)


# ----- the blindspot figure -----

FIGURE_DEFENSES = ["Neural Cleanse", "STRIP", "Activation Clustering", "Spectral Signatures",
                   "Fine-Pruning (clean 30 %)"]


def _summary(precisions: list[str]) -> pd.DataFrame:
    """Summary rows as blindspot_table writes them, on attacked and clean models (Fine-Pruning is not run on clean
    ones): every defense detects 0 % or 100 %, so that several share each rate, as they often do."""
    rows = [{"dataset": "g", "model": "pmoe", "defense": d, "trigger": t, "rate": 0.0 if t == "clean" else 2.0,
             "precision": p, "models": 2, "detected_mean": 100.0 * (i % 2)}
            for i, d in enumerate(FIGURE_DEFENSES) for t in ("clean", "square") for p in precisions
            if not (t == "clean" and d.startswith("Fine-Pruning"))]
    return pd.DataFrame(rows)


def _defense_x(ax) -> dict[str, list[float]]:
    """Where each defense is drawn along the x axis: its line's points, or the centres of its bars."""
    xs = {line.get_label(): [float(x) for x in line.get_xdata()] for line in ax.lines
          if not line.get_label().startswith("_")}
    xs.update({bars.get_label(): [p.get_x() + p.get_width() / 2 for p in bars.patches] for bars in ax.containers})
    return xs


def test_blindspot_figure_sets_the_defenses_apart_at_a_single_precision():
    import matplotlib.pyplot as plt

    from pmoe_backdoor.reporting.blindspot import draw_blindspot_figure

    fig = draw_blindspot_figure(_summary(["int8"]))
    attacked, clean = fig.axes
    for ax, defenses in ((attacked, FIGURE_DEFENSES), (clean, FIGURE_DEFENSES[:4])):
        xs = _defense_x(ax)
        assert list(xs) == defenses and all(len(x) == 1 for x in xs.values())
        centres = sorted(x[0] for x in xs.values())
        widths = [p.get_width() for p in ax.patches]
        assert min(np.diff(centres)) >= max(widths) > 0  # distinct x positions, no bar over another
        ticks = dict(zip([t.get_text() for t in ax.get_xticklabels()], ax.get_xticks()))
        assert all(xs[d][0] == pytest.approx(ticks[d]) for d in defenses)  # each bar named by its tick
    plt.close(fig)

    fig = draw_blindspot_figure(_summary(["fp32", "int8", "int4"]))  # several precisions: a line per defense
    assert all(x == [0.0, 1.0, 2.0] for x in _defense_x(fig.axes[0]).values())
    plt.close(fig)


def test_neural_cleanse_on_a_trained_backdoor():
    """A small trigger (a 4x4 white corner, 16 pixels) on tinted classes, max-pooled TinyNets (~4 s to train both).
    Measured: the target's reversed mask is the smallest (L1 ~11 against 25-80 for the other classes), but with the
    natural norms that spread, its anomaly index is ~1.5, below the flagging threshold of 2: the test checks the
    ranking on the backdoored model and that the clean one is not flagged."""
    rng = np.random.default_rng(0)
    tints = rng.uniform(20, 100, (CLASSES, 3))

    def draw(n):
        y = np.arange(n) % CLASSES
        rng.shuffle(y)
        x = tints[y][:, None, None, :] + rng.normal(0, 20, (n, 32, 32, 3))
        return torch.from_numpy(np.clip(np.rint(x), 0, 255).astype(np.uint8)), torch.from_numpy(y)

    (x, y), (x_test, _) = draw(600), draw(128)
    poisoned = torch.from_numpy(rng.choice(600, 30, replace=False))
    xp, yp = x.clone(), y.clone()
    xp[poisoned, -4:, -4:, :], yp[poisoned] = 255, 0
    cfg = NCConfig.from_dict({"epochs": 40, "batch_size": 32})
    cpu = torch.device("cpu")
    backdoored = train_tiny(xp, yp, 20, pool="max")
    triggered = x_test.clone()
    triggered[:, -4:, -4:, :] = 255
    with torch.no_grad():
        assert (backdoored(to_input(triggered)).argmax(1) == 0).float().mean() > 0.9  # premise: the backdoor works
    summary, _ = neural_cleanse(backdoored, x_test, list(range(CLASSES)), cfg, seed=0, device=cpu)
    norms = np.array([c["l1"] for c in summary["classes"]])
    assert norms.argmin() == 0 and norms[0] < 0.5 * np.median(norms)
    summary, _ = neural_cleanse(train_tiny(x, y, 20, pool="max"), x_test, list(range(CLASSES)), cfg, seed=0,
                                device=cpu)
    assert summary["flagged"] is False
