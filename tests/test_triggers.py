"""Tests of pmoe_backdoor.attacks.triggers against docs/faithful-behaviour.md §3.1-3.3."""

from __future__ import annotations

import hashlib
import re
from importlib import resources

import numpy as np
import pytest
import torch

from pmoe_backdoor.attacks.triggers import (
    BLEND_PATTERNS,
    NATURAL_IMAGE,
    NATURAL_SOURCE,
    BlendTrigger,
    SquareTrigger,
    WarpTrigger,
    blend_image_from_file,
    blend_pattern,
    load_trigger,
    make_trigger,
    natural_blend_image,
    tf_bicubic_matrix,
    warp_noise,
)

pytestmark = pytest.mark.usefixtures("one_thread")

ARTEFACT_FROM = [17, 21, 25, 29]
ARTEFACT_TO = [16, 20, 24, 28]


def _batch(n: int = 6, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 32, 32, 3), generator=g, dtype=torch.uint8)


# ----------------------------------------------------------------------------------------------------------
# square (docs/faithful-behaviour.md §3.1)
# ----------------------------------------------------------------------------------------------------------

def test_square_default_sets_top_left_4x4_to_1():
    x = _batch()
    x[:, :4, :4, :] = 200  # make sure the original values there differ from 1
    before = x.clone()
    t = make_trigger("square")
    out = t.apply(x)
    assert torch.equal(x, before), "input was modified"
    assert out.dtype == torch.uint8 and out.shape == x.shape
    assert (out[:, 0:4, 0:4, :] == 1).all()
    changed = out != x
    expected = torch.zeros_like(changed)
    expected[:, 0:4, 0:4, :] = True
    assert torch.equal(changed, expected)  # nothing outside rows 0-3 / cols 0-3 changes


def test_square_value_and_position_parameters():
    x = _batch(2)
    out = make_trigger("square", {"value": 255, "size": 3, "row": 5, "col": 7}).apply(x)
    assert (out[:, 5:8, 7:10, :] == 255).all()
    keep = torch.ones(32, 32, dtype=torch.bool)
    keep[5:8, 7:10] = False
    assert torch.equal(out[:, keep], x[:, keep])


@pytest.mark.parametrize("params", [{"size": 0}, {"size": 33}, {"row": 30}, {"col": 29, "size": 4}, {"value": 256}])
def test_square_out_of_range_rejected(params):
    with pytest.raises(ValueError, match="square"):
        make_trigger("square", params)


@pytest.mark.parametrize("params", [{"row": -1}, {"col": -2, "size": 2}])
def test_square_negative_position_rejected(params):
    # a negative start would slice an empty region: the trigger would silently change nothing
    with pytest.raises(ValueError, match="square"):
        make_trigger("square", params)


# ----------------------------------------------------------------------------------------------------------
# blend (docs/faithful-behaviour.md §3.2)
# ----------------------------------------------------------------------------------------------------------

def _blend_reference(x: torch.Tensor, img: torch.Tensor, alpha: float) -> np.ndarray:
    xf = x.numpy().astype(np.float64) / 255.0
    imf = img.numpy().astype(np.float64) / 255.0
    return np.round(255.0 * ((1 - alpha) * xf + alpha * imf[None]))


@pytest.mark.parametrize("alpha", [0.5, 0.2, 1.0])
def test_blend_formula(alpha):
    x = _batch()
    before = x.clone()
    t = make_trigger("blend", {"alpha": alpha}, seed=3)
    assert isinstance(t, BlendTrigger) and t.alpha == alpha
    out = t.apply(x)
    assert torch.equal(x, before)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    ref = _blend_reference(x, t.image, alpha)
    assert np.abs(out.numpy().astype(np.int64) - ref).max() <= 1


def test_blend_alpha_matters_and_default_is_half():
    x = _batch()
    t_default = make_trigger("blend", seed=1)
    assert t_default.alpha == 0.5
    a = make_trigger("blend", {"alpha": 0.5}, seed=1).apply(x)
    b = make_trigger("blend", {"alpha": 0.1}, seed=1).apply(x)
    assert torch.equal(a, t_default.apply(x))
    assert not torch.equal(a, b)
    # alpha 0.1 stays much closer to the clean image than alpha 0.5
    da = (a.int() - x.int()).abs().float().mean()
    db = (b.int() - x.int()).abs().float().mean()
    assert db < da / 3


