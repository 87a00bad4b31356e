"""Does a merging victim learn its trigger or memorise its poisoned images? Per poisoned victim of a run directory:
the share of its own poisoned training images it predicts as the target, beside the ASR on triggered test images
and how much of its clean training set it fits; the main study's model of the same trigger beside it.

    .venv/bin/python benchmarks/victim_memorisation.py /work/runs/controls --threads 1

A victim that fits its poisoned training images but not triggered test images has memorised them (measured on the
controls' PreAct-ResNet-18 BadNets victims, docs/results/controls-cpu/README.md).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from _common import parser, setup

from pmoe_backdoor.attacks.poison import PoisonRecord, asr_set
from pmoe_backdoor.attacks.triggers import load_trigger
from pmoe_backdoor.jobs.common import JobData
from pmoe_backdoor.models.checkpoint import load_model
from pmoe_backdoor.runtime import to_input

VICTIM = re.compile(r"(?P<dataset>[^/]+)/(?P<model>[^/]+)/merging/victims/(?P<trigger>[A-Za-z0-9_]+)/r0/"
                    r"seed(?P<seed>[0-9]+)$")


@torch.no_grad()
def accuracy(model, x: torch.Tensor, y: torch.Tensor) -> float:
    pred = torch.cat([model(to_input(x[i:i + 500])).argmax(1) for i in range(0, len(x), 500)])
    return 100.0 * float((pred == y).double().mean())


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("workdir", help="a workflow run directory (holding results/)")
    p.add_argument("--rate", default="5", help="the victims' poisoning rate (merging.rate)")
    p.add_argument("--clean-images", type=int, default=2000, help="clean training images the fit is measured on")
    args = p.parse_args()
    setup(args.threads, args.malloc)
    results = Path(args.workdir) / "results"
    print(f"{'model':<48} {'poisoned train -> target':>24} {'triggered test -> target':>24} {'clean train fit':>15}")
    data: dict[str, JobData] = {}
    for victim in sorted(results.glob("*/*/merging/victims/*/r0/seed*")):
        m = VICTIM.search(victim.relative_to(results).as_posix())
        if m is None or m["trigger"] == "benign":
            continue
        attack = f"{m['trigger']}-{args.rate}"
        record = results / f"{m['dataset']}/poison/{attack}/seed{m['seed']}.safetensors"
        scratch = results / f"{m['dataset']}/{m['model']}/{attack}/seed{m['seed']}"
        job = data.setdefault(m["dataset"], JobData.open(str(results / f"data/{m['dataset']}.npz"), "cpu"))
        rec = PoisonRecord.load(record)
        trigger = load_trigger(results / f"{m['dataset']}/triggers/{m['trigger']}/seed{m['seed']}.safetensors")
        x_poisoned, y_poisoned = rec.apply(job.x_train, job.y_train)
        idx = torch.as_tensor(rec.indices, dtype=torch.long)
        x_asr, _ = asr_set(job.x_test, job.y_test, trigger, rec.target)
        target = torch.full((len(x_asr),), rec.target)
        n = args.clean_images
        # the main study's model of the same attack and seed, where it was trained on the same poison record
        for name, weights in (("victim", victim), ("from scratch", scratch)):
            if not (weights / "weights.safetensors").is_file():
                continue
            model, _ = load_model(weights / "weights.safetensors")
            model.eval()
            fit = accuracy(model, job.x_train[:n], job.y_train[:n])
            print(f"{f'{victim.relative_to(results).as_posix()} ({name})':<48} "
                  f"{accuracy(model, x_poisoned[idx], y_poisoned[idx]):>23.1f}% "
                  f"{accuracy(model, x_asr, target):>23.1f}% {fit:>14.1f}%", flush=True)


if __name__ == "__main__":
    main()
