import math

import pytest
import torch

from impflow.data import toy2d

NO_DENSITY = tuple(n for n in toy2d.NAMES if n not in toy2d.EXACT_DENSITY)


def midpoint_grid(half_width: float = 6.0, h: float = 0.02) -> torch.Tensor:
    """Cell centres of a square grid whose cell edges fall on every multiple of h."""
    c = torch.arange(-half_width + h / 2, half_width, h, dtype=torch.float64)
    xx, yy = torch.meshgrid(c, c, indexing="ij")
    return torch.stack([xx.flatten(), yy.flatten()], dim=1)


def test_names_are_the_standard_set():
    assert set(toy2d.NAMES) == {
        "checkerboard", "8gaussians", "2spirals", "pinwheel", "rings",
        "circles", "moons", "swissroll", "line", "cos",
    }
    assert set(NO_DENSITY) == {"2spirals", "pinwheel", "moons", "swissroll"}


@pytest.mark.parametrize("name", toy2d.NAMES)
def test_shapes_dtypes_and_seeding(name):
    a = toy2d.sample(name, 101, seed=3)
    assert a.shape == (101, 2) and a.dtype == torch.float32 and torch.isfinite(a).all()
    assert torch.equal(a, toy2d.sample(name, 101, seed=3))
    assert not torch.equal(a, toy2d.sample(name, 101, seed=4))
    b = toy2d.sample(name, 101, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert b.dtype == torch.float64 and torch.equal(b.float(), a)
    assert toy2d.sample(name, 0).shape == (0, 2)


def test_independent_of_global_rng():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    toy2d.sample("moons", 50)
    toy2d.sample("rings", 50, seed=1)
    assert torch.equal(torch.rand(3), expected)


def test_bad_arguments():
    with pytest.raises(ValueError, match="checkerboard"):
        toy2d.sample("chequerboard", 10)
    with pytest.raises(ValueError, match="not both"):
        toy2d.sample("line", 10, seed=0, generator=torch.Generator())
    with pytest.raises(ValueError, match="no exact density.*checkerboard"):
        toy2d.log_prob("moons", torch.zeros(1, 2))
    with pytest.raises(ValueError, match="valid names"):
        toy2d.entropy("nope")
    for name in NO_DENSITY:
        assert toy2d.entropy(name) is None


def test_checkerboard_support_and_uniformity():
    x = toy2d.sample("checkerboard", 40_000, seed=0, dtype=torch.float64)
    assert (x.abs() <= 4).all()
    cell = torch.floor(x / 2).long() + 2  # 0..3 per axis
    assert ((cell.sum(dim=1) % 2) == 0).all()  # black cells only
    counts = torch.bincount(cell[:, 0] * 4 + cell[:, 1], minlength=16).double()
    black = counts[counts > 0]
    assert black.numel() == 8
    expected = x.shape[0] / 8
    assert (black - expected).abs().max() < 5 * math.sqrt(expected)  # binomial sd < sqrt(mean)
    assert torch.equal(toy2d.log_prob("checkerboard", x), torch.full((x.shape[0],), -math.log(32.0), dtype=torch.float64))
    white_and_outside = torch.tensor([[1.0, 3.0], [-3.0, -1.0], [4.5, 0.5], [0.5, -4.1]])
    assert torch.isneginf(toy2d.log_prob("checkerboard", white_and_outside)).all()


def test_checkerboard_entropy_is_five_bits():
    assert toy2d.entropy("checkerboard") == pytest.approx(math.log(32.0), abs=1e-15)
    assert toy2d.entropy("checkerboard") / math.log(2) == pytest.approx(5.0, abs=1e-12)


@pytest.mark.parametrize("name", toy2d.EXACT_DENSITY)
def test_entropy_matches_monte_carlo(name):
    n = 20_000
    lp = toy2d.log_prob(name, toy2d.sample(name, n, seed=11, dtype=torch.float64))
    assert torch.isfinite(lp).all()
    mc, se = -lp.mean().item(), lp.std().item() / math.sqrt(n)
    assert abs(mc - toy2d.entropy(name)) <= 4 * se + 1e-12


@pytest.mark.parametrize("name", toy2d.EXACT_DENSITY)
def test_density_integrates_to_one_and_pinned_entropy(name):
    h = 0.02
    lp = toy2d.log_prob(name, midpoint_grid(h=h))
    p = lp.exp()
    assert (p.sum() * h * h).item() == pytest.approx(1.0, abs=1e-3)
    grid_entropy = (torch.where(p > 0, -p * lp, 0.0).sum() * h * h).item()
    assert grid_entropy == pytest.approx(toy2d.entropy(name), abs=1e-6)


def test_log_prob_keeps_dtype_and_matches_float64():
    x = toy2d.sample("8gaussians", 10, seed=0)
    lp = toy2d.log_prob("8gaussians", x)
    assert lp.shape == (10,) and lp.dtype == torch.float32
    torch.testing.assert_close(lp.double(), toy2d.log_prob("8gaussians", x.double()), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["rings", "circles"])
def test_ring_density_matches_angular_average(name):
    """The Bessel closed form equals the average of the Gaussian over the circle's angle."""
    radii, std = {"rings": ((3.0, 2.25, 1.5, 0.75), 0.08), "circles": ((3.0, 1.5), 0.24)}[name]
    x = torch.tensor([[0.0, 0.0], [1.4, 0.3], [-2.2, 0.4], [0.1, -3.05], [2.0, 2.0]], dtype=torch.float64)
    theta = torch.arange(20_000, dtype=torch.float64) * (2 * math.pi / 20_000)
    circle = torch.stack([torch.cos(theta), torch.sin(theta)], dim=1)
    p = 0.0
    for r in radii:
        sq = (x.unsqueeze(1) - r * circle).pow(2).sum(dim=2)
        p = p + torch.exp(-sq / (2 * std**2)).mean(dim=1) / (2 * math.pi * std**2 * len(radii))
    torch.testing.assert_close(toy2d.log_prob(name, x).exp(), p, rtol=1e-9, atol=1e-300)


def test_curve_datasets_have_closed_form_entropy():
    expected = math.log(5.0) + 0.5 * math.log(2 * math.pi * math.e * toy2d.CURVE_NOISE**2)
    assert toy2d.entropy("line") == pytest.approx(expected, abs=1e-12)
    assert toy2d.entropy("cos") == pytest.approx(expected, abs=1e-12)