def _neighbour_mad(img: torch.Tensor) -> float:
    """Mean absolute difference between vertically and horizontally neighbouring pixels, on 0-255."""
    a = img.numpy().astype(np.int64)
    return float((np.abs(np.diff(a, axis=0)).mean() + np.abs(np.diff(a, axis=1)).mean()) / 2)


def _asset_path():
    return resources.files("pmoe_backdoor").joinpath("assets", NATURAL_IMAGE)


def test_blend_default_pattern_is_the_shipped_natural_image():
    t = make_trigger("blend")
    assert isinstance(t, BlendTrigger) and t.source == NATURAL_SOURCE
    assert t.image.dtype == torch.uint8 and t.image.shape == (32, 32, 3)
    assert torch.equal(t.image, make_trigger("blend", {"pattern": "natural"}).image)
    # deterministic and independent of the trigger seed (unlike the noise pattern)
    assert torch.equal(t.image, make_trigger("blend", seed=123).image)
    assert torch.equal(t.image, natural_blend_image())
    # resized exactly like a user's file: RGB, PIL bicubic to 32x32
    with resources.as_file(_asset_path()) as path:
        assert torch.equal(t.image, blend_image_from_file(path))


def test_blend_natural_image_is_smooth_but_not_flat():
    natural, noise = natural_blend_image(), blend_pattern(0)
    assert _neighbour_mad(natural) < _neighbour_mad(noise) / 2.5  # about 28 vs 86 levels of 255
    assert natural.float().std() > 30  # a real picture with contrast, not a near-constant image


def test_blend_asset_matches_its_recorded_provenance():
    readme = _asset_path().parent.joinpath("README.md").read_text()
    digest = hashlib.sha256(_asset_path().read_bytes()).hexdigest()
    recorded = re.search(r"sha256 of the stored file \| `([0-9a-f]{64})`", readme)
    assert recorded and recorded.group(1) == digest
    assert "public domain" in readme and NATURAL_IMAGE in readme


def test_blend_noise_pattern_unchanged():
    t = make_trigger("blend", {"pattern": "noise"}, seed=4)
    assert t.source == "seeded noise (seed 4)"
    assert torch.equal(t.image, blend_pattern(4))
    # the pre-existing algorithm: i.i.d. uniform uint8 from numpy's default_rng(seed)
    expected = np.random.default_rng(4).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    assert np.array_equal(t.image.numpy(), expected)
    assert not torch.equal(t.image, make_trigger("blend", {"pattern": "noise"}, seed=5).image)


def test_blend_image_file_wins_over_pattern(tmp_path):
    from PIL import Image

    arr = np.random.default_rng(1).integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    path = tmp_path / "mine.png"
    Image.fromarray(arr).save(path)
    for pattern in BLEND_PATTERNS:
        t = make_trigger("blend", {"pattern": pattern, "image": str(path)}, seed=2)
        assert t.source == str(path)
        assert torch.equal(t.image, blend_image_from_file(path))
    assert make_trigger("blend", {"image": None}).source == NATURAL_SOURCE  # null image: the pattern


@pytest.mark.parametrize("pattern", ["kitty", "Natural", None, ""])
def test_blend_unknown_pattern_rejected(pattern):
    with pytest.raises(ValueError, match=r"'pattern' must be one of \['natural', 'noise'\]") as err:
        make_trigger("blend", {"pattern": pattern})
    assert repr(pattern) in str(err.value)


def test_blend_pattern_seeded():
    assert torch.equal(blend_pattern(4), blend_pattern(4))
    assert not torch.equal(blend_pattern(4), blend_pattern(5))
    p = blend_pattern(4)
    assert p.dtype == torch.uint8 and p.shape == (32, 32, 3)


