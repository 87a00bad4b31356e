"""Benchmark 3: trigger application and poisoning over a 50,000-image set, images/s per trigger.

    .venv/bin/python benchmarks/triggers_poison.py
"""

from __future__ import annotations

import time

import numpy as np
import torch
from _common import parser, setup, timed

from pmoe_backdoor.attacks.poison import make_poison
from pmoe_backdoor.attacks.triggers import make_trigger


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=50_000)
    args = p.parse_args()
    setup(args.threads, args.malloc)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (args.n, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 10, args.n).astype(np.int64)
    xt = torch.from_numpy(x)
    triggers = {"square": make_trigger("square"), "blend": make_trigger("blend", seed=0),
                "warp (truncate)": make_trigger("warp", seed=0),
                "warp (bilinear)": make_trigger("warp", {"sampler": "bilinear"}, seed=0)}
    for name, trig in triggers.items():
        sec = timed(lambda: trig.apply(xt), repeat=1)
        print(f"{name:16s} on {args.n} images: {sec:6.3f} s = {args.n / sec:12.0f} img/s")
    for rate in (10.0,):
        t0 = time.perf_counter()
        rec = make_poison(x, y, triggers["warp (truncate)"], rate, seed=0)
        sec = time.perf_counter() - t0
        print(f"poisoning {rate:g} % ({len(rec.indices)} images, warp) of {args.n}: {sec:.3f} s")
    t0 = time.perf_counter()
    trig = make_trigger("warp", seed=1)
    print(f"warp grid generation: {time.perf_counter() - t0:.3f} s")


if __name__ == "__main__":
    main()
