"""A real int8 inference path for the models: the ``int8`` deployment of :mod:`pmoe_backdoor.deployment.quantize` run on
oneDNN's integer convolution and matmul kernels (CPU only, inference only).

What runs in int8: every Conv2d and Linear (stem, block and shortcut convs, the pre-MoE conv, the routers' 1x1
score convs, the experts' grouped 1x1 conv, the head's Linear). Its input is quantized per tensor to uint8 with
the scale and zero point of the simulation (the same min/max calibration, :func:`quantize.activation_ranges`),
its weight per output channel to int8 on the simulation's grid (levels in [-127, 127]), the bias is applied in
float, and the kernel returns float32: ``onednn::qconv2d_pointwise`` / ``qlinear_pointwise``, the operators that
PyTorch's inductor lowers a PT2E graph annotated by the ``X86InductorQuantizer`` to (a dequantize-conv pattern
with no quantize after it becomes a qconv with a float output). Zero padding is the input's zero point.

What stays in float, and why: every BatchNorm and ReLU, the residual adds, the routers' softmax / top-k and the
gating product, and the global mean. The pMoE's BatchNorms come *before* their convolutions (BN -> ReLU -> conv,
pre-activation), so none can be folded into a conv's weights the way conv -> BN is in a quantized deployment;
the experts' BN also reads the gated map. The routing (softmax over 64 positions, top-k, scatter) has no integer
kernel and needs float probabilities to multiply in. This is where PyTorch's quantizers put dequantize anyway.

Not used, and why:
- PT2E itself (``prepare_pt2e`` / ``convert_pt2e`` with the ``X86InductorQuantizer``) moved out of PyTorch into
  ``torchao`` (``torch.ao.quantization.quantize_pt2e`` is gone in torch 2.14), and it only reaches integer
  kernels through ``torch.compile``; the kernels below are the ones it would reach, called directly.
- Eager-mode static quantization (``torch.ao.quantization``, deprecated): its quantized convs must requantize
  their output to uint8, a rounding step that the simulation (and the PT2E/inductor path) does not have.

Agreement with the simulation is limited by the kernels' accumulation order and the float rounding of the
output scale (about 1e-6 relative), which flips a prediction only where two logits are that close.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.architectures import TFSamePadConv
from .quantize import STATIC_ACT_QMAX, activation_qparams, activation_ranges, quantize_model, weight_levels


def int8_kernels_available() -> bool:
    """Whether this PyTorch build has oneDNN's quantized conv / linear operators (x86 and aarch64 CPU builds)."""
    ops = ("qconv_prepack", "qconv2d_pointwise", "qlinear_prepack", "qlinear_pointwise")
    return torch.backends.mkldnn.is_available() and all(hasattr(torch.ops.onednn, op) for op in ops)


