"""K models of one architecture as one stacked set of tensors, their batched training step, and its memory needs.

``PackedModels`` stacks the K models' parameters and buffers along a new leading dimension
(``torch.func.stack_module_state``). Its forward runs all K under ``torch.vmap`` of
``torch.func.functional_call`` (``mode="vmap"``): a convolution whose input and weight are both batched becomes
one grouped convolution with K times the groups, a BatchNorm one normalisation over K times the channels whose
running statistics are updated in place, per model, in the stacked buffers; the pMoE's top-k, scatter and
gathers act per model. ``mode="loop"`` calls the K models one after another on slices of the same stacked
tensors (the comparison the benchmark makes). Used by :func:`pmoe_backdoor.training.packed.fit_packed`.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Sequence, TextIO

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state

from ..runtime import autocast, compiled_or_eager, effective_precision, resolve_device
from ..training.loop import TrainConfig, prepare_model
from .architectures import PatchMoE

PACK_MODES = ("vmap", "loop")
# over one model's measured K=1 step: the per-model peak varies with the cuDNN algorithms picked for each K and
# precision (H100, widen 10: 1.36 GiB measured with TF32 by this check; 1.4-2.1 GiB per model at K=1..16)
MEMORY_MARGIN = 1.5


class _VmapBatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d's training/eval forward (momentum set) calling ``native_batch_norm`` directly.

    ``F.batch_norm`` first asks, on CUDA, whether the input is channels_last to choose cuDNN, a query vmap does
    not implement for batched tensors; ``native_batch_norm`` has a batching rule (one normalisation over K*C
    channels, the stacked running statistics updated in place) and the same arithmetic.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        return torch.native_batch_norm(x, self.weight, self.bias, self.running_mean, self.running_var,
                                       self.training, self.momentum, self.eps)[0]


class PackedModels:
    """K models' stacked parameters and buffers; forward maps (K, B, 3, 32, 32) to (K, B, classes) logits."""

    def __init__(self, models: Sequence[nn.Module], mode: str = "vmap"):
        if mode not in PACK_MODES:
            raise ValueError(f"packed mode must be one of {PACK_MODES}, got {mode!r}")
        self.models, self.mode = list(models), mode
        self.params, self.buffers = stack_module_state(self.models)  # leaves: the optimizer's parameters
        self.base = copy.deepcopy(self.models[0]).to("meta")  # structure only: functional_call swaps tensors in
        for m in self.base.modules():
            if type(m) is nn.BatchNorm2d:
                if m.momentum is None:
                    raise ValueError("packed training needs a BatchNorm momentum (None, a cumulative average, is "
                                     "not supported)")
                m.__class__ = _VmapBatchNorm2d
            if isinstance(m, PatchMoE) and mode == "vmap":
                m.layout_aware_gating = False  # vmap does not implement is_contiguous on batched tensors

    def _one(self, params: dict, buffers: dict, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.base, (params, buffers), (x,))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.base.train()
        if self.mode == "vmap":
            return torch.vmap(self._one)(self.params, self.buffers, x)
        return torch.stack([self._one({n: p[k] for n, p in self.params.items()},
                                      {n: b[k] for n, b in self.buffers.items()}, x[k]) for k in range(len(x))])

    __call__ = forward

    @torch.no_grad()
    def write_back(self) -> None:
        """Copy each model's slice of the stacked tensors into its own nn.Module."""
        for k, model in enumerate(self.models):
            for name, t in model.named_parameters():
                t.copy_(self.params[name][k])
            for name, t in model.named_buffers():
                t.copy_(self.buffers[name][k])


def packed_input(xb: torch.Tensor, channels_last: bool = True, mode: str = "vmap") -> torch.Tensor:
    """uint8 (K, B, 32, 32, 3) -> float (K, B, 3, 32, 32) in [0, 1], laid out as the first convolution reads it.

    vmap: memory (B, 32, 32, K, 3) with channels_last, else (B, K, 3, 32, 32), so that the grouped convolution
    merges K and the colour channels into K*3 channels without a copy; loop: each model's (B, 3, 32, 32) slice
    is channels_last (or contiguous) by itself.
    """
    if mode == "loop":
        x = xb.permute(0, 1, 4, 2, 3).float().div_(255.0)
        return x if channels_last else x.contiguous()
    if channels_last:
        return xb.permute(1, 2, 3, 0, 4).contiguous().float().div_(255.0).permute(3, 0, 4, 1, 2)
    return xb.permute(1, 0, 4, 2, 3).contiguous().float().div_(255.0).transpose(0, 1)


