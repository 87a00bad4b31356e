"""The WaNet warp's noise field with TensorFlow's bicubic upsampling (the authors' notebooks resize in TF), in
numpy: the warp trigger draws its grid from it."""

from __future__ import annotations

import numpy as np

H = 32


def _keys_cubic(d: np.ndarray, a: float = -0.5) -> np.ndarray:
    d = np.abs(d)
    return np.where(d <= 1, (a + 2) * d**3 - (a + 3) * d**2 + 1,
                    np.where(d < 2, a * d**3 - 5 * a * d**2 + 8 * a * d - 4 * a, 0.0))


def tf_bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of TF's ``resize(method='bicubic')``: Keys a=-0.5, half-pixel centres,
    out-of-range taps dropped and the remaining weights renormalised."""
    centres = (np.arange(n_out) + 0.5) * (n_in / n_out)  # in input pixel units, pixel j spans [j, j+1)
    dist = (np.arange(n_in)[None, :] + 0.5) - centres[:, None]
    w = _keys_cubic(dist)
    return w / w.sum(axis=1, keepdims=True)


def warp_noise(k: int, seed: int) -> np.ndarray:
    """The WaNet noise field: uniform(-1, 1) of shape (k, k, 2), divided by its mean absolute value,
    bicubic-upsampled (TF semantics) to 32x32 and clipped to [-1, 1]. Channel 0 is rows, 1 is columns."""
    rng = np.random.default_rng(seed)
    ins = rng.uniform(-1, 1, size=(k, k, 2)).astype(np.float32)
    ins = ins / np.mean(np.abs(ins))
    m = tf_bicubic_matrix(k, H).astype(np.float64)
    up = np.einsum("ik,klc,jl->ijc", m, ins.astype(np.float64), m)
    return np.clip(up, -1, 1).astype(np.float32)