@pytest.mark.parametrize("alpha", [0.0, -0.1, 1.5])
def test_blend_bad_alpha(alpha):
    with pytest.raises(ValueError, match="alpha"):
        make_trigger("blend", {"alpha": alpha})


def test_blend_image_from_file_uses_pil_bicubic(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(46, 41, 3), dtype=np.uint8)
    path = tmp_path / "kitty.png"
    Image.fromarray(arr).save(path)
    t = make_trigger("blend", {"image": str(path)})
    expected = np.asarray(Image.fromarray(arr).resize((32, 32), Image.BICUBIC))
    assert t.image.shape == (32, 32, 3) and t.image.dtype == torch.uint8
    assert np.array_equal(t.image.numpy(), expected)
    with pytest.raises(FileNotFoundError):
        make_trigger("blend", {"image": str(tmp_path / "missing.png")})


# ----------------------------------------------------------------------------------------------------------
# warp (docs/faithful-behaviour.md §3.3)
# ----------------------------------------------------------------------------------------------------------

def _displacements(t: WarpTrigger) -> tuple[torch.Tensor, torch.Tensor]:
    r, c = t.source_indices()
    ar = torch.arange(32)
    return r - ar[:, None], c - ar[None, :]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_warp_truncate_displacements_only_minus_one_or_zero(seed):
    t = make_trigger("warp", seed=seed)
    assert isinstance(t, WarpTrigger) and t.sampler == "truncate" and t.k == 2 and t.s == 0.25
    dr, dc = _displacements(t)
    assert set(dr.unique().tolist()) <= {-1, 0}
    assert set(dc.unique().tolist()) <= {-1, 0}
    moved = (dr != 0) | (dc != 0)
    assert moved.any()
    r, c = t.source_indices()
    assert r.min() >= 0 and c.min() >= 0 and r.max() <= 31 and c.max() <= 31


def test_warp_shift_follows_noise_sign():
    # docs/faithful-behaviour.md §3.3: the source index is i-1 where the noise for that axis is negative, i where
    # positive
    for seed in range(3):
        t = make_trigger("warp", seed=seed)
        noise = torch.from_numpy(warp_noise(2, seed))
        dr, dc = _displacements(t)
        rows = torch.arange(32)[:, None].expand(32, 32)
        cols = torch.arange(32)[None, :].expand(32, 32)
        art_r = torch.isin(rows, torch.tensor(ARTEFACT_FROM))
        art_c = torch.isin(cols, torch.tensor(ARTEFACT_FROM))
        assert (dr[(noise[..., 0] < -0.01) & (rows > 0)] == -1).all()
        assert (dr[(noise[..., 0] > 0.01) & ~art_r] == 0).all()
        assert (dc[(noise[..., 1] < -0.01) & (cols > 0)] == -1).all()
        assert (dc[(noise[..., 1] > 0.01) & ~art_c] == 0).all()


def test_warp_apply_truncate_is_a_gather():
    x = _batch()
    before = x.clone()
    t = make_trigger("warp", seed=7)
    out = t.apply(x)
    assert torch.equal(x, before)
    r, c = t.source_indices()
    for i in range(32):
        for j in range(0, 32, 5):
            assert torch.equal(out[:, i, j], x[:, r[i, j], c[i, j]])


def test_warp_grid_seeded():
    g0 = WarpTrigger.generate(seed=0).grid
    assert torch.equal(g0, WarpTrigger.generate(seed=0).grid)
    assert torch.equal(g0, make_trigger("warp", seed=0).grid)
    assert not torch.equal(g0, WarpTrigger.generate(seed=1).grid)
    assert g0.dtype == torch.float32 and g0.shape == (32, 32, 2)
    assert g0.min() >= -1 and g0.max() <= 1


def test_warp_zero_strength_float32_artefact():
    # docs/faithful-behaviour.md §3.3: with zero displacement, the float32 identity grid still maps 17, 21, 25, 29 to
    # 16, 20, 24, 28
    t = make_trigger("warp", {"s": 0})
    r, c = t.source_indices()
    expected = torch.arange(32)
    expected[ARTEFACT_FROM] = torch.tensor(ARTEFACT_TO)
    assert torch.equal(r, expected[:, None].expand(32, 32))
    assert torch.equal(c, expected[None, :].expand(32, 32))
    x = _batch(2)
    out = t.apply(x)
    assert torch.equal(out, x[:, expected][:, :, expected])


