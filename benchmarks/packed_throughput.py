"""Benchmark 6: packed training, K models of one architecture in one batched computation, vs one at a time.

    .venv/bin/python benchmarks/packed_throughput.py                 # CUDA: widen 10, K 1..16; CPU: widen 1, K 1 2
    .venv/bin/python benchmarks/packed_throughput.py --ks 1 4 16 --precisions bf16 --compile
    .venv/bin/python benchmarks/packed_throughput.py --ks 1 --no-fit --profile 25    # where a step's time goes

For each precision (fp32; on CUDA also fp32 with TF32 convolutions and matmuls; bf16 where native) it measures
the bare training step of one model (forward, backward, SGD on one resident batch), a training epoch through
``fit()``, and for each K the bare packed step (K resident batches through ``PackedModels``) and a training epoch
through ``fit_packed`` (gathers, shuffling, per-model evaluation after the epoch): aggregate and per-model
images/s, the ratio to K=1, CUDA peak memory per model (with the estimate ``fit_packed`` checks against) and the
projected GPU-hours of the paper's grid (trainings x epochs x images / aggregate images/s). The epoch figures are
the second epoch's, so compilation and warm-up are not in them; ``fit_packed`` with K=1 is ``fit``. A K that runs
out of memory is reported and skipped.

Measured on one H100 80GB (torch 2.11, batch 128, eager unless said), aggregate img/s of K packed models vs one:
widen 10 (the paper): one model 4,472 fp32 / 12,856 TF32 / 19,369 bf16; packed (vmap) K=2..16 3,950-4,270 fp32,
8,430-9,530 TF32, 9,600-10,700 bf16, compiled bf16 K=4 17,468: one model already fills the GPU, pack 1 is best.
widen 2 (CPU-study width): one model 22,000 bf16; packed K=4 41,770, K=16 51,540 (fit_packed epoch 51,266),
compiled K=16 94,038 (4.3x); running the K models one after another on the same stacked tensors (--modes loop)
gains nothing (0.8-0.9x).
"""

from __future__ import annotations

import gc
import io
import math
from collections import Counter

import torch
import torch.nn.functional as F
from _common import parser, setup, timed

from pmoe_backdoor.models import MODELS
from pmoe_backdoor.models.architectures import build_model
from pmoe_backdoor.models.packed import (
    PACK_MODES,
    PackedModels,
    packed_forward,
    packed_input,
    packed_memory_estimate,
    packed_optimizer,
    packed_step,
)
from pmoe_backdoor.runtime import autocast, effective_precision, resolve_device, to_input
from pmoe_backdoor.training.loop import TrainConfig, fit
from pmoe_backdoor.training.packed import fit_packed


def say(msg: str) -> None:
    print(msg, flush=True)


def set_tf32(on: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


def build(args, k: int) -> list[torch.nn.Module]:
    out = []
    for i in range(k):
        torch.manual_seed(i)
        out.append(build_model(args.model, 10, widen_factor=args.widen))
    return out


def random_data(n: int, k: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=g),
             torch.randint(0, 10, (n,), generator=g)) for _ in range(k)]


def sync_fn(dev: torch.device):
    return torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)


