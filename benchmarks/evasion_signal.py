"""Where a router-evasive backdoor's signal goes: on the trained pMoEs of a run directory, the routers' selections
around the trigger and the ASR left when the routers may not select the patches around the trigger, or the trigger's
own, and when the trigger's pixels are filled.

    .venv/bin/python benchmarks/evasion_signal.py /work/runs/router_evasion --threads 1

For every attacked run of a square trigger (``results/<dataset>/<model>/<trigger>-<rate>/seed<s>``) it reads the
weights, the trigger file and the data the workflow used, takes the non-target test images, and reports:

- ``sel trig`` / ``sel ring``: the share of (image, expert) pairs whose top-k holds a trigger position / a position
  of the ring around it (the 8-neighbourhood of the trigger's positions on the 8x8 grid, minus the trigger's own),
  on triggered images; ``ring gain``: the ring's rate minus the same on the clean images;
- ``ASR``: the share of triggered images predicted as the target; ``ring blocked`` / ``trigger blocked``: the same
  when every router scores the ring's / the trigger's positions at -inf, so that no expert selects them (the image
  and the trunk's features untouched: the experts take their next-best positions); ``trigger filled``: with the
  trigger's own pixels replaced by a clean image's patch.

A plain backdoor reads the trigger through the routed trigger patch (blocking it lowers the ASR); an evasive one
whose routers never select the trigger but whose ASR falls when the ring is blocked carries the signal into the
experts through the neighbouring patches, whose features see the trigger through the trunk's receptive field.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from _common import parser, setup

from pmoe_backdoor.attacks.poison import PoisonRecord, asr_set
from pmoe_backdoor.attacks.triggers import load_trigger
from pmoe_backdoor.defenses.occlusion import fill_images, occlude, position_masks
from pmoe_backdoor.jobs.common import JobData
from pmoe_backdoor.models.checkpoint import load_model
from pmoe_backdoor.models.routing import GRID, trigger_positions
from pmoe_backdoor.runtime import to_input

RUN = re.compile(r"results/(?P<dataset>[^/]+)/(?P<model>[^/]+)/(?P<trigger>[A-Za-z0-9_]+)-(?P<rate>[0-9.]+)/"
                 r"seed(?P<seed>[0-9]+)$")


def ring(positions: list[int]) -> list[int]:
    """The 8-neighbourhood of the positions on the 8x8 grid, without the positions themselves."""
    out = set()
    for p in positions:
        r, c = divmod(p, GRID)
        out |= {rr * GRID + cc for rr in range(r - 1, r + 2) for cc in range(c - 1, c + 2)
                if 0 <= rr < GRID and 0 <= cc < GRID}
    return sorted(out - set(positions))


@torch.no_grad()
def selection(model, x: torch.Tensor, positions: list[int]) -> float:
    """Share of (image, expert) pairs whose top-k holds one of ``positions``."""
    feats = model.features(to_input(x))
    top = model.moe.routing_probs(feats).topk(int(model.moe.top_k), dim=-1).indices
    return float(torch.isin(top, torch.tensor(positions)).any(dim=-1).double().mean())


@torch.no_grad()
def asr_with(model, x: torch.Tensor, target: int, fill: torch.Tensor, filled: list[int] = (),
             blocked: list[int] = ()) -> float:
    """ASR with the ``filled`` positions' pixels replaced and the ``blocked`` positions out of every router's
    reach (their router scores set to -inf before the experts choose)."""
    xf = to_input(x)
    if filled:
        mask = position_masks()[list(filled)].any(dim=0)[None, None].expand(len(xf), 1, -1, -1)
        xf = occlude(xf, mask, fill)[:, 0]

    def block(module, args, out):
        out = out.clone()
        out.flatten(2)[..., list(blocked)] = float("-inf")
        return out

    hook = model.moe.router.register_forward_hook(block) if blocked else None
    try:
        return 100.0 * float((model(xf).argmax(1) == target).double().mean())
    finally:
        if hook is not None:
            hook.remove()


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("workdir", help="a workflow run directory (holding results/)")
    p.add_argument("--images", type=int, default=1000, help="non-target test images per model (the remaining ones "
                   "fill the occluded patches)")
    args = p.parse_args()
    setup(args.threads, args.malloc)
    root = Path(args.workdir)
    print(f"{'run':<40} {'sel trig':>8} {'sel ring':>8} {'ring gain':>9} {'ASR':>6} {'ring blocked':>12} "
          f"{'trigger blocked':>15} {'trigger filled':>14}")
    data: dict[str, JobData] = {}
    for run_dir in sorted(root.glob("results/*/*/*-*/seed*")):
        m = RUN.search(run_dir.relative_to(root).as_posix())
        trigger_file = root / f"results/{m['dataset']}/triggers/{m['trigger']}/seed{m['seed']}.safetensors" if m \
            else None
        if m is None or not (run_dir / "weights.safetensors").is_file() or not trigger_file.is_file():
            continue
        trigger = load_trigger(trigger_file)
        if not trigger.spec.patch_located:
            continue
        job = data.setdefault(m["dataset"], JobData.open(str(root / f"results/data/{m['dataset']}.npz"), "cpu"))
        model, _ = load_model(run_dir / "weights.safetensors")
        if not hasattr(model, "moe"):  # routers only
            continue
        model.eval()
        target = PoisonRecord.load(root / f"results/{m['dataset']}/poison/{m['trigger']}-{m['rate']}/"
                                        f"seed{m['seed']}.safetensors").target
        x_trig, _ = asr_set(job.x_test, job.y_test, trigger, target)
        x_trig = x_trig[:args.images]
        x_clean = job.x_test[job.y_test != target][:args.images]
        positions = trigger_positions(trigger)
        around = ring(positions)
        # filled from other clean non-target test images than the ones measured
        fill = fill_images("clean_patch", job.x_test[job.y_test != target][args.images:], len(x_trig),
                           torch.Generator().manual_seed(0))
        sel_ring = selection(model, x_trig, around)
        asr = [asr_with(model, x_trig, target, fill), asr_with(model, x_trig, target, fill, blocked=around),
               asr_with(model, x_trig, target, fill, blocked=positions),
               asr_with(model, x_trig, target, fill, filled=positions)]
        print(f"{run_dir.relative_to(root / 'results').as_posix():<40} {selection(model, x_trig, positions):>8.3f} "
              f"{sel_ring:>8.3f} {sel_ring - selection(model, x_clean, around):>+9.3f} {asr[0]:>6.1f} {asr[1]:>12.1f} "
              f"{asr[2]:>15.1f} {asr[3]:>14.1f}", flush=True)


if __name__ == "__main__":
    main()