def test_warp_bilinear_differs_from_truncate_and_is_milder():
    x = _batch(4, seed=11)
    tt = make_trigger("warp", {"sampler": "truncate"}, seed=2)
    tb = make_trigger("warp", {"sampler": "bilinear"}, seed=2)
    assert torch.equal(tt.grid, tb.grid)
    ot, ob = tt.apply(x), tb.apply(x)
    assert ob.dtype == torch.uint8 and ob.shape == x.shape
    assert not torch.equal(ot, ob)
    # true WaNet at s=0.25 moves pixels by at most ~0.12 px: much smaller change than whole-pixel shifts
    dt = (ot.int() - x.int()).abs().float().mean()
    db = (ob.int() - x.int()).abs().float().mean()
    assert db < dt / 2


def test_warp_bilinear_zero_strength_is_identity():
    # with s = 0 the bilinear grid_sample reproduces the image; a wrong (row, col) order would transpose it
    x = _batch(3, seed=5)
    out = make_trigger("warp", {"s": 0, "sampler": "bilinear"}).apply(x)
    assert (out.int() - x.int()).abs().max() <= 1


def test_warp_bad_sampler():
    with pytest.raises(ValueError, match="sampler"):
        make_trigger("warp", {"sampler": "nearest"})


# ----------------------------------------------------------------------------------------------------------
# TF bicubic matrix
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("n_in", "n_out"), [(2, 32), (4, 32), (3, 7), (32, 8)])
def test_tf_bicubic_rows_sum_to_one(n_in, n_out):
    m = tf_bicubic_matrix(n_in, n_out)
    assert m.shape == (n_out, n_in)
    assert np.allclose(m.sum(axis=1), 1.0)


def test_tf_bicubic_same_size_is_identity_and_symmetric():
    assert np.allclose(tf_bicubic_matrix(5, 5), np.eye(5))
    m = tf_bicubic_matrix(2, 32)
    # half-pixel centres: the upsampling is mirror-symmetric
    assert np.allclose(m, m[::-1, ::-1])
    # Keys a=-0.5 with half-pixel centres: output pixel 0 of a 2 -> 32 upsample is centred 1/32 px from the
    # left edge, i.e. d0 = 15/32 from input pixel 0 and d1 = 47/32 from input pixel 1; the taps left of the
    # image are dropped and the two remaining weights renormalised.
    a = -0.5
    d0, d1 = 15 / 32, 47 / 32
    w0 = (a + 2) * d0**3 - (a + 3) * d0**2 + 1
    w1 = a * d1**3 - 5 * a * d1**2 + 8 * a * d1 - 4 * a
    assert np.allclose(m[0], [w0 / (w0 + w1), w1 / (w0 + w1)])
    assert m[0, 0] > 1.0 and m[0, 1] < 0.0


def test_warp_noise_properties():
    n = warp_noise(2, 0)
    assert n.shape == (32, 32, 2) and n.dtype == np.float32
    assert n.min() >= -1 and n.max() <= 1
    assert np.array_equal(n, warp_noise(2, 0))
    assert not np.array_equal(n, warp_noise(2, 1))


# ----------------------------------------------------------------------------------------------------------
# save / load, errors
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("kind", "params"),
    [
        ("square", {}),
        ("square", {"value": 255, "size": 5, "row": 3, "col": 20}),
        ("blend", {"alpha": 0.3}),
        ("blend", {"pattern": "noise"}),
        ("warp", {}),
        ("warp", {"sampler": "bilinear", "s": 0.5}),
    ],
)
def test_save_load_round_trip(tmp_path, kind, params):
    t = make_trigger(kind, params, seed=9)
    path = tmp_path / f"{kind}.safetensors"
    t.save(path)
    t2 = load_trigger(path)
    assert type(t2) is type(t)
    assert t2.params() == t.params()
    x = _batch(5, seed=1)
    assert torch.equal(t.apply(x), t2.apply(x))


