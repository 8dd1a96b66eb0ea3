"""The transferability scores on cases with a known answer (pipeline/analysis/transferability.py)."""

import numpy as np
import pytest
from scipy.stats import multivariate_normal
from sklearn.covariance import LedoitWolf, ledoit_wolf_shrinkage

from pipeline.analysis.transferability import (
    coding_rate,
    gbc,
    h_score,
    ledoit_wolf,
    logme,
    logme_evidence,
    ridge_probe,
    transrate,
)

SCORES = {"logme": logme, "h_score": h_score, "transrate": transrate, "gbc": gbc}


def _blobs(n_per_class=40, classes=4, d=16, separation=4.0, seed=0):
    """Gaussian classes (unit noise per feature) around random centres, about `separation` x
    sqrt(d) apart."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, d)) * separation / np.sqrt(2)
    labels = np.repeat(np.arange(classes), n_per_class)
    return centres[labels] + rng.normal(size=(len(labels), d)), labels


@pytest.mark.parametrize("name", SCORES)
def test_every_score_prefers_separable_classes_to_shuffled_labels(name):
    features, labels = _blobs()
    shuffled = np.random.default_rng(1).permutation(labels)
    assert SCORES[name](features, labels) > SCORES[name](features, shuffled)


@pytest.mark.parametrize("name", SCORES)
def test_every_score_ranks_three_separations_in_order(name):
    values = [SCORES[name](*_blobs(separation=s)) for s in (0.5, 2.0, 6.0)]
    assert values[0] < values[1] < values[2], values


@pytest.mark.parametrize("d", [5, 60])  # more images than features, and fewer
def test_logme_is_the_exact_bayesian_evidence_at_its_fixed_point(d):
    """log N(y; 0, I/beta + F F^T/alpha) / n computed directly equals the SVD path's evidence,
    including when d exceeds n (the d - rank zero eigenvalues count)."""
    rng = np.random.default_rng(2)
    n = 30
    features = rng.normal(size=(n, d))
    y = (features[:, 0] + features[:, 1] + rng.normal(size=n) > 0).astype(float)  # linear signal: an interior optimum
    u, s, _ = np.linalg.svd(features, full_matrices=False)
    x2 = (u.T @ y) ** 2
    evidence, alpha, beta = logme_evidence(s**2, x2, max(y @ y - x2.sum(), 0.0), n, d)
    covariance = np.eye(n) / beta + features @ features.T / alpha
    direct = multivariate_normal(np.zeros(n), covariance).logpdf(y) / n
    assert evidence == pytest.approx(direct, rel=1e-9, abs=1e-9)
    # the fixed point maximises the evidence: nudging either precision lowers it
    for a, b in ((alpha * 1.2, beta), (alpha / 1.2, beta), (alpha, beta * 1.2), (alpha, beta / 1.2)):
        nudged = np.eye(n) / b + features @ features.T / a
        assert multivariate_normal(np.zeros(n), nudged).logpdf(y) / n < direct + 1e-6  # flat as alpha grows large


@pytest.mark.parametrize("d", [6, 300])  # an SVD of the features; the Gram matrix's eigenvectors
def test_logme_averages_the_per_class_evidence(d):
    features, labels = _blobs(classes=3, d=d)
    u, s, _ = np.linalg.svd(features, full_matrices=False)
    per_class = []
    for c in range(3):
        y = (labels == c).astype(float)
        x2 = (u.T @ y) ** 2
        per_class.append(logme_evidence(s**2, x2, y @ y - x2.sum(), *features.shape)[0])
    assert logme(features, labels) == pytest.approx(np.mean(per_class))


@pytest.mark.parametrize(("n_per_class", "d"), [(40, 16), (5, 200)])  # more images than features, and fewer
def test_h_score_in_the_gram_space_equals_the_covariance_formula(n_per_class, d):
    """The reference formula, trace(pinv(LedoitWolf covariance) @ (1 - a) cov(class means)), in
    d x d, against the n x n computation; and the shrinkage against scikit-learn's."""
    features, labels = _blobs(n_per_class=n_per_class, d=d, separation=1.0)
    centred = features - features.mean(axis=0)
    assert ledoit_wolf(centred @ centred.T, d)[0] == pytest.approx(ledoit_wolf_shrinkage(centred, assume_centered=True))
    estimate = LedoitWolf(assume_centered=True).fit(centred)
    means = np.stack([centred[labels == c].mean(axis=0) for c in labels])
    between = means.T @ means / len(means)
    reference = np.trace(np.linalg.pinv(estimate.covariance_) @ ((1 - estimate.shrinkage_) * between))
    assert 0 < estimate.shrinkage_ < 1
    assert h_score(features, labels, dimensions=None) == pytest.approx(reference, rel=1e-8)


def test_h_score_is_unchanged_by_scaling_and_shift_and_counts_between_class_variance():
    features, labels = _blobs()
    score = h_score(features, labels)
    assert h_score(features * 1000.0 + 7.0, labels) == pytest.approx(score, rel=1e-9)
    # one feature, two classes at -1 / +1 with no spread: all variance is between classes, no
    # shrinkage in one dimension, so the score is exactly 1
    labels = np.array([0, 0, 1, 1])
    assert h_score(np.array([[-1.0], [-1.0], [1.0], [1.0]]), labels) == pytest.approx(1.0)


