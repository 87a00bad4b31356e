"""Benchmark 1: training throughput and achieved FLOP/s of the pmoe, next to the matmul peak.

    .venv/bin/python benchmarks/train_throughput.py            # widen 10 and 2, fp32 and bf16
    .venv/bin/python benchmarks/train_throughput.py --widths 2 --steps 20

For each width and precision it measures (a) the bare training step (forward, backward, SGD update on one
resident batch) and (b) a whole training epoch through ``pmoe_backdoor.training.loop.fit`` (data path, shuffling,
per-epoch evaluation on a test set, logging), and prints images/s, FLOP/s, the fraction of the matmul peak of
the same precision measured in the same run, and the fit/bare ratio.
"""

from __future__ import annotations

import io
import time

import torch
import torch.nn.functional as F
from _common import matmul_peak, parser, setup, timed
from torch.utils.flop_counter import FlopCounterMode

from pmoe_backdoor.models.architectures import build_model
from pmoe_backdoor.runtime import autocast, effective_precision, to_input
from pmoe_backdoor.training.loop import TrainConfig, fit


def step_flops(model, x, y) -> int:
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--widths", type=int, nargs="+", default=[10, 2])
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=6, help="timed steps per repeat (x3 repeats, best kept)")
    args = p.parse_args()
    setup(args.threads, args.malloc)
    dev = torch.device("cpu")
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    for name, val in peaks.items():
        print(f"matmul peak {name}: {val / 1e9:.1f} GFLOP/s")
    g = torch.Generator().manual_seed(0)
    for width in args.widths:
        for precision in args.precisions:
            eff = effective_precision(dev, precision)
            if eff != precision:
                print(f"widen {width} {precision}: not native on this CPU, skipped")
                continue
            torch.manual_seed(0)
            model = build_model("pmoe", 10, widen_factor=width).to(memory_format=torch.channels_last)
            xb = torch.randint(0, 256, (args.batch, 32, 32, 3), dtype=torch.uint8, generator=g)
            yb = torch.randint(0, 10, (args.batch,), generator=g)
            flops = step_flops(model, to_input(xb), yb) / args.batch  # fp32 count; bf16 does the same work
            opt = torch.optim.SGD(model.parameters(), lr=0.01)

            def step():
                with autocast(dev, eff):
                    logits = model(to_input(xb))
                loss = F.cross_entropy(logits.float(), yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            sec = timed(step, repeat=args.steps)
            bare = args.batch / sec
            # a whole epoch through fit(): n images, evaluation on a test set of n/5, as a train_model job
            n = args.batch * args.steps * 2
            x = torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=g)
            y = torch.randint(0, 10, (n,), generator=g)
            cfg = TrainConfig(epochs=1, batch_size=args.batch, precision=eff, progress_seconds=0)
            t0 = time.perf_counter()
            fit(model, x, y, cfg, x[: n // 5], y[: n // 5], device=dev, log=io.StringIO())
            whole = n / (time.perf_counter() - t0)
            print(f"widen {width:>2} {eff}: {flops / 1e9:.2f} GFLOP/image (fwd+bwd); bare step {bare:7.1f} img/s = "
                  f"{bare * flops / 1e9:6.1f} GFLOP/s = {bare * flops / peaks[eff]:5.1%} of the {eff} matmul peak; "
                  f"whole fit() epoch incl. eval {whole:7.1f} img/s = {whole / bare:5.1%} of the bare step")


if __name__ == "__main__":
    main()
