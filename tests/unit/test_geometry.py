"""The η/φ grid: edges, index conversions, φ wrapping and ΔR, with their edge cases."""

import math

import numpy as np
import pytest

from jetssd import geometry as g


def test_grid_constants_match_the_contract() -> None:
    assert g.IMAGE_SHAPE == (3, 340, 360)
    assert g.ETA_EDGES.shape == (341,)
    assert g.PHI_EDGES.shape == (361,)
    assert g.ETA_EDGES[0] == pytest.approx(-2.958, abs=1e-12)
    assert g.ETA_EDGES[-1] == pytest.approx(2.958, abs=1e-12)
    assert np.allclose(np.diff(g.ETA_EDGES), 0.0174)
    assert g.PHI_EDGES[0] == -math.pi
    assert g.PHI_EDGES[-1] == math.pi
    assert np.allclose(np.diff(g.PHI_EDGES), math.pi / 180)


def test_closed_form_index_formula() -> None:
    """i = ⌊(η+2.958)/0.0174⌋, j = ⌊(φ+π)/(π/180)⌋ away from edges (DESIGN §4.1)."""
    rng = np.random.default_rng(1)
    eta = rng.uniform(-2.95, 2.95, 10_000)
    phi = rng.uniform(-math.pi, math.pi, 10_000)
    # Stay a little away from bin edges, where the closed form and the edge array may round differently.
    frac_eta = (eta + 2.958) / 0.0174 % 1
    frac_phi = (phi + math.pi) / (math.pi / 180) % 1
    ok = (frac_eta > 1e-6) & (frac_eta < 1 - 1e-6) & (frac_phi > 1e-6) & (frac_phi < 1 - 1e-6)
    np.testing.assert_array_equal(g.eta_to_index(eta[ok]), np.floor((eta[ok] + 2.958) / 0.0174))
    np.testing.assert_array_equal(g.phi_to_index(phi[ok]), np.floor((phi[ok] + math.pi) / (math.pi / 180)))


@pytest.mark.parametrize(("edges", "to_index"), [(g.ETA_EDGES, g.eta_to_index), (g.PHI_EDGES, g.phi_to_index)])
def test_indices_agree_with_searchsorted_on_and_around_every_edge(edges, to_index) -> None:  # type: ignore[no-untyped-def]
    values = np.concatenate([edges, np.nextafter(edges, -10), np.nextafter(edges, 10)])
    inside = (values >= edges[0]) & (values < edges[-1])
    expected = np.searchsorted(edges, values[inside], side="right") - 1
    np.testing.assert_array_equal(to_index(values[inside]), expected)


def test_eta_acceptance_edges() -> None:
    assert g.eta_to_index(g.ETA_MIN) == 0
    assert g.eta_to_index(np.nextafter(g.ETA_MIN, -10)) == -1
    assert g.eta_to_index(np.nextafter(g.ETA_MAX, 0)) == 339
    # The upper edge is open: exactly +2.958 is outside, as in the reference files.
    assert g.eta_to_index(g.ETA_MAX) == -1
    assert g.eta_to_index(3.5) == -1
    assert g.eta_to_index(-7.0) == -1
    assert g.eta_to_index(0.0) == 170
    np.testing.assert_array_equal(g.in_acceptance([-2.958, 2.958, 0.0, np.nan]), [True, False, True, False])


def test_nan_and_inf_have_no_pixel() -> None:
    np.testing.assert_array_equal(g.eta_to_index([np.nan, np.inf, -np.inf]), [-1, -1, -1])
    np.testing.assert_array_equal(g.phi_to_index([np.nan, np.inf, -np.inf]), [-1, -1, -1])
    assert np.isnan(g.wrap_phi(np.nan))
    assert np.isnan(g.delta_r(0.0, np.nan, 0.0, 0.0))


def test_phi_at_plus_and_minus_pi_is_the_same_pixel() -> None:
    assert g.phi_to_index(math.pi) == 0
    assert g.phi_to_index(-math.pi) == 0
    assert g.phi_to_index(np.nextafter(math.pi, 0)) == 359
    assert g.wrap_phi(math.pi) == -math.pi
    assert g.wrap_phi(-math.pi) == -math.pi


@pytest.mark.parametrize(
    ("phi", "wrapped"),
    [(0.0, 0.0), (math.pi / 2, math.pi / 2), (3 * math.pi / 2, -math.pi / 2), (-3 * math.pi / 2, math.pi / 2),
     (7 * math.pi, -math.pi), (2 * math.pi + 0.1, 0.1), (-2 * math.pi - 0.1, -0.1)],
)
def test_wrap_phi(phi: float, wrapped: float) -> None:
    assert g.wrap_phi(phi) == pytest.approx(wrapped, abs=1e-12)


def test_wrap_phi_always_in_half_open_range() -> None:
    values = np.concatenate([np.linspace(-50, 50, 100_001), [np.nextafter(-math.pi, -4), -math.pi - 1e-17]])
    w = g.wrap_phi(values)
    assert np.all(w >= -math.pi)
    assert np.all(w < math.pi)
    # Wrapping moves by whole turns only.
    turns = (values - w) / (2 * math.pi)
    np.testing.assert_allclose(turns, np.round(turns), atol=1e-9)


def test_pixel_centres_round_trip() -> None:
    i = np.arange(340)
    j = np.arange(360)
    np.testing.assert_array_equal(g.eta_to_index(g.index_to_eta(i)), i)
    np.testing.assert_array_equal(g.phi_to_index(g.index_to_phi(j)), j)
    np.testing.assert_allclose(g.index_to_eta(i), g.ETA_CENTERS)
    np.testing.assert_allclose(g.index_to_phi(j), g.PHI_CENTERS)
    assert g.index_to_eta(0) == pytest.approx(-2.958 + 0.0087)
    np.testing.assert_allclose(g.eta_to_pixel(g.index_to_eta(i)), i + 0.5)
    np.testing.assert_allclose(g.phi_to_pixel(g.index_to_phi(j)), j + 0.5)


def test_delta_phi_takes_the_short_way_across_the_seam() -> None:
    assert g.delta_phi(3.1, -3.1) == pytest.approx(6.2 - 2 * math.pi)
    assert g.delta_phi(-3.1, 3.1) == pytest.approx(2 * math.pi - 6.2)
    assert g.delta_phi(1.0, 0.5) == pytest.approx(0.5)
    # Antipodal: −π by the half-open convention.
    assert g.delta_phi(math.pi / 2, -math.pi / 2) == pytest.approx(-math.pi)


def test_delta_r_with_wrap_and_broadcasting() -> None:
    assert g.delta_r(0.0, 3.1, 0.0, -3.1) == pytest.approx(2 * math.pi - 6.2)
    assert g.delta_r(1.0, 0.0, -1.0, 0.0) == pytest.approx(2.0)
    assert g.delta_r(0.3, math.pi, 0.7, -math.pi) == pytest.approx(0.4)
    dr = g.delta_r(np.zeros((3, 1)), np.zeros((3, 1)), np.array([0.0, 0.3, 0.4]), np.array([0.0, 0.4, -0.3]))
    assert dr.shape == (3, 3)
    np.testing.assert_allclose(dr[0], [0.0, 0.5, 0.5])
