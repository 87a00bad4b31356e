"""Benchmark 5: evaluation throughput (inference mode, large batches) of the pmoe.

    .venv/bin/python benchmarks/eval_throughput.py
"""

from __future__ import annotations

import torch
from _common import parser, setup, timed

from pmoe_backdoor.evaluate import predict_logits
from pmoe_backdoor.models import build_model
from pmoe_backdoor.runtime import effective_precision


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--widths", type=int, nargs="+", default=[10, 2])
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--batch", type=int, default=1000)
    args = p.parse_args()
    setup(args.threads)
    dev = torch.device("cpu")
    x = torch.randint(0, 256, (args.n, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for width in args.widths:
        model = build_model("pmoe", 10, widen_factor=width).to(memory_format=torch.channels_last)
        for precision in ("fp32", "bf16"):
            if effective_precision(dev, precision) != precision:
                continue
            sec = timed(lambda: predict_logits(model, x, dev, args.batch, precision), repeat=1)
            print(f"widen {width:>2} {precision}: {args.n / sec:8.0f} img/s (batch {args.batch})")


if __name__ == "__main__":
    main()
