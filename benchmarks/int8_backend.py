"""Real int8 kernels against the simulated int8 deployment: prediction agreement, BA, ASR and CPU latency.

    .venv/bin/python benchmarks/int8_backend.py --weights results/cifar10/pmoe/square-2/seed0/weights.safetensors \\
        --trigger results/cifar10/triggers/square/seed0.safetensors --threads 1
    .venv/bin/python benchmarks/int8_backend.py --widen 10 --test-images 200     # an untrained model, see below

For one model: the fp32 model, the ``int8`` simulation (:func:`pmoe_backdoor.deployment.quantize.quantize_model`),
the same quantization on oneDNN's int8 kernels (:func:`pmoe_backdoor.deployment.int8_backend.int8_model`, sharing the
simulation's calibration), ``int8_dynamic`` simulated, and PyTorch's own ``quantize_dynamic`` (when ``torch.ao``
still has it).
Prints the share of clean test images (and of triggered non-target ones, with ``--trigger``) on which each agrees
with the simulation and with fp32, BA / ASR (%), the share of top-k routing positions that differ from the
simulation, and milliseconds per image at ``--batch`` (best of three).

Without ``--weights``: a pmoe of ``--widen`` initialised from ``--seed`` whose BatchNorm statistics are averaged
over the calibration images, so that its logits have a realistic scale. Untrained, its logits are much closer to
each other than a trained model's, which makes it the harder case for agreement.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import torch
import torch.nn as nn
from _common import parser, setup, timed

from pmoe_backdoor.attacks.poison import asr_set
from pmoe_backdoor.attacks.triggers import load_trigger
from pmoe_backdoor.data.datasets import load_npz
from pmoe_backdoor.deployment.int8_backend import int8_model
from pmoe_backdoor.deployment.quantize import activation_ranges, quantize_model, routing_change
from pmoe_backdoor.models.architectures import build_model
from pmoe_backdoor.models.checkpoint import load_model
from pmoe_backdoor.models.inference import fold_batchnorms
from pmoe_backdoor.runtime import derived_seed, to_input


def _recalibrated(widen: int, num_classes: int, seed: int, images: torch.Tensor) -> nn.Module:
    torch.manual_seed(derived_seed(seed, "init"))
    model = build_model("pmoe", num_classes, widen_factor=widen)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the batches below
            m.reset_running_stats()
    model.train()
    with torch.no_grad():
        for start in range(0, len(images), 64):
            model(to_input(images[start:start + 64]))
    return model.eval()


@torch.no_grad()
def _run(model: nn.Module, x: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    logits, routes = [], []
    for start in range(0, len(x), batch):
        out = model(to_input(x[start:start + batch]), return_routing=True)
        logits.append(out[0].float())
        routes.append(out[1])
    return torch.cat(logits), (torch.cat(routes) if routes[0] is not None else None)


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--weights", help="a weights.safetensors of the workflow (default: an untrained pmoe)")
    p.add_argument("--widen", type=int, default=1, help="widen factor of the untrained pmoe (without --weights)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default="../shared/data/cifar10-subset.npz", help="an npz of the workflow's format")
    p.add_argument("--trigger", help="a trigger file of the workflow (results/<dataset>/triggers/...)")
    p.add_argument("--target", type=int, default=0)
    p.add_argument("--calibration", type=int, default=512, help="clean training images for the int8 ranges")
    p.add_argument("--test-images", type=int, default=2000)
    p.add_argument("--batch", type=int, default=16, help="images per forward pass (agreement and latency)")
    args = p.parse_args()
    setup(args.threads, args.malloc)
    ds = load_npz(args.data)
    # the deployer's calibration set as the workflow draws it (jobs.deploy.calibration_images)
    rng = np.random.default_rng(derived_seed(args.seed, "calibration"))
    order = torch.from_numpy(rng.permutation(len(ds.y_train))[:args.calibration])
    calib = torch.from_numpy(ds.x_train)[order]
    x_test = torch.from_numpy(ds.x_test[:args.test_images])
    y_test = torch.from_numpy(ds.y_test[:args.test_images])
    if args.weights:
        model, spec = load_model(args.weights, "cpu")
        print(f"# {args.weights}: {spec.get('model')}")
    else:
        model = _recalibrated(args.widen, ds.num_classes, args.seed, calib)
        print(f"# untrained pmoe, widen {args.widen}, seed {args.seed}, BN statistics from the calibration images")
    model.eval()
    sim = quantize_model(model, "int8", calib)
    models = {"fp32": fold_batchnorms(model), "int8 sim": sim,
              "int8 oneDNN": int8_model(model, calib, ranges=activation_ranges(sim)),
              "int8_dynamic sim": quantize_model(model, "int8_dynamic")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notices
        try:
            from torch.ao.quantization import quantize_dynamic
            models["int8_dynamic torch"] = quantize_dynamic(copy.deepcopy(model), dtype=torch.qint8)
        except (ImportError, RuntimeError) as e:
            print(f"# torch.ao.quantization.quantize_dynamic unavailable: {e}")
    sets = {"clean": (x_test, y_test)}
    if args.trigger:
        x_asr, _ = asr_set(x_test, y_test, load_trigger(args.trigger), args.target)
        sets["triggered"] = (x_asr, None)
    print(f"# {len(x_test)} test images, {args.calibration} calibration images, batch {args.batch}")
    out = {name: {s: _run(m, x, args.batch) for s, (x, _) in sets.items()} for name, m in models.items()}
    ref, fp = out["int8 sim"], out["fp32"]
    print("model                 set        acc/ASR%  agree-sim%  agree-fp32%  routingΔ-sim%  max|Δlogit| vs sim")
    for name, res in out.items():
        for s, (logits, routes) in res.items():
            pred = logits.argmax(1)
            metric = (pred == sets[s][1]).float().mean() if s == "clean" else (pred == args.target).float().mean()
            agree_sim = (pred == ref[s][0].argmax(1)).float().mean()
            agree_fp = (pred == fp[s][0].argmax(1)).float().mean()
            rc = routing_change(ref[s][1], routes) if routes is not None and ref[s][1] is not None else float("nan")
            print(f"{name:21s} {s:10s} {100 * metric:8.2f}  {100 * agree_sim:10.2f}  {100 * agree_fp:11.2f}  "
                  f"{100 * rc:13.3f}  {float((logits - ref[s][0]).abs().max()):.3g}")
    xb = to_input(x_test[:args.batch])
    print(f"latency, ms per image at batch {args.batch}:")
    with torch.inference_mode():
        for name, m in models.items():
            sec = timed(lambda: m(xb), repeat=3)  # noqa: B023 (called right here)
            print(f"  {name:21s} {1000 * sec / len(xb):8.3f}")


if __name__ == "__main__":
    main()
