"""Blend trigger: ASR and BA of the shipped natural image vs seeded noise, on a config's study recipe.

    .venv/bin/python benchmarks/blend_patterns.py                                  # cpu.yaml, 0.1 %, seed 0
    .venv/bin/python benchmarks/blend_patterns.py --rates 0.1 0.5 --seeds 0 1 --threads 1
    .venv/bin/python benchmarks/blend_patterns.py --patterns natural --images my_trigger.png --epochs 5

Each (pattern, rate, seed) trains one model the way the workflow's train stage does: the trigger from
``attack.trigger_seed`` (``derived_seed(trigger_seed, 'blend')``), the poisoned indices from
``derived_seed(seed, 'poison')`` with the config's target and ``exclude_target``, model init seeded with
``derived_seed(seed, 'init')``, shuffling with ``derived_seed(seed, 'shuffle')``, the config's ``train`` block and
its ``pmoe`` model. BA is on the clean test set, ASR on the triggered non-target test images. Runs on the GPU when
one is present (``--device auto``).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import yaml
from _common import parser, setup

from pmoe_backdoor.attacks.poison import asr_set, make_poison
from pmoe_backdoor.attacks.triggers import BLEND_PATTERNS, make_trigger
from pmoe_backdoor.data.datasets import load_npz
from pmoe_backdoor.evaluate import evaluate
from pmoe_backdoor.models.architectures import build_model
from pmoe_backdoor.runtime import derived_seed, resolve_device, seed_everything
from pmoe_backdoor.training.loop import TrainConfig, fit

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "config" / "cpu.yaml"), help="recipe: models.pmoe, train, attack")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10-subset.npz"))
    p.add_argument("--patterns", nargs="*", default=list(BLEND_PATTERNS), choices=BLEND_PATTERNS)
    p.add_argument("--images", nargs="*", default=[], help="also compare these image files (the 'image' key)")
    p.add_argument("--rates", type=float, nargs="+", default=[0.1], help="poisoning rates in percent")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="run seeds")
    p.add_argument("--epochs", type=int, default=None, help="override the config's train.epochs")
    p.add_argument("--alpha", type=float, default=None, help="override the config's blend alpha")
    p.add_argument("--clean", action="store_true", help="also train a clean model per seed (rate 0 rows)")
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    setup(args.threads, args.malloc)
    cfg = yaml.safe_load(Path(args.config).read_text())
    attack = cfg["attack"]
    blend_cfg = {k: v for k, v in attack["triggers"]["blend"].items() if k not in ("kind", "pattern", "image")}
    if args.alpha is not None:
        blend_cfg["alpha"] = args.alpha
    model_spec = dict(cfg["models"]["pmoe"])
    arch = model_spec.pop("arch")
    train_cfg = dict(cfg["train"])
    if args.epochs is not None:
        train_cfg["epochs"] = args.epochs
    device = resolve_device(args.device)
    ds = load_npz(args.data)
    x_train, y_train = torch.from_numpy(ds.x_train), torch.from_numpy(ds.y_train)
    x_test, y_test = torch.from_numpy(ds.x_test), torch.from_numpy(ds.y_test)
    target, exclude = int(attack["target"]), bool(attack["exclude_target"])
    print(f"# {args.config}: {arch} {model_spec}, train {train_cfg}, blend {blend_cfg}; target {target}, "
          f"exclude_target {exclude}; data {args.data} ({len(y_train)} train / {len(y_test)} test); device {device}")
    eval_batch = int(cfg.get("evaluation", {}).get("batch_size", 1000))
    triggers = {}
    for pattern in args.patterns + args.images:
        extra = {"pattern": pattern} if pattern in BLEND_PATTERNS else {"image": pattern}
        name = pattern if pattern in BLEND_PATTERNS else Path(pattern).name
        triggers[name] = make_trigger("blend", dict(blend_cfg, **extra),
                                      seed=derived_seed(int(attack["trigger_seed"]), "blend"))

    def train(x: torch.Tensor, y: torch.Tensor, seed: int) -> tuple[torch.nn.Module, float]:
        tc = TrainConfig.from_dict(dict(train_cfg, seed=derived_seed(seed, "shuffle")))
        seed_everything(derived_seed(seed, "init"))
        model = build_model(arch, ds.num_classes, **model_spec)
        t0 = time.perf_counter()
        fit(model, x, y, tc, x_test, y_test, device=device, log=None)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return model, time.perf_counter() - t0

    def row(name: str, rate: float, seed: int, poisoned: int, model: torch.nn.Module, seconds: float) -> None:
        trig = triggers[name]
        m = evaluate(model, x_test, y_test, asr_set(x_test, y_test, trig, target)[0], target, ds.num_classes,
                     eval_batch, device=device)
        print(f"{name},{rate:g},{seed},{poisoned},{m['asr']:.2f},{m['ba']:.2f},{seconds:.1f},\"{trig.source}\"",
              flush=True)

    print("pattern,rate_percent,seed,poisoned,asr,ba,train_seconds,source")
    if args.clean:  # rate 0: a clean model; its "ASR" is how often a trigger alone lands on the target class
        for seed in args.seeds:
            model, seconds = train(x_train, y_train, seed)
            for name in triggers:
                row(name, 0, seed, 0, model, seconds)
    for rate in args.rates:
        for seed in args.seeds:
            for name, trig in triggers.items():
                rec = make_poison(ds.x_train, ds.y_train, trig, rate, derived_seed(seed, "poison"), target, exclude)
                model, seconds = train(*rec.apply(x_train, y_train), seed)
                row(name, rate, seed, len(rec.indices), model, seconds)

if __name__ == "__main__":
    main()