def packed_step(forward: Callable, opt: torch.optim.Optimizer, xb: torch.Tensor, yb: torch.Tensor,
                device: torch.device, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One SGD step of all K models: returns each model's mean loss (K,) and the logits (K, B, classes)."""
    with autocast(device, precision):
        logits = forward(xb)
    b = yb.shape[1]
    losses = F.cross_entropy(logits.float().flatten(0, 1), yb.flatten(), reduction="none").view(-1, b).mean(1)
    opt.zero_grad(set_to_none=True)
    losses.sum().backward()  # disjoint parameters: each model receives exactly its own gradient
    opt.step()
    return losses.detach(), logits.detach()


def packed_optimizer(packed: PackedModels, cfg: TrainConfig) -> torch.optim.SGD:
    return torch.optim.SGD(list(packed.params.values()), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           weight_decay=cfg.weight_decay)


def packed_forward(packed: PackedModels, compile: bool, log: TextIO | None) -> Callable:
    """The packed forward, compiled with an eager fallback when ``compile``."""
    return compiled_or_eager(packed.forward, compile, log, "the packed forward")


def _structure(model: nn.Module) -> list[tuple]:
    """Module types, tensor shapes and plain attributes (BN momentum and eps, top_k, strides, ...) of a model."""
    plain = (bool, int, float, str, tuple, type(None))
    out: list[tuple] = []
    for name, m in model.named_modules():
        attrs = sorted((k, v) for k, v in vars(m).items()
                       if not k.startswith("_") and k != "training" and isinstance(v, plain))
        out.append((name, type(m).__name__, tuple(attrs)))
    return out + [(n, tuple(t.shape), t.dtype) for n, t in model.state_dict().items()]


def check_pack_models(models: Sequence[nn.Module]) -> None:
    """The packed forward runs model 0's structure on every model's tensors: they must be built identically."""
    ref = _structure(models[0])
    for i, m in enumerate(models[1:], 1):
        got = _structure(m)
        if got != ref:
            where = next((a for a, b in zip(ref, got) if a != b), "the number of modules or tensors")
            raise ValueError(f"packed training: model {i} is not built like model 0 (first difference at "
                             f"{where!r}); packed models must share architecture and settings")


def packed_memory_estimate(model: nn.Module, cfg: TrainConfig, k: int, n_train: int,
                           device: torch.device | None = None, mode: str = "vmap") -> dict[str, Any]:
    """Bytes that training ``k`` packed copies of ``model`` needs on ``device``: k x MEMORY_MARGIN x (one model's
    training step + its uint8 training set).

    On CUDA one model's step is measured: the peak allocation of one packed step (K=1, ``cfg``'s batch size
    and precision, random images) on a copy of the model, which holds the module, its stacked copy, gradients
    and activations; this resets the device's peak-memory statistics. Elsewhere it is counted, as a rough lower
    bound: 4 x the weights and the activations autograd saves (saved-tensor hooks, a forward of 4 images, scaled).
    """
    device = device or resolve_device()
    precision = effective_precision(device, cfg.precision)
    step, method = (_measured_step(model, cfg, device, precision, mode), "measured") if device.type == "cuda" \
        else (_counted_step(model, cfg, device, precision), "counted")
    per_model = int(MEMORY_MARGIN * (step + n_train * 32 * 32 * 3))
    return {"per_model": per_model, "total": k * per_model, "step_per_model": step, "method": method}


def _measured_step(model: nn.Module, cfg: TrainConfig, device: torch.device, precision: str, mode: str) -> int:
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    packed = PackedModels([prepare_model(copy.deepcopy(model), device, cfg)], mode)
    opt = packed_optimizer(packed, cfg)
    x = torch.randint(0, 256, (1, cfg.batch_size, 32, 32, 3), dtype=torch.uint8, device=device)
    y = torch.zeros(1, cfg.batch_size, dtype=torch.long, device=device)
    packed_step(packed.forward, opt, packed_input(x, cfg.channels_last, mode), y, device, precision)
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device) - base)


def _counted_step(model: nn.Module, cfg: TrainConfig, device: torch.device, precision: str, batch: int = 4) -> int:
    probe = prepare_model(copy.deepcopy(model), device, cfg).train()
    weights = sum(t.numel() * t.element_size() for t in [*probe.parameters(), *probe.buffers()])
    param_storages = {p.untyped_storage().data_ptr() for p in probe.parameters()}
    saved: dict[int, int] = {}

    def pack_hook(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_storages:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    x = torch.rand(batch, 3, 32, 32, device=device)
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t), autocast(device, precision):
        probe(x)
    return 4 * weights + sum(saved.values()) * cfg.batch_size // batch


def available_memory(device: torch.device) -> int | None:
    """Free bytes on a CUDA device (free plus what this process's allocator holds unused); None elsewhere."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def check_pack_memory(model: nn.Module, cfg: TrainConfig, k: int, n_train: int, device: torch.device,
                      mode: str = "vmap") -> None:
    """Raise ValueError naming ``train.pack`` if ``k`` packed models would not fit in the device's free memory."""
    available = available_memory(device)
    if available is None:
        return
    est = packed_memory_estimate(model, cfg, k, n_train, device, mode)
    if est["total"] > available:
        fits = max(int(available // est["per_model"]), 1)
        raise ValueError(f"train.pack = {k}: training {k} packed models needs about {est['total'] / 2**30:.2f} GiB "
                         f"on {device} ({est['per_model'] / 2**30:.2f} GiB per model at batch {cfg.batch_size}), "
                         f"but only {available / 2**30:.2f} GiB is available; set train.pack to {fits} or less")
