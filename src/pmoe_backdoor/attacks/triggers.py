"""Backdoor triggers, vectorised over whole uint8 batches (N, 32, 32, 3).

Faithful defaults (docs/faithful-behaviour.md §3):
- ``square``: 4x4 at the top-left, value 1 on the 0-255 scale (the authors' effective 1/255 black square);
- ``blend``: x' = (1 - alpha) x + alpha i with alpha 0.5 on [0, 1]; i is a smooth natural image resized to 32x32
  (PIL bicubic): by default the public-domain NASA "astronaut" photograph shipped in ``assets/`` (the authors'
  cartoon is not redistributable), or seeded uniform noise (``pattern: noise``), or the user's own file (``image``);
- ``warp``: WaNet-style k=2, s=0.25 grid with the authors' truncating nearest-pixel sampler, or ``bilinear``.

Triggered images are stored as uint8, like the clean data: square and truncating warp are exact; blend and
bilinear warp are rounded to the nearest level (at most 0.5/255 from the float value).
A trigger is saved to and loaded from safetensors so that training and testing use the identical one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from ..io import load_tensors, save_tensors
from . import TRIGGERS, TriggerKind, make_trigger, trigger_kind
from .warp_noise import tf_bicubic_matrix, warp_noise

H = W = 32


def _check_batch(x: torch.Tensor) -> None:
    if x.dtype != torch.uint8 or x.dim() != 4 or tuple(x.shape[1:]) != (H, W, 3):
        raise ValueError(f"triggers apply to uint8 batches of shape (N, 32, 32, 3); got {x.dtype} {tuple(x.shape)}")


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)


class Trigger:
    """A trigger kind's implementation (its registry entry: ``pmoe_backdoor.attacks.TRIGGERS[kind]``)."""

    kind: ClassVar[str]
    CONFIG_KEYS: ClassVar[frozenset[str]] = frozenset()  # the keys of its config block (besides ``kind``)

    @property
    def spec(self) -> TriggerKind:
        return TRIGGERS[self.kind]

    @classmethod
    def from_config(cls, params: dict[str, Any], seed: int) -> "Trigger":
        """From its config block (checked against CONFIG_KEYS) and the seed it draws from, if it draws."""
        raise NotImplementedError

    @classmethod
    def from_file(cls, tensors: dict[str, torch.Tensor], params: dict[str, Any]) -> "Trigger":
        """From what :meth:`save` wrote."""
        raise NotImplementedError

    @classmethod
    def check_keys(cls, params: dict[str, Any]) -> None:
        unknown = set(params) - cls.CONFIG_KEYS
        if unknown:
            raise ValueError(f"trigger {cls.kind!r}: unknown parameter(s) {sorted(unknown)}; allowed: "
                             f"{sorted(cls.CONFIG_KEYS)}")

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Return triggered copies of a uint8 (N, 32, 32, 3) batch; the input is never modified."""
        raise NotImplementedError

    def tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def params(self) -> dict[str, Any]:
        raise NotImplementedError

    def save(self, path: str | os.PathLike) -> None:
        save_tensors(path, self.tensors(), {"kind": self.kind, "params": self.params()})


@dataclass
class SquareTrigger(Trigger):
    kind: ClassVar[str] = "square"
    CONFIG_KEYS: ClassVar[frozenset[str]] = frozenset({"size", "value", "row", "col", "preset"})
    # the source papers' canonical squares, by name (keys given beside a preset override it): BadNets as
    # BackdoorBench sets it up (a white 3x3 patch in the bottom-right corner) and Tian et al.'s white 6x6 square at
    # rows and columns 24-29; without a preset, the pMoE authors' effective trigger (below)
    PRESETS: ClassVar[dict[str, dict[str, int]]] = {"badnets": {"size": 3, "value": 255, "row": 29, "col": 29},
                                                    "tian": {"size": 6, "value": 255, "row": 24, "col": 24}}
    size: int = 4
    value: int = 1  # on the 0-255 scale: the authors wrote 1 into 0-255 data (a black square); 255 is white
    row: int = 0
    col: int = 0

    @classmethod
    def from_config(cls, params: dict[str, Any], seed: int) -> "SquareTrigger":
        cls.check_keys(params)
        params = dict(params)
        preset = params.pop("preset", None)
        if preset is not None and preset not in cls.PRESETS:
            raise ValueError(f"trigger 'square': preset must be one of {sorted(cls.PRESETS)}, got {preset!r}")
        t = cls(**{**cls.PRESETS.get(preset, {}), **params})
        if not (1 <= t.size and 0 <= t.row and 0 <= t.col and t.row + t.size <= H and t.col + t.size <= W
                and 0 <= t.value <= 255):
            raise ValueError(f"trigger 'square': size/row/col must fit in 32x32 and value in [0, 255]; got {params}")
        return t

    @classmethod
    def from_file(cls, tensors: dict[str, torch.Tensor], params: dict[str, Any]) -> "SquareTrigger":
        return cls(**params)

    def pixel_box(self) -> tuple[int, int, int, int]:
        """(row, col, height, width) of the pixels it writes (the kind is ``patch_located``)."""
        return self.row, self.col, self.size, self.size

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        _check_batch(x)
        out = x.clone()
        out[:, self.row:self.row + self.size, self.col:self.col + self.size, :] = self.value
        return out

    def params(self) -> dict[str, Any]:
        return {"size": self.size, "value": self.value, "row": self.row, "col": self.col}


@dataclass
class BlendTrigger(Trigger):
    kind: ClassVar[str] = "blend"
    CONFIG_KEYS: ClassVar[frozenset[str]] = frozenset({"alpha", "pattern", "image"})
    image: torch.Tensor  # uint8 (32, 32, 3)
    alpha: float = 0.5
    source: str = ""  # which pattern: NATURAL_SOURCE, "seeded noise (seed N)" or the image file's path

    @classmethod
    def from_config(cls, params: dict[str, Any], seed: int) -> "BlendTrigger":
        cls.check_keys(params)
        alpha = float(params.get("alpha", 0.5))
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"trigger 'blend': alpha must lie in (0, 1], got {alpha}")
        pattern = params.get("pattern", "natural")
        if pattern not in BLEND_PATTERNS:
            raise ValueError(f"trigger 'blend': 'pattern' must be one of {list(BLEND_PATTERNS)}, got {pattern!r}")
        path = params.get("image")
        if path:  # the user's own image wins over the pattern
            return cls(blend_image_from_file(path), alpha, str(path))
        if pattern == "natural":
            return cls(natural_blend_image(), alpha, NATURAL_SOURCE)
        return cls(blend_pattern(seed), alpha, f"seeded noise (seed {seed})")

    @classmethod
    def from_file(cls, tensors: dict[str, torch.Tensor], params: dict[str, Any]) -> "BlendTrigger":
        return cls(tensors["image"], params["alpha"], params.get("source", ""))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        _check_batch(x)
        img = self.image.to(x.device, torch.float32) / 255.0
        return _to_uint8((1.0 - self.alpha) * (x.float() / 255.0) + self.alpha * img)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"image": self.image}

    def params(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "source": self.source}


BLEND_PATTERNS = ("natural", "noise")
NATURAL_IMAGE = "astronaut.png"  # in assets/; provenance and licence in assets/README.md
NATURAL_SOURCE = "natural: astronaut (scikit-image 0.26.0 data/astronaut.png, NASA, public domain)"


def blend_pattern(seed: int) -> torch.Tensor:
    """The ``noise`` blend pattern: seeded i.i.d. uniform RGB noise, uint8 (32, 32, 3)."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 256, size=(H, W, 3), dtype=np.uint8))