@pytest.mark.parametrize(("params", "source"), [({}, NATURAL_SOURCE), ({"pattern": "noise"}, "seeded noise (seed 9)")])
def test_blend_save_load_records_source(tmp_path, params, source):
    t = make_trigger("blend", params, seed=9)
    t.save(tmp_path / "blend.safetensors")
    t2 = load_trigger(tmp_path / "blend.safetensors")
    assert t2.source == source and t2.params() == {"alpha": 0.5, "source": source}
    assert torch.equal(t2.image, t.image)


def test_blend_file_source_round_trip(tmp_path):
    from PIL import Image

    path = tmp_path / "mine.png"
    Image.fromarray(np.full((8, 8, 3), 77, dtype=np.uint8)).save(path)
    make_trigger("blend", {"image": str(path)}).save(tmp_path / "t.safetensors")
    assert load_trigger(tmp_path / "t.safetensors").source == str(path)


def test_load_trigger_reads_files_saved_before_the_pattern_option(tmp_path):
    from pmoe_backdoor.io import save_tensors

    # the metadata written by the earlier package version, whose only default was the seeded noise
    path = tmp_path / "old.safetensors"
    save_tensors(path, {"image": blend_pattern(3)},
                 {"kind": "blend", "params": {"alpha": 0.5, "source": "seeded pattern (seed 3)"}})
    t = load_trigger(path)
    assert isinstance(t, BlendTrigger) and t.source == "seeded pattern (seed 3)" and t.alpha == 0.5
    assert torch.equal(t.image, blend_pattern(3))


def test_load_trigger_rejects_non_trigger_file(tmp_path):
    from pmoe_backdoor.io import save_tensors

    path = tmp_path / "other.safetensors"
    save_tensors(path, {"w": torch.zeros(2)}, {"something": 1})
    with pytest.raises(ValueError, match="not a trigger file"):
        load_trigger(path)


def test_make_trigger_unknown_parameter_named():
    with pytest.raises(ValueError, match="colour"):
        make_trigger("square", {"colour": 3})
    with pytest.raises(ValueError, match="size"):
        make_trigger("warp", {"size": 4})


def test_make_trigger_bad_kind_named():
    with pytest.raises(ValueError, match="star"):
        make_trigger("star")


@pytest.mark.parametrize(
    "trigger",
    [
        SquareTrigger(),
        BlendTrigger(blend_pattern(0)),
        WarpTrigger.generate(seed=0),
        WarpTrigger.generate(seed=0, sampler="bilinear"),
    ],
    ids=["square", "blend", "warp-truncate", "warp-bilinear"],
)
@pytest.mark.parametrize(
    "bad",
    [
        torch.zeros(2, 32, 32, 3, dtype=torch.float32),
        torch.zeros(32, 32, 3, dtype=torch.uint8),
        torch.zeros(2, 3, 32, 32, dtype=torch.uint8),
        torch.zeros(2, 28, 28, 3, dtype=torch.uint8),
    ],
    ids=["float32", "no-batch", "channels-first", "28x28"],
)
def test_apply_rejects_wrong_dtype_or_shape(trigger, bad):
    with pytest.raises(ValueError, match="uint8"):
        trigger.apply(bad)


def test_square_presets_are_the_source_papers_squares():
    badnets = make_trigger("square", {"preset": "badnets"})
    assert (badnets.size, badnets.value, badnets.row, badnets.col) == (3, 255, 29, 29)  # bottom-right corner
    x = torch.zeros(1, 32, 32, 3, dtype=torch.uint8)
    written = badnets.apply(x)[0].sum(-1).nonzero().tolist()
    assert written == [[r, c] for r in range(29, 32) for c in range(29, 32)]
    assert make_trigger("square", {"preset": "tian"}) == make_trigger("square", {"size": 6, "value": 255, "row": 24,
                                                                                 "col": 24})
    assert make_trigger("square", {"preset": "tian", "value": 128}).value == 128  # a key beside it overrides it
    with pytest.raises(ValueError, match="preset must be one of"):
        make_trigger("square", {"preset": "badnet"})
