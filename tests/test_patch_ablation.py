"""Router- and saliency-guided patch ablation (defenses/router_ablation.py, saliency_ablation.py and their shared
patch_ablation.py): the occlusion, threshold and verdict by hand; the rankings on every architecture; the cost in
forward passes; and the test on small pMoEs trained here with a white square (two seeds, detected and localised) and
on one trained on clean data (about the FRR on clean inputs)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from pmoe_backdoor.attacks.triggers import make_trigger
from pmoe_backdoor.data.datasets import make_synthetic
from pmoe_backdoor.defenses import DEFENSES, DefenseContext, schema_defaults
from pmoe_backdoor.defenses.localisation_maps import first_maps
from pmoe_backdoor.defenses.occlusion import fill_images, occlude, occlusion_masks, position_masks
from pmoe_backdoor.defenses.patch_ablation import (
    AblationConfig,
    TriggeredInputs,
    ablation_scores,
    ablation_threshold,
    model_verdict,
    patch_ablation_defense,
    stream_flags,
)
from pmoe_backdoor.defenses.router_ablation import router_ranker
from pmoe_backdoor.defenses.saliency_ablation import gradcam_ranker, to_grid
from pmoe_backdoor.models.architectures import build_model
from pmoe_backdoor.models.routing import trigger_positions
from pmoe_backdoor.runtime import to_input

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
CLASSES, TARGET = 10, 0
# a white 5x5 square over grid rows 2-3 and columns 4-5: 4 of the 64 positions (a random top position hits it
# 1 time in 16)
TRIGGER = {"size": 5, "value": 255, "row": 10, "col": 18}
RANKERS = {"router": router_ranker("max"), "saliency": gradcam_ranker}


# ----- occlusion, threshold, verdict -----

def test_positions_tile_the_image_row_major():
    masks = position_masks()
    assert masks.shape == (64, 32, 32) and masks.sum(dim=(1, 2)).eq(16).all() and masks.sum(0).eq(1).all()
    rows, cols = torch.nonzero(masks[27], as_tuple=True)  # (r, c) = (3, 3): pixels 12..15 both ways
    assert set(rows.tolist()) == set(cols.tolist()) == {12, 13, 14, 15}


def test_dilated_masks_cover_the_neighbourhood_cut_at_the_border():
    plain, dilated = position_masks(), position_masks(dilate=1)
    # position 9 = (1, 1): the 3x3 block of patches at rows/cols 0-2, pixels 0..11 both ways
    assert torch.equal(dilated[9], plain[[0, 1, 2, 8, 9, 10, 16, 17, 18]].any(0))
    assert dilated[9].sum() == 9 * 16 and dilated[0].sum() == 4 * 16 and dilated[63].sum() == 4 * 16
    assert dilated[27].sum() == 9 * 16 and torch.equal(position_masks(dilate=2)[0], plain[[0, 1, 2, 8, 9, 10, 16, 17,
                                                                                             18]].any(0))
    assert torch.equal(occlusion_masks(torch.tensor([[9]]), dilate=1)[0, 0], dilated[9])


def test_occlusion_changes_only_the_chosen_patches():
    gen = torch.Generator().manual_seed(0)
    x, fill = torch.rand(2, 3, 32, 32, generator=gen), torch.rand(2, 3, 32, 32, generator=gen)
    top = torch.tensor([[0, 27, 63], [9, 10, 40]])
    out = occlude(x, occlusion_masks(top), fill)
    assert out.shape == (2, 4, 3, 32, 32)
    for i in range(2):
        for v in range(4):
            chosen = top[i].tolist() if v == 3 else [int(top[i, v])]
            inside = position_masks()[chosen].any(0)
            changed = (out[i, v] != x[i]).any(0)
            assert torch.equal(out[i, v][:, ~inside], x[i][:, ~inside])  # every other pixel identical
            assert torch.equal(out[i, v][:, inside], fill[i][:, inside])
            assert changed.sum() == 16 * len(chosen)  # random images differ from their fill everywhere
    # a mean colour broadcasts over every input
    pool = torch.randint(0, 256, (5, 32, 32, 3), dtype=torch.uint8, generator=gen)
    mean = fill_images("mean", pool, 2, gen)
    torch.testing.assert_close(mean.flatten(), pool.float().mean(dim=(0, 1, 2)) / 255)
    assert torch.equal(occlude(x, occlusion_masks(top), mean)[0, 0, :, 0, 0], mean.flatten())


def test_clean_patch_fill_never_draws_the_inputs_own_image():
    pool = torch.arange(4, dtype=torch.uint8).view(4, 1, 1, 1).expand(4, 32, 32, 3).contiguous()
    for seed in range(20):
        drawn = fill_images("clean_patch", pool, 4, torch.Generator().manual_seed(seed), exclude_self=True)
        assert (drawn[:, 0, 0, 0] * 255).round().ne(torch.arange(4.0)).all()  # image i never fills input i
    with pytest.raises(ValueError, match="fill"):
        fill_images("noise", pool, 4, torch.Generator())


def test_threshold_verdict_and_stream_hand_worked():
    # the 1 - frr quantile of the held-out scores, linear interpolation: 0..4 at 75 % is 3, at 90 % 3.6
    assert ablation_threshold(torch.arange(5.0), 0.25) == pytest.approx(3.0)
    assert ablation_threshold(torch.arange(5.0), 0.10) == pytest.approx(3.6)
    with pytest.raises(ValueError, match="frr"):
        ablation_threshold(torch.arange(5.0), 0.0)
    v = model_verdict(torch.tensor([0, 0, 0, 1, 2]), share=0.5, min_flags=5)
    assert v == {"stream_flags": 5, "suspect": 0, "suspect_share": 0.6, "flagged": True}
    assert not model_verdict(torch.tensor([0, 0, 0, 1, 2]), share=0.5, min_flags=6)["flagged"]
    assert not model_verdict(torch.tensor([0, 0, 1, 1, 2, 3]), share=0.5, min_flags=5)["flagged"]  # 1/3 each
    assert model_verdict(torch.tensor([], dtype=torch.long), 0.5, 5)["suspect"] is None
    # a stream of 10 clean inputs, 2 of them (share 0.2) replaced by triggered copies, every triggered one flagged
    clean_flags = torch.zeros(10, dtype=torch.bool)
    clean_flags[9] = True
    labels, n = stream_flags(clean_flags, torch.full((10,), 7), torch.ones(4, dtype=torch.bool), torch.zeros(4,
                             dtype=torch.long), torch.tensor([1, 3, 5, 7]), 0.2, seed=0)
    assert n == 2 and sorted(labels.tolist()) == [0, 0, 7]


# ----- rankings and cost -----

@pytest.mark.parametrize("arch, config, grid", [("vgg", {"depth": 11, "width": 0.125}, 2),
                                                ("preact_resnet18", {"width": 0.125}, 4),
                                                ("pmoe", {"widen_factor": 1}, 8)])
def test_gradcam_ranks_the_64_positions_on_every_architecture(arch, config, grid):
    torch.manual_seed(0)
    model = build_model(arch, CLASSES, **config).eval()
    x = torch.rand(3, 3, 32, 32)
    logits, scores = gradcam_ranker(model, x)
    with torch.no_grad():
        torch.testing.assert_close(logits, model(x))
    assert scores.shape == (3, 64) and torch.isfinite(scores).all() and (scores >= 0).all()
    assert all(p.grad is None for p in model.parameters())  # the gradient was taken for the map only
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())  # hooks removed
    # the map it read: the head's input (the pMoE's experts, ResNet's last block) or VGG's last convolution
    seen = []

    def record(module, args, out):
        seen.append((args[0] if arch != "vgg" else out).shape[-2:])

    last = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    handle = (model.head if arch != "vgg" else last).register_forward_hook(record)
    model(x)
    handle.remove()
    assert seen == [(grid, grid)]


def test_to_grid_resizes_coarser_and_finer_maps():
    assert torch.equal(to_grid(torch.ones(1, 1, 2, 2)), torch.ones(1, 64))  # bilinear keeps a constant map
    fine = torch.arange(256.0).view(1, 1, 16, 16)
    torch.testing.assert_close(to_grid(fine), F.avg_pool2d(fine, 2).flatten(1))
    assert torch.equal(to_grid(fine[..., :8, :8]), fine[..., :8, :8].flatten(1))


def test_router_ranking_is_the_routers_softmax_combined_over_experts():
    torch.manual_seed(0)
    model = build_model("pmoe", CLASSES, widen_factor=1).eval()
    with torch.no_grad():  # routers initialised at 1e-4 rank almost uniformly: give them something to rank
        model.moe.router.weight.normal_()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        probs = model.moe.routing_probs(model.features(x))
        expected_logits = model(x)
    assert probs.shape == (2, 4, 64)
    for combine, expected in (("max", probs.amax(1)), ("sum", probs.sum(1))):
        logits, scores = router_ranker(combine)(model, x)
        torch.testing.assert_close(scores, expected)
        torch.testing.assert_close(logits, expected_logits)
    with pytest.raises(ValueError, match="combine"):
        router_ranker("mean")


@pytest.mark.parametrize("ranking", sorted(RANKERS))
def test_forward_passes_per_input_are_one_plus_m_plus_one(ranking):
    torch.manual_seed(0)
    model = build_model("pmoe", CLASSES, widen_factor=1).eval()
    seen = []
    model.head.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))  # every pass ends in the head
    x = torch.randint(0, 256, (7, 32, 32, 3), dtype=torch.uint8)
    fill = fill_images("mean", x, len(x), torch.Generator())
    s = ablation_scores(model, x, RANKERS[ranking], fill, top_m=3, batch_size=12)
    assert sum(seen) == len(x) * (1 + 3 + 1)
    assert s.score.shape == (7,) and ((s.score >= 0) & (s.score <= 1)).all() and s.suspects.shape == (7, 3)
    # the suspects are the ranking's top 3, best first
    _, scores = RANKERS[ranking](model, to_input(x, channels_last=False))
    assert torch.equal(s.suspects, scores.topk(3, dim=1).indices)


# ----- on trained models -----

def _train(x: torch.Tensor, y: torch.Tensor, seed: int, steps: int = 150) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model("pmoe", CLASSES, widen_factor=1, bn_momentum=0.1)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        b = torch.randint(len(y), (64,), generator=gen)
        loss = F.cross_entropy(model(to_input(x[b])), y[b])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def trained():
    """Widen-1 pMoEs on 600 synthetic images: backdoored (10 % poisoned with the white square, target 0) at seeds
    0 and 1, and a clean one at seed 0; 150 Adam steps of 64 each (~10 s apiece on one core)."""
    trigger = make_trigger("square", TRIGGER)
    out = {"trigger": trigger}
    for name, seed, poisoned in (("backdoored-0", 0, True), ("backdoored-1", 1, True), ("clean-0", 0, False)):
        ds = make_synthetic(CLASSES, 600, 400, seed=seed)
        x, y = torch.from_numpy(ds.x_train), torch.from_numpy(ds.y_train)
        if poisoned:
            idx = torch.from_numpy(np.random.default_rng(seed).choice(len(y), 60, replace=False))
            x, y = x.clone(), y.clone()
            x[idx], y[idx] = trigger.apply(x[idx]), TARGET
        out[name] = (_train(x, y, seed), ds)
    return out


def _defend(trained, name: str, ranking: str) -> dict:
    model, ds = trained[name]
    x, y = torch.from_numpy(ds.x_test), torch.from_numpy(ds.y_test)
    test, y_test = x[200:], y[200:]
    source = torch.nonzero(y_test != TARGET).flatten()
    trig = trained["trigger"]
    triggered = {"white": TriggeredInputs(trig.apply(test[source]), source, trigger_positions(trig))}
    return patch_ablation_defense(model, RANKERS[ranking], x[:200], test, y_test, triggered, TARGET,
                                  AblationConfig(), seed=0)


def test_premise_the_backdoor_works(trained):
    trig = trained["trigger"]
    for name, asr_range in (("backdoored-0", (0.95, 1.0)), ("backdoored-1", (0.95, 1.0)), ("clean-0", (0.0, 0.2))):
        model, ds = trained[name]
        x, y = torch.from_numpy(ds.x_test), torch.from_numpy(ds.y_test)
        with torch.no_grad():
            assert (model(to_input(x)).argmax(1) == y).float().mean() > 0.9, name
            asr = (model(to_input(trig.apply(x[y != TARGET]))).argmax(1) == TARGET).float().mean()
        assert asr_range[0] <= asr <= asr_range[1], (name, float(asr))


@pytest.mark.parametrize("ranking", sorted(RANKERS))
@pytest.mark.parametrize("name", ["backdoored-0", "backdoored-1"])
def test_triggered_inputs_are_localised_detected_and_purified(trained, name, ranking):
    r = _defend(trained, name, ranking)
    white = r["triggers"]["white"]
    # the top-ranked patch lies on the trigger in most triggered inputs (chance: 4 of 64 positions)
    assert r["localisation"] > 0.5, r
    # at 1 % FRR on held-out clean inputs: far above the clean inputs' false rejections (chance)
    assert r["detection"] > 0.4 and r["frr"] <= 0.03, r
    assert white["purified_asr"] < white["asr"] - 40 and r["purified_ba"] >= r["ba"] - 2, r
    assert r["flagged"] and r["target_found"] and white["suspect"] == TARGET, r
    assert r["forward_passes_per_input"] == 1 + 4 + 1


@pytest.mark.parametrize("name", ["backdoored-0", "backdoored-1"])
def test_dilated_occlusion_reaches_a_trigger_next_to_the_ranked_patch(trained, name):
    """The router-evasive attacker's routers pick the patches beside the trigger, not the trigger's own: with a
    ranking that points one grid step left of the trigger, occluding the ranked patch alone leaves the backdoor,
    occluding its neighbourhood removes it (dilate 2: this trigger spans 2x2 patches, which no 3x3 block around a
    patch outside it covers)."""
    model, ds = trained[name]
    x, y = torch.from_numpy(ds.x_test), torch.from_numpy(ds.y_test)
    test, y_test = x[200:], y[200:]
    source = torch.nonzero(y_test != TARGET).flatten()
    trig = trained["trigger"]
    positions = trigger_positions(trig)
    beside = min(positions) - 1  # left of the trigger's top-left patch, outside it
    assert beside not in positions and beside // 8 == min(positions) // 8

    def beside_ranker(m, xb):
        scores = torch.zeros(len(xb), 64)
        scores[:, beside] = 1.0
        with torch.no_grad():
            return m(xb), scores

    triggered = {"white": TriggeredInputs(trig.apply(test[source]), source, positions)}
    results = {dilate: patch_ablation_defense(model, beside_ranker, x[:200], test, y_test, triggered, TARGET,
                                              AblationConfig(top_m=1, dilate=dilate), seed=0)
               for dilate in (0, 2)}
    plain, dilated = results[0]["triggers"]["white"], results[2]["triggers"]["white"]
    assert plain["localisation"] == dilated["localisation"] == 0.0  # the ranked patch is never the trigger's
    # purification fills the neighbourhood of flagged inputs only: the ASR falls by what detection reaches
    assert dilated["purified_asr"] < plain["purified_asr"] - 30 and plain["purified_asr"] > 95, (plain, dilated)
    assert results[2]["detection"] > results[0]["detection"] + 0.3 and results[2]["frr"] <= 0.05, results


@pytest.mark.parametrize("ranking", sorted(RANKERS))
def test_on_a_clean_model_it_rejects_about_the_frr(trained, ranking):
    r = _defend(trained, "clean-0", ranking)
    assert r["frr"] <= 0.05, r  # 1 % asked on the held-out inputs; 200 other clean inputs here
    assert r["triggers"]["white"]["detection"] < 0.2 and not r["target_found"], r


def _context(tmp_path: Path, model, ds, name: str, attack: str = "square-10") -> DefenseContext:
    from pmoe_backdoor.jobs.common import JobData, RunId

    trigger_file = tmp_path / "white.safetensors"
    make_trigger("square", TRIGGER).save(trigger_file)
    tensors = {k: torch.from_numpy(getattr(ds, k)) for k in ("x_train", "y_train", "x_test", "y_test")}
    job = JobData(ds, **tensors, device=torch.device("cpu"))
    config = {**schema_defaults(name), "holdout": 200, "test_images": 200}
    return DefenseContext(job, RunId("synth", "pmoe", attack, 0), "fp32", TARGET, config, model, lambda m: m,
                          lambda: model, {"white": str(trigger_file)})


def test_the_registered_defenses_run_on_a_deployed_model(trained, tmp_path):
    model, ds = trained["backdoored-1"]
    for name in ("router_ablation", "saliency_ablation"):
        result = DEFENSES[name].load().run(_context(tmp_path, model, ds, name))
        d = result.details
        assert result.flagged and result.target_found and d["applicable"], d
        assert d["asr_after"] == d["purified_asr"] < 50 and d["holdout"] == 200 and d["test_images"] == 200
        assert d["forward_passes_per_input"] == 6 and 0 < d["detection"] <= 1 and d["localisation"] > 0.5
        json.dumps(d)  # the job writes it as the summary
        assert result.artifacts["images"].shape == (4, 32, 32, 3) and result.artifacts_metadata["trigger"] == "white"
    clean = DEFENSES["router_ablation"].load().run(_context(tmp_path, model, ds, "router_ablation", "clean"))
    assert clean.artifacts == {}  # maps of an attacked model's own trigger only
    # a model without routers: the router test does not apply (the plan skips such models)
    vgg = build_model("vgg", CLASSES, depth=11, width=0.125).eval()
    result = DEFENSES["router_ablation"].load().run(_context(tmp_path, vgg, ds, "router_ablation"))
    assert not result.flagged and result.target_found is None and result.details["applicable"] is False
    assert DEFENSES["router_ablation"].needs == "routing" and DEFENSES["saliency_ablation"].needs is None


@pytest.mark.parametrize("ranking", sorted(RANKERS))
def test_localisation_maps_find_the_trigger_and_agree_with_single_occlusions(trained, ranking):
    """The footprint is the square's box exactly; the ranking map is the defense's ranking; each occlusion-map
    value is the drop of the predicted class's probability with that one patch filled; and on the backdoored
    models the patch whose occlusion hurts most lies on the trigger in most triggered inputs."""
    trig = trained["trigger"]
    positions = torch.tensor(trigger_positions(trig))
    for name in ("backdoored-0", "backdoored-1"):
        model, ds = trained[name]
        x, y = torch.from_numpy(ds.x_test), torch.from_numpy(ds.y_test)
        clean = x[y != TARGET][:12]
        maps = first_maps(model, RANKERS[ranking], clean, trig.apply(clean), x[:200], "clean_patch", 12, seed=0)
        assert maps["footprint"].shape == maps["ranking"].shape == maps["occlusion"].shape == (12, 8, 8)
        box = torch.zeros(64, dtype=torch.bool)
        box[positions] = True
        changed = maps["footprint"].flatten(1) > 0
        assert not changed[:, ~box].any() and changed[:, box].any(dim=1).all()
        logits, scores = RANKERS[ranking](model.eval(), to_input(trig.apply(clean)))
        assert torch.allclose(maps["ranking"].flatten(1), scores.float(), atol=1e-6)
        # one value by hand: input 3, position 0, filled as first_maps fills (same seeded draw)
        fill = fill_images("clean_patch", x[:200], 12, torch.Generator().manual_seed(0))[3:4]
        occluded = occlude(to_input(trig.apply(clean[3:4])), position_masks()[None, :1], fill)[:, 0]
        with torch.no_grad():
            p0 = logits[3].float().softmax(0)
            p = model(occluded).float().softmax(1)[0]
        label = int(p0.argmax())
        assert maps["occlusion"][3, 0, 0] == pytest.approx(float(p0[label] - p[label]), abs=1e-5)
        hottest = maps["occlusion"].flatten(1).argmax(dim=1)
        assert torch.isin(hottest, positions).double().mean() > 0.5, (name, hottest)


def test_the_plan_runs_the_router_test_on_routed_models_only():
    pytest.importorskip("snakemake")
    from pmoe_backdoor.config_check import validate_config
    from pmoe_backdoor.plan import Plan

    cfg = yaml.safe_load((REPO / "config" / "controls.yaml").read_text())
    validate_config(cfg, REPO / "config" / "schema.yaml")
    apps = Plan(cfg).defense_applications("cifar10")
    models = lambda d: {a.run_dir.split("/")[2] for a in apps if a.defense == d}  # noqa: E731
    assert models("router_ablation") == {"pmoe"}  # controls' study models: resnet and pmoe
    assert models("saliency_ablation") == models("strip") == {"resnet", "pmoe"}
    entries = {e["model"]: e for e in Plan(cfg).localisation_entries("cifar10")}
    assert entries["pmoe"]["maps"] == {d: f"results/cifar10/pmoe/badnets-10/seed0/{d}/fp32.safetensors"
                                       for d in ("router_ablation", "saliency_ablation")}
    assert list(entries["resnet"]["maps"]) == ["saliency_ablation"]
    assert "results/figures/localisation_cifar10.png" in Plan(cfg).all_targets()
    cfg["router_ablation"]["enabled"] = False
    assert "router_ablation" not in {a.defense for a in Plan(cfg).defense_applications("cifar10")}
    cfg["saliency_ablation"]["maps"] = 0
    assert not Plan(cfg).localisation_entries("cifar10")
    assert "results/figures/localisation_cifar10.png" not in Plan(cfg).all_targets()


def test_localisation_figure_draws_a_row_per_input_and_blanks_a_missing_ranking(tmp_path):
    import matplotlib.pyplot as plt

    from pmoe_backdoor.io import load_tensors, save_tensors
    from pmoe_backdoor.reporting.localisation import COLUMNS, draw_localisation_figure, load_maps, localisation_figure

    gen = torch.Generator().manual_seed(0)
    def maps(n):  # noqa: E306
        return {"images": torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=gen),
                **{k: torch.rand(n, 8, 8, generator=gen) for k in ("footprint", "ranking", "occlusion")}}
    for name, n in (("router", 3), ("saliency", 3), ("dense", 1), ("empty", 0)):
        save_tensors(tmp_path / f"{name}.safetensors", maps(n) if n else {})
    entries = [{"model": "pmoe", "trigger": "square", "rate": "10", "precision": "fp32",
                "maps": {"router_ablation": str(tmp_path / "router.safetensors"),
                         "saliency_ablation": str(tmp_path / "saliency.safetensors")}},
               {"model": "resnet", "trigger": "square", "rate": "10", "precision": "fp32",
                "maps": {"saliency_ablation": str(tmp_path / "dense.safetensors")}},
               {"model": "vgg", "trigger": "blend", "rate": "10", "precision": "fp32",
                "maps": {"saliency_ablation": str(tmp_path / "empty.safetensors")}}]
    loaded = load_maps(entries[0])
    assert np.array_equal(loaded["router_ablation"], load_tensors(tmp_path / "router.safetensors")[0]["ranking"])
    assert set(load_maps(entries[1])) == {"images", "footprint", "occlusion", "saliency_ablation"}
    fig = draw_localisation_figure(entries, inputs=2)  # 2 + 1 rows (the dense model's file maps one input)
    axes = np.array(fig.axes).reshape(3, len(COLUMNS))
    assert [ax.get_frame_on() for ax in axes[2]] == [True, True, False, True, True]  # no router column there
    plt.close(fig)
    out = tmp_path / "fig.png"
    localisation_figure(entries, str(out), inputs=2)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no localisation maps"):
        localisation_figure(entries[2:], str(tmp_path / "none.png"))
    assert [c for c, _ in COLUMNS][2:4] == ["router_ablation", "saliency_ablation"]