def _resize_to_32(im: Any) -> torch.Tensor:
    """A PIL image as RGB uint8 (32, 32, 3), resized with PIL's bicubic (its default, as the authors)."""
    from PIL import Image

    arr = np.asarray(im.convert("RGB").resize((W, H), Image.BICUBIC), dtype=np.uint8)
    return torch.from_numpy(arr.copy())


def blend_image_from_file(path: str | os.PathLike) -> torch.Tensor:
    """Load an image, convert to RGB and resize to 32x32 with PIL's bicubic (its default, as the authors)."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"blend trigger image {path}: no such file")
    with Image.open(path) as im:
        return _resize_to_32(im)


def natural_blend_image() -> torch.Tensor:
    """The ``natural`` blend pattern (the default): the shipped public-domain photograph (square, 96x96), resized
    to 32x32 like a user's file (RGB, PIL bicubic)."""
    from PIL import Image

    with resources.files("pmoe_backdoor").joinpath("assets", NATURAL_IMAGE).open("rb") as f, Image.open(f) as im:
        return _resize_to_32(im)


@dataclass
class WarpTrigger(Trigger):
    kind: ClassVar[str] = "warp"
    CONFIG_KEYS: ClassVar[frozenset[str]] = frozenset({"k", "s", "grid_rescale", "sampler"})
    grid: torch.Tensor  # float32 (32, 32, 2) in [-1, 1]; channel 0 = row (y), 1 = column (x)
    sampler: str = "truncate"  # the authors' integer truncation; "bilinear" is true WaNet
    k: int = 2
    s: float = 0.25
    grid_rescale: float = 1.0
    seed: int = 0

    SAMPLERS: ClassVar[tuple[str, ...]] = ("truncate", "bilinear")

    def __post_init__(self):
        if self.sampler not in self.SAMPLERS:
            raise ValueError(f"warp sampler must be one of {self.SAMPLERS}, got {self.sampler!r}")

    @classmethod
    def from_config(cls, params: dict[str, Any], seed: int) -> "WarpTrigger":
        cls.check_keys(params)
        return cls.generate(k=params.get("k", 2), s=params.get("s", 0.25), grid_rescale=params.get("grid_rescale", 1.0),
                            seed=seed, sampler=params.get("sampler", "truncate"))

    @classmethod
    def from_file(cls, tensors: dict[str, torch.Tensor], params: dict[str, Any]) -> "WarpTrigger":
        return cls(tensors["grid"], **params)

    @classmethod
    def generate(cls, k: int = 2, s: float = 0.25, grid_rescale: float = 1.0, seed: int = 0,
                 sampler: str = "truncate") -> "WarpTrigger":
        noise = torch.from_numpy(warp_noise(k, seed))
        # identity grid as TF's float32 linspace: -1 + i * (2/31), last value exactly 1
        lin = (torch.arange(H, dtype=torch.float32) * torch.tensor(2.0 / (H - 1), dtype=torch.float32)) - 1.0
        lin[-1] = 1.0
        rows, cols = torch.meshgrid(lin, lin, indexing="ij")
        identity = torch.stack((rows, cols), dim=-1)
        grid = ((identity + s * noise / H) * grid_rescale).clamp(-1, 1)
        return cls(grid, sampler, k, s, grid_rescale, seed)

    def source_indices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Integer source (row, col) per output pixel under the truncating sampler (float32 arithmetic)."""
        pix = ((self.grid + 1.0) * 0.5 * (H - 1)).to(torch.int32).clamp(0, H - 1).long()
        return pix[..., 0], pix[..., 1]

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        _check_batch(x)
        if self.sampler == "truncate":
            r, c = self.source_indices()
            return x[:, r.to(x.device), c.to(x.device), :]
        # true WaNet: bilinear grid_sample, align_corners=True; grid_sample wants (x=col, y=row)
        img = x.permute(0, 3, 1, 2).float() / 255.0
        g = self.grid.to(x.device).flip(-1).unsqueeze(0).expand(x.shape[0], -1, -1, -1)
        out = F.grid_sample(img, g, mode="bilinear", padding_mode="border", align_corners=True)
        return _to_uint8(out.permute(0, 2, 3, 1))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"grid": self.grid}

    def params(self) -> dict[str, Any]:
        return {"sampler": self.sampler, "k": self.k, "s": self.s, "grid_rescale": self.grid_rescale, "seed": self.seed}


__all__ = ["BlendTrigger", "SquareTrigger", "Trigger", "WarpTrigger", "load_trigger", "make_trigger",
           "tf_bicubic_matrix", "warp_noise"]


def load_trigger(path: str | os.PathLike) -> Trigger:
    """The trigger a file written by :meth:`Trigger.save` holds; a file that does not make one fails with a
    ValueError naming it (FileNotFoundError where it is missing)."""
    tensors, meta = load_tensors(path)
    kind, params = meta.get("kind"), meta.get("params", {})
    try:
        cls = trigger_kind(kind).load()
    except ValueError:
        raise ValueError(f"{path}: not a trigger file (metadata 'kind' is {kind!r}; expected one of "
                         f"{tuple(TRIGGERS)})") from None
    try:
        return cls.from_file(tensors, params)
    except (KeyError, TypeError, ValueError) as exc:  # a tensor or parameter missing or of the wrong kind
        raise ValueError(f"{path}: not a readable {kind} trigger file (tensors {sorted(tensors)}, parameters "
                         f"{params!r}): {type(exc).__name__}: {exc}") from exc
