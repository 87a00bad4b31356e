"""Benchmark 2: the data path. Our batches (index slices of one uint8 tensor, converted per batch) against a
torchvision Dataset + DataLoader with per-sample transforms, and both against a training step.

    .venv/bin/python benchmarks/data_path.py
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from _common import parser, setup, timed

from pmoe_backdoor.models.architectures import build_model
from pmoe_backdoor.runtime import to_input


class PerSampleDataset(torch.utils.data.Dataset):
    """The usual way: one PIL image per item, a ToTensor transform per sample."""

    def __init__(self, x: np.ndarray, y: np.ndarray):
        from torchvision import transforms

        self.x, self.y = x, y
        self.tf = transforms.ToTensor()

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        from PIL import Image

        return self.tf(Image.fromarray(self.x[i])), int(self.y[i])


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--width", type=int, default=2, help="pmoe widen factor for the step comparison")
    args = p.parse_args()
    setup(args.threads, args.malloc)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (args.n, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 10, args.n).astype(np.int64)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)

    def ours():
        perm = torch.randperm(args.n)
        for s in range(0, args.n, args.batch):
            idx = perm[s:s + args.batch]
            xb, yb = to_input(xt[idx]), yt[idx]
        return xb, yb

    loader = torch.utils.data.DataLoader(PerSampleDataset(x, y), batch_size=args.batch, shuffle=True, num_workers=0)

    def dataloader():
        for xb, yb in loader:
            pass

    ours_ips = args.n / timed(ours, repeat=1)
    dl_ips = args.n / timed(dataloader, repeat=1)
    torch.manual_seed(0)
    model = build_model("pmoe", 10, widen_factor=args.width).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    xb, yb = to_input(xt[: args.batch]), yt[: args.batch]

    def step():
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step_ips = args.batch / timed(step, repeat=5)
    print(f"our batches:                    {ours_ips:12.0f} img/s")
    print(f"DataLoader + per-sample ToTensor: {dl_ips:10.0f} img/s   (ours is {ours_ips / dl_ips:.0f}x faster)")
    print(f"pmoe widen {args.width} fp32 training step: {step_ips:8.0f} img/s")
    print(f"data path cost per training step: ours {step_ips / ours_ips:.2%}, DataLoader {step_ips / dl_ips:.2%}")


if __name__ == "__main__":
    main()