def _tf_same_pads(x: torch.Tensor, conv: nn.Conv2d) -> list[int]:
    """TensorFlow's 'same' padding of ``conv`` on ``x`` as F.pad's (left, right, top, bottom), as TFSamePadConv."""
    pads = []
    for size, k, s in ((x.shape[-1], conv.kernel_size[1], conv.stride[1]),
                       (x.shape[-2], conv.kernel_size[0], conv.stride[0])):
        total = max((math.ceil(size / s) - 1) * s + k - size, 0)
        pads += [total // 2, total - total // 2]
    return pads


class Int8Layer(nn.Module):
    """One Conv2d or Linear on oneDNN int8 kernels: uint8 input (per tensor), int8 weight (per channel), fp32 out.

    The packed weight is an opaque oneDNN tensor: this module cannot be saved, copied or moved to a GPU.
    """

    def __init__(self, layer: nn.Conv2d | nn.Linear, lo: float, hi: float):
        super().__init__()
        self.is_conv = isinstance(layer, nn.Conv2d)
        self.tf_same = isinstance(layer, TFSamePadConv)
        self.x_scale, self.x_zero = activation_qparams(lo, hi, STATIC_ACT_QMAX)
        weight = layer.weight.detach().float().cpu()
        levels, scale = weight_levels(weight, 8)
        self.w_scale = scale.flatten().contiguous()
        self.w_zero = torch.zeros(len(self.w_scale), dtype=torch.long)
        self.bias = None if layer.bias is None else layer.bias.detach().float().cpu().contiguous()
        q_weight = levels.to(torch.int8).contiguous()
        if self.is_conv:
            if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
                raise ValueError(f"Int8Layer supports zero padding given as numbers, got {layer.padding!r} / "
                                 f"{layer.padding_mode!r}")
            self.conv_args = (list(layer.stride), list(layer.padding), list(layer.dilation), layer.groups)
            self.packed = torch.ops.onednn.qconv_prepack(q_weight, self.w_scale, self.x_scale, self.x_zero,
                                                         *self.conv_args, None)
        else:
            self.packed = torch.ops.onednn.qlinear_prepack(q_weight, None)
        self._layer = [layer]  # for the padding geometry only; a list keeps it out of this module's children

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 levels of ``x``, rounded exactly as the simulation rounds them."""
        return (x / self.x_scale).round_().add_(self.x_zero).clamp_(0, STATIC_ACT_QMAX).to(torch.uint8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qx = self.quantize_input(x)
        if self.tf_same:  # pad with the zero point: the level that dequantizes to exactly 0
            qx = F.pad(qx, _tf_same_pads(x, self._layer[0]), value=self.x_zero)
        if self.is_conv:
            return torch.ops.onednn.qconv2d_pointwise(
                qx, self.x_scale, self.x_zero, self.packed, self.w_scale, self.w_zero, self.bias, *self.conv_args,
                1.0, 0, torch.float32, "none", [], "")
        return torch.ops.onednn.qlinear_pointwise(
            qx.contiguous(), self.x_scale, self.x_zero, self.packed, self.w_scale, self.w_zero, self.bias,
            1.0, 0, torch.float32, "none", [], "")

    def extra_repr(self) -> str:
        kind = "conv" if self.is_conv else "linear"
        return f"{kind}, x_scale={self.x_scale:.3g}, x_zero={self.x_zero}, out_channels={len(self.w_scale)}"


@torch.no_grad()
def int8_model(model: nn.Module, calibration: torch.Tensor, batch_size: int = 500,
               ranges: dict[str, tuple[float, float]] | None = None) -> nn.Module:
    """A CPU copy of ``model`` whose every Conv2d / Linear runs on int8 kernels with the quantization parameters
    of ``quantize_model(model, "int8", calibration)`` (or of ``ranges``, from :func:`activation_ranges`).
    Inference only: the kernels have no gradient, so Neural Cleanse needs the simulation."""
    if not int8_kernels_available():
        raise RuntimeError(f"this PyTorch build ({torch.__version__}) has no oneDNN int8 kernels "
                           "(torch.ops.onednn.qconv2d_pointwise); use the simulated 'int8' precision")
    if any(m._forward_pre_hooks or m._forward_hooks for m in model.modules()):
        raise ValueError("int8_model needs the float model without hooks (a quantize_model copy carries its "
                         "simulation in hooks, which would quantize twice)")
    cpu_model = copy.deepcopy(model).float().cpu().eval()
    if ranges is None:
        ranges = activation_ranges(quantize_model(cpu_model, "int8", calibration.cpu(), batch_size))
    layers = {n: m for n, m in cpu_model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    missing = sorted(set(layers) - set(ranges))
    if missing:
        raise ValueError(f"int8_model: no calibrated input range for layer(s) {missing}")
    for name, layer in layers.items():
        parent_name, _, attr = name.rpartition(".")
        parent = cpu_model.get_submodule(parent_name) if parent_name else cpu_model
        setattr(parent, attr, Int8Layer(layer, *ranges[name]))
    # The hook also keeps inference_model.fold_batchnorms (which predict_logits applies) from folding BNs into these
    # layers: it leaves hooked models as they are, and an Int8Layer has no float weight to fold into.
    cpu_model.register_forward_pre_hook(_check_cpu_float_input)
    return cpu_model


def _check_cpu_float_input(module: nn.Module, args: tuple) -> None:
    x = args[0]
    if x.device.type != "cpu" or x.dtype != torch.float32:
        raise ValueError(f"the int8 model runs on CPU float32 input (to_input of uint8 images), got a {x.dtype} "
                         f"tensor on {x.device}")