def test_coding_rate_by_hand_and_transrate_of_a_two_point_case():
    z = np.array([[1.0], [-1.0], [2.0], [-2.0]])
    assert coding_rate(z, eps=0.5) == pytest.approx(0.5 * np.log(1 + 10 / (4 * 0.5)))
    wide = np.random.default_rng(3).normal(size=(5, 12))  # n < d: the n x n Gram has the same determinant
    assert coding_rate(wide) == pytest.approx(0.5 * np.linalg.slogdet(np.eye(12) + wide.T @ wide / (5e-4))[1])
    # labels that carry nothing: each class an exact copy of the same centred rows, so every class
    # codes at the overall rate and TransRate is 0; separable classes score above it
    rows = np.random.default_rng(5).normal(size=(20, 4))
    rows -= rows.mean(axis=0)
    copies, labels = np.vstack([rows, rows, rows]), np.repeat([0, 1, 2], 20)
    assert transrate(copies, labels) == pytest.approx(0.0, abs=1e-9)
    assert transrate(*_blobs()) > 1.0


@pytest.mark.parametrize("d", [16, 300])
def test_gbc_reduces_with_the_same_pca_as_scikit_learn(d):
    """The Gram-space PCA scores match scikit-learn's PCA up to each axis's sign, so GBC does."""
    from sklearn.decomposition import PCA

    features, labels = _blobs(n_per_class=30, d=d, separation=1.5)
    reduced = PCA(8, svd_solver="full").fit_transform(features)
    expected = gbc(reduced, labels, dimensions=8)  # already reduced: the PCA inside is a rotation of nothing
    assert gbc(features, labels, dimensions=8) == pytest.approx(expected, rel=1e-7)


def test_gbc_is_zero_for_far_apart_classes_and_minus_c_c_minus_1_for_identical_ones():
    features, labels = _blobs(separation=200.0)
    assert gbc(features, labels) == pytest.approx(0.0, abs=1e-12)
    rng = np.random.default_rng(4)
    same = rng.normal(size=(400, 3))
    halves = np.tile([0, 1], 200)
    # the two halves of one Gaussian: the overlap is near 1 for both ordered pairs
    assert gbc(same, halves) == pytest.approx(-2.0, abs=0.02)


@pytest.mark.parametrize("name", SCORES)
def test_scores_reject_one_class_and_mismatched_shapes(name):
    features = np.zeros((4, 2))
    with pytest.raises(ValueError, match="at least 2 classes"):
        SCORES[name](features, np.zeros(4, dtype=int))
    with pytest.raises(ValueError, match=r"need features \(n, d\) and labels \(n,\)"):
        SCORES[name](features, np.zeros(3, dtype=int))


@pytest.mark.parametrize("d", [10, 300])
def test_ridge_probe_matches_scikit_learn_for_every_strength(d):
    from sklearn.linear_model import RidgeClassifier

    features, labels = _blobs(n_per_class=30, d=d, separation=1.0)
    held, held_labels = _blobs(n_per_class=20, d=d, separation=1.0, seed=0)
    held = held + np.random.default_rng(9).normal(size=held.shape)  # other images of the same classes
    mean, scale = features.mean(axis=0), features.std(axis=0)
    for alpha in (0.1, 10.0, 1000.0):
        model = RidgeClassifier(alpha=alpha).fit((features - mean) / scale, labels)
        expected = (model.predict((held - mean) / scale) == held_labels).mean()
        assert ridge_probe((features, labels), (held, held_labels), (alpha,)) == pytest.approx(expected)
    # the best of several strengths
    each = [ridge_probe((features, labels), (held, held_labels), (a,)) for a in (0.1, 10.0, 1000.0)]
    assert ridge_probe((features, labels), (held, held_labels), (0.1, 10.0, 1000.0)) == max(each)


@pytest.mark.parametrize("name", ["h_score", "transrate"])
def test_with_more_features_than_images_the_labels_still_decide(name):
    """2,000 features, 160 images (a flattened block here: 2,048-16,384 values, 500 images): on
    the top principal components the labels move both scores, the feature scale does not."""
    features, labels = _blobs(n_per_class=40, d=2000, separation=0.5)
    shuffled = np.random.default_rng(1).permutation(labels)
    score = SCORES[name]
    assert score(features, labels) > score(features, shuffled) + 0.5
    assert score(features * 10.0, labels) == pytest.approx(score(features, labels), rel=1e-6)
    # what the reduction is for: the labels' share of the score is several times larger
    raw = {"dimensions": None}
    share = (score(features, labels) - score(features, shuffled)) / score(features, labels)
    raw_share = (score(features, labels, **raw) - score(features, shuffled, **raw)) / score(features, labels, **raw)
    assert share > 3 * raw_share


def test_gbc_leaves_out_a_class_with_one_image():
    features, labels = _blobs()
    lone = np.vstack([features, features[:1] + 50.0])
    assert gbc(lone, np.append(labels, 99)) == pytest.approx(gbc(lone[:-1], labels), rel=0.05)
    with pytest.raises(ValueError, match="2 classes with 2 or more images"):
        gbc(features[:3], np.array([0, 1, 2]))