def single_step(args, dev, precision: str, compile_: bool):
    """One model's bare training step (forward, backward, SGD on one resident batch) as a function."""
    model = build(args, 1)[0].to(dev).to(memory_format=torch.channels_last)
    step_model = torch.compile(model) if compile_ else model
    (x, y), = random_data(args.batch, 1)
    xb, yb = to_input(x.to(dev)), y.to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        with autocast(dev, precision):
            logits = step_model(xb)
        loss = F.cross_entropy(logits.float(), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def bare_single(args, dev, precision: str, compile_: bool) -> float:
    step = single_step(args, dev, precision, compile_)
    return args.batch / timed(step, repeat=max(1, args.steps // 3), warmup=args.warmup, sync=sync_fn(dev))


# kernel / operator name fragments -> what the time is spent on (CUDA kernel names and CPU aten operators)
CATEGORIES = (
    ("convolution", ("conv", "cudnn", "implicit_gemm", "fprop", "dgrad", "wgrad", "winograd")),
    ("batch norm", ("batch_norm", "batchnorm", "bn_fw", "bn_bw")),
    ("matmul", ("gemm", "matmul", "addmm", "aten::mm", "aten::bmm")),
    ("elementwise", ("elementwise", "add", "mul", "relu", "threshold", "clamp", "copy", "fill", "where", "pad",
                     "reduce", "sum", "mean", "softmax", "topk", "scatter", "gather", "index", "sgd", "foreach")),
)


def category(name: str) -> str:
    low = name.lower()
    return next((cat for cat, keys in CATEGORIES if any(k in low for k in keys)), "other")


def profile_single(args, dev, tag: str, precision: str, compile_: bool) -> None:
    """Where one model's training step spends its time: torch.profiler over 3 steps, self time per kernel (CUDA)
    or operator (CPU), the ``--profile`` largest and the share per category."""
    from torch.profiler import ProfilerActivity, profile

    step, sync = single_step(args, dev, precision, compile_), sync_fn(dev)
    for _ in range(args.warmup + 1):
        step()
    sync()
    cuda = dev.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(3):
            step()
        sync()
    field = "self_device_time_total" if cuda else "self_cpu_time_total"
    rows = [(getattr(e, field) / 3 / 1e3, e.key) for e in prof.key_averages() if getattr(e, field) > 0]
    total = sum(ms for ms, _ in rows)
    say(f"{tag}: profile of one step, {total:.2f} ms of {'GPU kernel' if cuda else 'CPU operator'} self time")
    for ms, name in sorted(rows, reverse=True)[:args.profile]:
        say(f"  {ms:8.3f} ms {ms / total:6.1%}  [{category(name)}] {name[:110]}")
    shares = Counter()
    for ms, name in rows:
        shares[category(name)] += ms
    say("  by category: " + ", ".join(f"{cat} {ms / total:.1%}" for cat, ms in shares.most_common()))


def train_cfg(args, precision: str, compile_: bool) -> TrainConfig:
    return TrainConfig(epochs=2, batch_size=args.batch, lr=0.01, momentum=0.9, precision=precision,
                       compile=compile_, progress_seconds=0)


def fit_epoch(args, dev, precision: str, compile_: bool) -> float:
    n = args.batch * args.steps
    (x, y), = random_data(n, 1)
    hist = fit(build(args, 1)[0], x, y, train_cfg(args, precision, compile_), x[: n // 5], y[: n // 5], device=dev,
               log=io.StringIO())
    return hist["epochs"][-1]["images_per_s"]


def bare_packed(args, dev, precision: str, compile_: bool, k: int, mode: str) -> tuple[float, float]:
    """Aggregate images/s of the bare packed step, and CUDA peak bytes per model (nan off CUDA)."""
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    packed = PackedModels([m.to(dev).to(memory_format=torch.channels_last) for m in build(args, k)], mode)
    opt = packed_optimizer(packed, TrainConfig(lr=0.01, momentum=0.9))
    forward = packed_forward(packed, compile_, None)
    data = random_data(args.batch, k)
    xb = packed_input(torch.stack([x for x, _ in data]).to(dev), True, mode)
    yb = torch.stack([y for _, y in data]).to(dev)
    sec = timed(lambda: packed_step(forward, opt, xb, yb, dev, precision), repeat=max(1, args.steps // 3),
                warmup=args.warmup, sync=sync_fn(dev))
    peak = torch.cuda.max_memory_allocated(dev) / k if dev.type == "cuda" else math.nan
    return k * args.batch / sec, peak


def packed_epoch(args, dev, precision: str, compile_: bool, k: int, mode: str) -> float:
    n = args.batch * args.steps
    data = random_data(n, k)
    hists = fit_packed(build(args, k), data, [train_cfg(args, precision, compile_)] * k, data[0][0][: n // 5],
                       data[0][1][: n // 5], device=dev, log=io.StringIO(), mode=mode)
    return k * hists[0]["epochs"][-1]["images_per_s"]


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc) or "train.pack" in str(exc)


def free(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def grid_hours(args, img_per_s: float) -> float:
    return args.trainings * args.epochs * args.images / img_per_s / 3600


def run_precision(args, dev, label: str, compile_: bool) -> None:
    precision = "bf16" if label == "bf16" else "fp32"
    if dev.type == "cuda":
        set_tf32(label == "tf32")
    tag = f"{args.model} widen {args.widen} batch {args.batch} {label}{' compiled' if compile_ else ''}"
    if args.profile:
        profile_single(args, dev, tag, precision, compile_)
        free(dev)
    one = bare_single(args, dev, precision, compile_)
    say(f"{tag}: one model, bare step {one:9.1f} img/s")
    if not args.no_fit:
        fit_rate = fit_epoch(args, dev, precision, compile_)
        say(f"{tag}: one model, fit() epoch {fit_rate:9.1f} img/s = {fit_rate / one:5.1%} of the bare step; "
            f"grid of {args.trainings} trainings: {grid_hours(args, fit_rate):7.1f} GPU-hours")
    for mode in args.modes:
        base = first = None
        for k in args.ks:
            try:
                agg, peak = bare_packed(args, dev, precision, compile_, k, mode)
                base, first = base or agg / k, first or k
                mem = f"peak {peak / 2**30:6.2f} GiB/model" if dev.type == "cuda" else ""
                line = (f"{tag} {mode} K={k:>2}: bare {agg:9.1f} img/s in all, {agg / k:8.1f} per model "
                        f"({agg / k / base:5.2f}x K={first} per model, {agg / one:5.2f}x one model in all) {mem}")
                if not args.no_fit:
                    free(dev)
                    ep = packed_epoch(args, dev, precision, compile_, k, mode)
                    line += (f"; fit_packed epoch {ep:9.1f} img/s in all ({ep / k:8.1f} per model) -> grid "
                             f"{grid_hours(args, ep):6.1f} GPU-hours")
                say(line)
            except (RuntimeError, ValueError) as exc:
                if not is_oom(exc):
                    raise
                say(f"{tag} {mode} K={k}: out of memory ({str(exc).splitlines()[0][:160]})")
            free(dev)


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--model", default="pmoe", choices=list(MODELS))
    p.add_argument("--widen", type=int, default=None, help="widen factor (default: 10 on CUDA, 1 on CPU)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--ks", type=int, nargs="+", default=None, help="pack sizes (default: 1 2 4 8 16; CPU 1 2)")
    p.add_argument("--precisions", nargs="+", default=None, choices=["fp32", "tf32", "bf16"],
                   help="default: fp32 tf32 bf16 on CUDA, fp32 bf16 on CPU; bf16 only where native")
    p.add_argument("--modes", nargs="+", default=["vmap"], choices=PACK_MODES)
    p.add_argument("--steps", type=int, default=None, help="timed steps per measurement (default 30; CPU 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; CPU 1)")
    p.add_argument("--compile", action="store_true", help="also measure with torch.compile")
    p.add_argument("--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark = True")
    p.add_argument("--no-fit", action="store_true", help="bare steps only, no fit()/fit_packed epochs")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="first profile one model's step (torch.profiler): the N largest kernels and time by category")
    p.add_argument("--trainings", type=int, default=170, help="trainings in the projected grid")
    p.add_argument("--epochs", type=int, default=25, help="epochs per training in the projected grid")
    p.add_argument("--images", type=int, default=50_000, help="training images per epoch in the projected grid")
    args = p.parse_args()
    setup(args.threads, args.malloc)
    dev = resolve_device(args.device)
    cuda = dev.type == "cuda"
    args.widen = args.widen or (10 if cuda else 1)
    args.ks = args.ks or ([1, 2, 4, 8, 16] if cuda else [1, 2])
    args.steps = args.steps or (30 if cuda else 3)
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    labels = args.precisions or (["fp32", "tf32", "bf16"] if cuda else ["fp32", "bf16"])
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    if cuda:
        say(f"# {torch.cuda.get_device_name(dev)}, {torch.cuda.mem_get_info(dev)[1] / 2**30:.0f} GiB, "
            f"cudnn.benchmark={args.cudnn_benchmark}")
        for mode in args.modes:
            est = packed_memory_estimate(build(args, 1)[0], TrainConfig(batch_size=args.batch), 1, args.images, dev,
                                         mode)
            say(f"# fit_packed's memory check ({mode}, fp32 with TF32 as set, {args.images} training images): "
                f"one step {est['step_per_model'] / 2**30:.2f} GiB -> {est['per_model'] / 2**30:.2f} GiB per model")
    for label in labels:
        if label == "tf32" and not cuda:
            say(f"{label}: CUDA only, skipped")
            continue
        if label == "bf16" and effective_precision(dev, "bf16") != "bf16":
            say(f"{label}: not native on {dev}, skipped")
            continue
        for compile_ in [False, True] if args.compile else [False]:
            run_precision(args, dev, label, compile_)
            free(dev)


if __name__ == "__main__":
    main()
