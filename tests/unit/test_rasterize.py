"""Rasterizer: equality with numpy.histogram2d, sparse/dense/batch consistency, input validation."""

import math

import numpy as np
import pytest

from jetssd import geometry as g
from jetssd.event import InvalidInputError, PFCandidates, SparsePixels
from jetssd.rasterize import densify, densify_batch, rasterize, rasterize_batch, rasterize_sparse, sparsify


def random_candidates(rng: np.random.Generator, n: int = 2500) -> PFCandidates:
    """Candidates spread beyond the acceptance in η and over several turns in φ."""
    return PFCandidates.from_arrays(
        pt=rng.exponential(2.0, n),
        eta=rng.uniform(-3.5, 3.5, n),
        phi=rng.uniform(-3 * math.pi, 3 * math.pi, n),
        kind=rng.integers(0, 3, n),
    )


def histogram2d_image(pf: PFCandidates) -> np.ndarray:
    """The reference's rasterization: one numpy.histogram2d per channel with the grid edges, φ wrapped."""
    image = np.zeros(g.IMAGE_SHAPE, np.float64)
    phi = g.wrap_phi(pf.phi)
    for ch in range(3):
        sel = pf.kind == ch
        image[ch], _, _ = np.histogram2d(pf.eta[sel].astype(np.float64), phi[sel], bins=[g.ETA_EDGES, g.PHI_EDGES],
                                         weights=pf.pt[sel].astype(np.float64))
    return image.astype(np.float32)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dense_image_equals_histogram2d(seed: int) -> None:
    pf = random_candidates(np.random.default_rng(seed))
    image = rasterize(pf)
    assert image.shape == (3, 340, 360)
    assert image.dtype == np.float32
    np.testing.assert_array_equal(image, histogram2d_image(pf))


def test_many_candidates_in_one_pixel_are_summed() -> None:
    pf = PFCandidates.from_arrays(pt=[1.0, 2.0, 3.5, 4.0], eta=[0.001, 0.002, 0.003, 0.001],
                                  phi=[0.001, 0.002, 0.003, 0.001], kind=[0, 0, 0, 2])
    pixels = rasterize_sparse(pf)
    assert len(pixels) == 2
    np.testing.assert_array_equal(pixels.channel, [0, 2])
    np.testing.assert_array_equal(pixels.ieta, [170, 170])
    np.testing.assert_array_equal(pixels.iphi, [180, 180])
    np.testing.assert_allclose(pixels.value, [6.5, 4.0])


def test_outside_acceptance_is_dropped_and_phi_is_wrapped() -> None:
    # Candidates are float32: float32(2.958) is a hair below the double 2.958 and so inside; the next
    # float32 up is the first value outside the half-open acceptance.
    just_outside = float(np.nextafter(np.float32(2.958), np.float32(3)))
    pf = PFCandidates.from_arrays(pt=[5.0, 7.0, 9.0, 11.0], eta=[3.0, -2.959, just_outside, 0.0],
                                  phi=[0.0, 0.0, 0.0, math.pi], kind=[1, 1, 1, 1])
    pixels = rasterize_sparse(pf)
    # Only the last survives, and φ = π is pixel 0.
    assert len(pixels) == 1
    assert (pixels.channel[0], pixels.ieta[0], pixels.iphi[0], pixels.value[0]) == (1, 170, 0, 11.0)


def test_sparse_is_canonical_and_densifies_to_the_dense_image() -> None:
    pf = random_candidates(np.random.default_rng(5))
    pixels = rasterize_sparse(pf)
    flat = pixels.flat_index
    assert np.all(np.diff(flat) > 0), "sorted by (channel, ieta, iphi) with no duplicates"
    assert np.all(pixels.value > 0)
    assert pixels.channel.dtype == np.uint8
    assert pixels.ieta.dtype == np.int16
    assert pixels.iphi.dtype == np.int16
    assert pixels.value.dtype == np.float32
    np.testing.assert_array_equal(densify(pixels), rasterize(pf))


