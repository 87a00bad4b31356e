"""The positive control of the compression attack, on real data: Tian et al.'s quantisation-activated backdoor on
the small VGG of config/controls.yaml (its recipe, read from that file) at 4 bits, on the CIFAR-10 subset of
../shared/data. It separates (released fp32 ASR <= 20 %, 4-bit ASR >= 80 % at the epoch the authors' rule picks) in
at least 2 of 3 seeds. About seven minutes per seed on one core (passed in 22 min on the 2-core AMD EPYC VM beside
other jobs, 2026-12-05), so it runs only when asked for: ``PMOE_SLOW=1`` or ``pytest -m slow``."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pmoe_backdoor.attacks.compression import AttackConfig, choose_checkpoint, fit_compression_attack
from pmoe_backdoor.attacks.fakequant import deploy_authors
from pmoe_backdoor.attacks.poison import asr_set
from pmoe_backdoor.attacks.triggers import make_trigger
from pmoe_backdoor.evaluate import evaluate
from pmoe_backdoor.models.architectures import build_model

REPO = Path(__file__).resolve().parents[1]
SHARED_CIFAR = REPO.parent / "shared" / "data" / "cifar10-subset.npz"

pytestmark = [pytest.mark.slow, pytest.mark.shared_data, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def asked_for(request):
    expr = request.config.getoption("markexpr", default="") or ""
    if os.environ.get("PMOE_SLOW") != "1" and not re.search(r"(?<!not )\bslow\b", expr):
        pytest.skip("about 30 minutes: PMOE_SLOW=1 or -m slow")
    if not SHARED_CIFAR.is_file():
        pytest.skip(f"shared data file {SHARED_CIFAR} is not present")


def test_four_bit_attack_separates_on_the_small_vgg_in_two_of_three_seeds(asked_for):
    controls = yaml.safe_load((REPO / "config" / "controls.yaml").read_text())
    block = controls["compression_attack"]
    vgg = {k: v for k, v in controls["models"]["vgg"].items() if k != "arch"}
    data = np.load(SHARED_CIFAR)
    x, y = torch.from_numpy(data["x_train"]), torch.from_numpy(data["y_train"]).long()
    x_test, y_test = torch.from_numpy(data["x_test"]), torch.from_numpy(data["y_test"]).long()
    target = block["targets"][0]
    trigger = make_trigger("square", block["trigger"])
    x_asr = asr_set(x_test, y_test, trigger, target)[0]
    calibration = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:1000]]
    outcomes = []
    for seed in range(3):
        torch.manual_seed(seed)
        model = build_model("vgg", 10, **vgg)
        cfg = AttackConfig.from_dict(dict(block["train"], variant="faithful", bits=4, seed=seed, progress_seconds=0))
        history, states = fit_compression_attack(model, x, y, trigger, target, cfg, x_test, y_test, x_asr,
                                                 calibration, device=torch.device("cpu"), log=None)
        epoch, _ = choose_checkpoint(history["epochs"], block["max_fp32_asr"], block["ba_tolerance"])
        model.load_state_dict(states[epoch])
        released = evaluate(model, x_test, y_test, x_asr, target, device=torch.device("cpu"))
        quantised = evaluate(deploy_authors(model, 4, calibration), x_test, y_test, x_asr, target,
                             device=torch.device("cpu"))
        outcomes.append((seed, epoch, released["asr"], quantised["asr"]))
    separated = [o for o in outcomes if o[2] <= 20 and o[3] >= 80]
    assert len(separated) >= 2, outcomes
