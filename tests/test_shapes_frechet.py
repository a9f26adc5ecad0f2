"""Fréchet distance: hand-computed cases, zero for identical sets, agreement with scipy's matrix square root."""

import numpy as np
import pytest

from sdxl_fast.shapes.frechet import frechet_distance, frechet_from_statistics, frechet_standard_error, statistics


def test_one_dimensional_hand_computed():
    # x = {0, 2}: mean 1, variance 2 (ddof=1); y = {1, 5}: mean 3, variance 8.
    # d² = (1-3)² + 2 + 8 - 2*sqrt(2*8) = 4 + 10 - 8 = 6
    assert frechet_distance([[0.0], [2.0]], [[1.0], [5.0]]) == pytest.approx(6.0, abs=1e-12)


def test_diagonal_covariances_hand_computed():
    # Diagonal covariances commute: d² = |mu1-mu2|² + sum_i (sqrt(a_i) - sqrt(b_i))²
    mu1, mu2 = np.array([0.0, 1.0]), np.array([3.0, -3.0])
    s1, s2 = np.diag([4.0, 9.0]), np.diag([1.0, 16.0])
    expected = (9 + 16) + (2 - 1) ** 2 + (3 - 4) ** 2  # = 27
    assert frechet_from_statistics(mu1, s1, mu2, s2) == pytest.approx(27.0, abs=1e-10)


def test_non_commuting_covariances_hand_computed():
    # S1 = diag(1, 4) (sqrt = diag(1, 2)), S2 = [[2, 1], [1, 2]]: sqrt(S1) S2 sqrt(S1) = [[2, 2], [2, 8]],
    # eigenvalues 5 ± sqrt(13), so Tr sqrt(S1 S2) = sqrt(5+sqrt13) + sqrt(5-sqrt13); equal means.
    s1, s2 = np.diag([1.0, 4.0]), np.array([[2.0, 1.0], [1.0, 2.0]])
    expected = 5 + 4 - 2 * (np.sqrt(5 + np.sqrt(13)) + np.sqrt(5 - np.sqrt(13)))
    assert frechet_from_statistics(np.zeros(2), s1, np.zeros(2), s2) == pytest.approx(expected, abs=1e-10)


def test_identical_sets_give_zero_and_distance_is_symmetric():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(40, 6)), rng.normal(size=(30, 6)) * 2 + 1
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-9)
    assert frechet_distance(a, b) > 1.0


def test_matches_scipy_sqrtm_and_handles_fewer_samples_than_dimensions():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(1)
    a = rng.normal(size=(50, 5))
    b = rng.normal(size=(60, 5)) @ rng.normal(size=(5, 5)) + 0.5
    (mu1, s1), (mu2, s2) = statistics(a), statistics(b)
    reference = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(a, b) == pytest.approx(reference, rel=1e-8)
    # N < D (singular covariances), as in small evaluations: finite and non-negative.
    few = frechet_distance(rng.normal(size=(3, 16)), rng.normal(size=(4, 16)))
    assert np.isfinite(few) and few >= 0


def test_rejects_a_single_sample():
    with pytest.raises(ValueError):
        frechet_distance([[1.0, 2.0]], [[1.0, 2.0], [0.0, 1.0]])


def test_bootstrap_standard_error_shrinks_with_n_and_is_zero_for_identical_rows():
    rng = np.random.default_rng(0)
    small = [frechet_standard_error(rng.normal(size=(n, 4)) + 1, rng.normal(size=(n, 4))) for n in (50, 2000)]
    assert small[1] < small[0] / 3  # about 1/sqrt(40) of it
    same = np.tile(rng.normal(size=(1, 4)), (10, 1))
    assert frechet_standard_error(same, same) == 0.0
    with pytest.raises(ValueError, match="differ in length"):
        frechet_standard_error(np.zeros((3, 2)), np.zeros((4, 2)))