def test_densify_reuses_and_clears_out_buffer() -> None:
    rng = np.random.default_rng(9)
    a, b = rasterize_sparse(random_candidates(rng)), rasterize_sparse(random_candidates(rng))
    buf = np.empty(g.IMAGE_SHAPE, np.float32)
    densify(a, out=buf)
    densify(b, out=buf)
    np.testing.assert_array_equal(buf, densify(b))
    with pytest.raises(ValueError, match="float32"):
        densify(a, out=np.zeros((3, 340, 359), np.float32))


def test_batches_match_single_events() -> None:
    rng = np.random.default_rng(3)
    events = [random_candidates(rng, n) for n in (0, 1, 2500, 40)]
    batch = rasterize_batch(events)
    assert batch.shape == (4, 3, 340, 360)
    for k, pf in enumerate(events):
        np.testing.assert_array_equal(batch[k], rasterize(pf))
    np.testing.assert_array_equal(densify_batch([rasterize_sparse(pf) for pf in events]), batch)
    assert rasterize_batch([]).shape == (0, 3, 340, 360)


def test_empty_event() -> None:
    pixels = rasterize_sparse(PFCandidates.empty())
    assert len(pixels) == 0
    assert not densify(pixels).any()


def test_zero_pt_candidates_leave_no_pixel() -> None:
    pixels = rasterize_sparse(PFCandidates.from_arrays(pt=[0.0, 1.0], eta=[0.0, 1.0], phi=[0.0, 1.0], kind=[0, 0]))
    assert len(pixels) == 1


@pytest.mark.parametrize(
    ("columns", "field", "message"),
    [
        ({"pt": [1.0, np.nan]}, "pt", "non-finite"),
        ({"eta": [np.inf, 0.0]}, "eta", "non-finite"),
        ({"phi": [0.0, np.nan]}, "phi", "non-finite"),
        ({"pt": [1.0, -0.5]}, "pt", "negative"),
        ({"kind": [0, 3]}, "kind", "unknown kind 3"),
        ({"kind": [0, -1]}, "kind", "unknown kind -1"),
        ({"kind": [0, 1.5]}, "kind", "integers"),
        ({"eta": [0.0, 1.0, 2.0]}, "eta", "length 3"),
        ({"phi": [[0.0], [1.0]]}, "phi", "one-dimensional"),
        ({"pt": [[1.0], [1.0, 2.0]]}, "pt", "not a flat numeric array"),
        ({"eta": ["a", "b"]}, "eta", "numeric"),
    ],
)
def test_bad_candidates_name_the_field(columns: dict, field: str, message: str) -> None:
    good = {"pt": [1.0, 2.0], "eta": [0.0, 1.0], "phi": [0.0, 1.0], "kind": [0, 1]}
    with pytest.raises(InvalidInputError, match=message) as info:
        PFCandidates.from_arrays(**{**good, **columns})
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")


def test_sparse_pixels_from_user_input_sums_duplicates_and_validates() -> None:
    pixels = SparsePixels.from_arrays(channel=[2, 0, 2], ieta=[5, 7, 5], iphi=[359, 0, 359], value=[1.0, 2.0, 3.0])
    np.testing.assert_array_equal(pixels.channel, [0, 2])
    np.testing.assert_allclose(pixels.value, [2.0, 4.0])
    for kwargs, field in (({"channel": [3]}, "channel"), ({"ieta": [340]}, "ieta"), ({"iphi": [-1]}, "iphi"),
                          ({"value": [np.nan]}, "value"), ({"value": [-1.0]}, "value")):
        with pytest.raises(InvalidInputError) as info:
            SparsePixels.from_arrays(**{"channel": [0], "ieta": [0], "iphi": [0], "value": [1.0], **kwargs})
        assert info.value.field == field


def test_sparsify_inverts_densify() -> None:
    pixels = rasterize_sparse(random_candidates(np.random.default_rng(11)))
    back = sparsify(densify(pixels))
    np.testing.assert_array_equal(back.flat_index, pixels.flat_index)
    np.testing.assert_array_equal(back.value, pixels.value)
    with pytest.raises(ValueError, match="shape"):
        sparsify(np.zeros((3, 340, 10), np.float32))
