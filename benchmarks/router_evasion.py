"""Router-evasive backdoor: ASR, BA, the trigger's top-k selection rate and router-ablation detection per weight.

    # end-to-end check only (about a minute on one thread)
    .venv/bin/python benchmarks/router_evasion.py --epochs 1 --train-images 500 --test-images 600 --threads 1
    # the real run: the whole CIFAR-10 subset (10,000 training images), 25 epochs, four weights, two seeds: 2,000,000
    # training images at widen 1 (measured here about 700-1,000 img/s on one thread, defense included), about an hour
    .venv/bin/python benchmarks/router_evasion.py --epochs 25 --threads 2 --weights 0 0.3 1 3 --seeds 0 1

For each seed and weight, a widen-1 pMoE is trained from the same initialisation (``derived_seed(seed, 'init')``)
and shuffling (``derived_seed(seed, 'shuffle')``) on the same poisoned set (``--rate`` % of the training images,
drawn from every class, relabelled to ``--target``) with :func:`fit_router_evasive`; weight 0 is plain poisoned
training through the same step. The trigger (``--trigger``): ``white4``, the pMoE authors' 4x4 square at the
top-left (grid position 0) written white (255) rather than their effective 1/255, so that a short CPU run learns
it; or ``badnets``, the white 3x3 BadNets preset at the bottom-right (position 63). Per weight it prints BA on the
clean test set, ASR on the triggered non-target test images, the trigger's selection rates
(:func:`trigger_rank_stats`), and the router-guided patch ablation run as its job runs it
(:func:`patch_ablation_defense` with the ``combine: max`` router ranker and the config's defaults: top 4, clean-patch
fill, threshold at 1 % FRR on the first ``--holdout`` test images, the rest the clean test set).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from _common import parser, setup

from pmoe_backdoor.attacks.poison import asr_set, make_poison
from pmoe_backdoor.attacks.router_evasion import (
    EvasionConfig,
    fit_router_evasive,
    trigger_positions,
    trigger_rank_stats,
)
from pmoe_backdoor.attacks.triggers import make_trigger
from pmoe_backdoor.data.datasets import load_npz, make_synthetic
from pmoe_backdoor.defenses.patch_ablation import AblationConfig, TriggeredInputs, patch_ablation_defense
from pmoe_backdoor.defenses.router_ablation import router_ranker
from pmoe_backdoor.models.architectures import build_model
from pmoe_backdoor.runtime import derived_seed, resolve_device
from pmoe_backdoor.training.loop import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
TRIGGERS = {"white4": {"size": 4, "value": 255, "row": 0, "col": 0}, "badnets": {"preset": "badnets"}}


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10-subset.npz"),
                   help="an npz of the workflow's format (synthetic data when the file is absent)")
    p.add_argument("--train-images", type=int, default=None, help="the first N training images (default: all)")
    p.add_argument("--test-images", type=int, default=None, help="the first N test images (default: all)")
    p.add_argument("--holdout", type=int, default=200, help="test images held out for the defense's threshold")
    p.add_argument("--trigger", choices=sorted(TRIGGERS), default="white4")
    p.add_argument("--rate", type=float, default=10.0, help="poisoning rate, %% of the training images")
    p.add_argument("--target", type=int, default=0)
    p.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.3, 1.0, 3.0])
    p.add_argument("--margin", type=float, default=EvasionConfig.margin)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--epochs", type=int, default=25)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--widen", type=int, default=1)
    p.add_argument("--bn-momentum", type=float, default=0.1,
                   help="the faithful 0.01 lags on short CPU runs (models.architectures.set_bn_momentum)")
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    setup(args.threads, args.malloc)
    device = resolve_device(args.device)

    if Path(args.data).is_file():
        ds = load_npz(args.data)
        source = args.data
    else:
        ds = make_synthetic(10, 2000, 600, seed=0)
        source = f"synthetic (no file at {args.data})"
    x_train = torch.from_numpy(ds.x_train[:args.train_images])
    y_train = torch.from_numpy(ds.y_train[:args.train_images])
    x_test = torch.from_numpy(ds.x_test[:args.test_images])
    y_test = torch.from_numpy(ds.y_test[:args.test_images])
    if args.holdout + 2 > len(y_test):
        raise SystemExit(f"--holdout {args.holdout} leaves too few of the {len(y_test)} test images")
    trigger = make_trigger("square", TRIGGERS[args.trigger])
    positions = trigger_positions(trigger)
    x_asr, _ = asr_set(x_test, y_test, trigger, args.target)
    # the defense's split: held-out clean images, then the clean test images and their triggered non-target copies
    holdout, clean_test, y_clean = x_test[:args.holdout], x_test[args.holdout:], y_test[args.holdout:]
    source_idx = torch.nonzero(y_clean != args.target).flatten()
    triggered = {args.trigger: TriggeredInputs(trigger.apply(clean_test[source_idx]), source_idx, positions)}
    print(f"# data {source}: {len(y_train)} train, {len(y_test)} test; trigger {args.trigger} {trigger.params()} "
          f"at grid positions {positions}; {args.rate:g} % poisoned, target {args.target}; widen {args.widen}, "
          f"{args.epochs} epochs, batch {args.batch_size}, lr {args.lr}, margin {args.margin}, "
          f"bn_momentum {args.bn_momentum}; defense: holdout {args.holdout}, {len(y_clean)} clean test, "
          f"{len(source_idx)} triggered")
    header = (f"{'seed':>4} {'weight':>6} {'BA':>6} {'ASR':>6} {'sel(e,i)':>8} {'reach(i)':>8} {'rank':>5} "
              f"{'def.rank':>8} {'detect':>6} {'FRR':>5} {'local.':>6} {'pur.ASR':>7} {'flag':>5} {'min':>5}")
    print(header)
    for seed in args.seeds:
        record = make_poison(ds.x_train[:args.train_images], ds.y_train[:args.train_images], trigger, args.rate,
                             derived_seed(seed, "poison"), args.target)
        x_poisoned, y_poisoned = record.apply(x_train, y_train)
        poisoned = torch.zeros(len(y_poisoned), dtype=torch.bool)
        poisoned[record.indices] = True
        for weight in args.weights:
            t0 = time.perf_counter()
            torch.manual_seed(derived_seed(seed, "init"))
            model = build_model("pmoe", ds.num_classes, bn_momentum=args.bn_momentum, widen_factor=args.widen)
            cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                              seed=derived_seed(seed, "shuffle"), eval_every=0, progress_seconds=0)
            history = fit_router_evasive(model, x_poisoned, y_poisoned, poisoned, trigger, cfg,
                                         EvasionConfig(weight=weight, margin=args.margin), x_test, y_test, x_asr,
                                         args.target, device=device, log=None)
            row = history["epochs"][-1]
            stats = trigger_rank_stats(model, x_asr, positions)  # all triggered test images, not just rank_images
            defense = patch_ablation_defense(model, router_ranker("max"), holdout, clean_test, y_clean, triggered,
                                             args.target, AblationConfig(), derived_seed(seed, "patch_ablation"),
                                             device)
            local = defense["localisation"]
            print(f"{seed:>4} {weight:>6g} {row['ba']:>6.2f} {row['asr']:>6.2f} "
                  f"{stats['expert_selection_rate']:>8.3f} {stats['image_reach_rate']:>8.3f} "
                  f"{stats['mean_best_rank']:>5.1f} {stats['defense_rank']:>8.1f} {defense['detection']:>6.3f} "
                  f"{defense['frr']:>5.3f} {'-' if local is None else f'{local:.3f}':>6} "
                  f"{defense['purified_asr']:>7.2f} {str(defense['flagged']):>5} "
                  f"{(time.perf_counter() - t0) / 60:>5.1f}", flush=True)


if __name__ == "__main__":
    main()
