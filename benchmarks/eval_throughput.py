"""Benchmark 5: evaluation throughput of the pmoe on a CPU (inference), and the training step for the side-by-side
with the TensorFlow reference (benchmarks/tf_reference.py).

    .venv/bin/python benchmarks/eval_throughput.py                     # predict_logits, widen 10 and 2, fp32+bf16
    .venv/bin/python benchmarks/eval_throughput.py --threads 2 --widths 10 --precisions fp32 \\
        --modes predict forward --batches 1000 250 64 16 --layouts cl nchw --train
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 .venv/bin/python benchmarks/eval_throughput.py ...  # AVX2 only
    .venv/bin/python benchmarks/eval_throughput.py --src /tmp/old/src ...   # the library of another commit

Modes: ``predict`` is ``evaluate.predict_logits`` at ``batch_size`` = the batch (the library's evaluation path);
``forward`` is the bare eval forward ``model(x)`` on batches of that size under ``torch.inference_mode``,
``nograd`` the same under ``torch.no_grad``; ``compile`` is ``predict_logits(compile=True)`` (PMOE_COMPILE_INFERENCE=1:
torch.compile, inductor with frozen weights, of the BN-folded copy), its compile time printed. Configurations are
timed round-robin, ``--repeat`` rounds, and the median is printed with the images per CPU-second (user + sys of all
threads; less sensitive to other load on a shared machine) and the kernel's (sys) share of that CPU time.
"""

from __future__ import annotations

import inspect
import os
import resource
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from _common import parser, setup

ENV_KNOBS = ("OMP_WAIT_POLICY", "ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")


def cpu_times() -> tuple[float, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime, r.ru_stime


def measure(fn, n_images: int) -> tuple[float, float, float]:
    """(img/s, img per CPU-second, sys share of the CPU time) of one call."""
    (c0, s0), t0 = cpu_times(), time.perf_counter()
    fn()
    (c1, s1), wall = cpu_times(), time.perf_counter() - t0
    return n_images / wall, n_images / max(c1 - c0, 1e-9), (s1 - s0) / max(c1 - c0, 1e-9)


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--widths", type=int, nargs="+", default=[10, 2])
    p.add_argument("--n", type=int, default=1000, help="images per timed inference call")
    p.add_argument("--batches", type=int, nargs="+", default=[1000])
    p.add_argument("--layouts", nargs="+", default=["cl"], choices=["cl", "nchw"])
    p.add_argument("--modes", nargs="*", default=["predict"], choices=["predict", "forward", "nograd", "compile"])
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    p.add_argument("--repeat", type=int, default=3, help="round-robin rounds; the median is printed")
    p.add_argument("--train", action="store_true", help="also time the training step (SGD, batch --train-batch)")
    p.add_argument("--train-batch", type=int, default=128)
    p.add_argument("--cpu-chunk", type=int,
                   help="images per CPU forward pass in predict (default: from evaluate.CPU_ACTIVATION_BYTES)")
    p.add_argument("--src", help="import pmoe_backdoor from this folder instead (e.g. an exported older commit)")
    args = p.parse_args()
    if args.src:
        sys.path.insert(0, args.src)
    import pmoe_backdoor.evaluate as evaluate
    from pmoe_backdoor.evaluate import predict_logits
    from pmoe_backdoor.models.architectures import build_model
    from pmoe_backdoor.runtime import autocast, effective_precision, to_input

    if args.cpu_chunk:
        evaluate.CPU_FORWARD_BATCH = args.cpu_chunk
    setup(args.threads, args.malloc)
    env = ", ".join(f"{k}={os.environ.get(k)}" for k in ENV_KNOBS)
    chunk = getattr(evaluate, "CPU_FORWARD_BATCH", None) or (
        f"{evaluate.CPU_ACTIVATION_BYTES / 2**20:.0f} MiB of activation" if hasattr(evaluate, "CPU_ACTIVATION_BYTES")
        else None)
    print(f"# pmoe_backdoor from {evaluate.__file__}, CPU micro-batch {chunk}; "
          f"{env}; ATen kernels {torch.backends.cpu.get_cpu_capability()}")
    dev = torch.device("cpu")
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (args.n, 32, 32, 3), dtype=torch.uint8, generator=g)
    runs, results = {}, {}
    for width in args.widths:
        for layout in args.layouts:
            cl = layout == "cl"
            torch.manual_seed(0)
            model = build_model("pmoe", 10, widen_factor=width).eval()
            model = model.to(memory_format=torch.channels_last if cl else torch.contiguous_format)
            for precision in args.precisions:
                if effective_precision(dev, precision) != precision:
                    continue
                for mode in args.modes:
                    for bs in args.batches:
                        fn = make_run(mode, model, x, bs, precision, cl, predict_logits, to_input, autocast)
                        if fn is not None:
                            fn()  # warm-up (and compilation)
                            runs[(width, layout, precision, mode, bs)] = fn
            if args.train:
                runs[(width, layout, "fp32", "train", args.train_batch)] = make_train(
                    width, cl, args.train_batch, build_model, to_input)
    for _ in range(args.repeat):
        for key, fn in runs.items():
            n = key[-1] if key[3] == "train" else args.n
            results.setdefault(key, []).append(measure(fn, n))
    for (width, layout, precision, mode, bs), r in results.items():
        med = [statistics.median(v[i] for v in r) for i in range(3)]
        print(f"widen {width:>2} {layout:4} {precision} {mode:7} batch {bs:>4}: {med[0]:8.1f} img/s "
              f"(median of {len(r)}: {', '.join(f'{v[0]:.1f}' for v in r)}); {med[1]:7.1f} img per CPU-second, "
              f"sys {med[2]:4.0%}")


def make_run(mode, model, x, bs, precision, cl, predict_logits, to_input, autocast):
    dev = torch.device("cpu")
    if mode == "predict":
        return lambda: predict_logits(model, x, dev, bs, precision, cl)
    if mode == "compile":
        if "compile" not in inspect.signature(predict_logits).parameters:
            return None  # a library from before compiled inference
        t0 = time.perf_counter()
        predict_logits(model, x, dev, bs, precision, cl, compile=True)  # one compilation per batch shape
        print(f"# compile (batch {bs}, {precision}): {time.perf_counter() - t0:.1f} s, with one pass")
        return lambda: predict_logits(model, x, dev, bs, precision, cl, compile=True)
    net = model
    ctx = torch.no_grad if mode == "nograd" else torch.inference_mode

    def run():
        with ctx(), autocast(dev, precision):
            for start in range(0, x.shape[0], bs):
                net(to_input(x[start:start + bs], cl))
    return run


def make_train(width, cl, batch, build_model, to_input):
    """One SGD step (forward, backward, update) on a resident batch, fp32, as train_throughput's bare step."""
    torch.manual_seed(0)
    model = build_model("pmoe", 10, widen_factor=width)
    model = model.to(memory_format=torch.channels_last if cl else torch.contiguous_format)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    xb = torch.randint(0, 256, (batch, 32, 32, 3), dtype=torch.uint8, generator=g)
    yb = torch.randint(0, 10, (batch,), generator=g)

    def step():
        loss = F.cross_entropy(model(to_input(xb, cl)), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    step()  # warm-up
    return step


if __name__ == "__main__":
    main()
