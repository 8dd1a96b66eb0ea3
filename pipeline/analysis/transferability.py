"""Transferability scores: how well a block's frozen features suit the labels, from one forward pass.

Each function takes features (n, d) and integer labels (n,) and returns one float, higher = better
suited. Pure numpy / scikit-learn, float64 throughout. What each score measures and where its
formula comes from (the published reference implementations were read, not copied):

- `logme`: the log marginal likelihood (evidence) of Bayesian linear regression from the features
  to each one-hot label column, maximised over the prior and noise precisions, per image, averaged
  over classes (You et al., ICML 2021). A linear-fit score: it says nothing about fine-tuning.
- `h_score`: tr(cov(f)^-1 cov(E[f|y])), the between-class share of the feature covariance, with the
  covariance shrunk by Ledoit-Wolf (Bao et al. 2019; the shrinkage of Ibrahim et al. 2022).
- `transrate`: the coding rate of the features minus the mean coding rate within each class
  (Huang et al., ICML 2022): features that spread overall but compress per class transfer.
- `gbc`: minus the summed Bhattacharyya overlap of per-class spherical Gaussians (Pandy et al.,
  CVPR 2022): classes that overlap in feature space are hard to separate.
- `ridge_probe`: the validation accuracy of a ridge classifier (a linear probe).

H-score, TransRate and GBC work on the top PCA_DIMENSIONS principal components, so that sources
of 512 and of 16,384 values compare on one footing.
"""

from __future__ import annotations

import numpy as np

LOGME_MAX_ITERATIONS = 1000  # the reference stops after 11; each step costs O(rank), so run to the fixed point
LOGME_TOLERANCE = 1e-10  # relative change of alpha / beta that ends the iteration
TRANSRATE_EPS = 1e-4  # distortion of the coding rate (the paper's appendix value)
# H-score, TransRate and GBC score the top PCA components (GBC's reference setting): with more
# features than images (a block flattened: 2,048-16,384 values for 500 images) the first two would
# measure the feature scale and the image count, not the labels (tests/test_transferability.py)
PCA_DIMENSIONS = 64
VARIANCE_FLOOR = 1e-4  # relative to the mean variance: a (near) constant class still gets a Gaussian


def _checked(features: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float64 features, labels, the classes present; ValueError on shapes a score cannot use."""
    features = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels)
    if features.ndim != 2 or labels.shape != (len(features),):
        raise ValueError(f"need features (n, d) and labels (n,); got {features.shape} and {labels.shape}")
    classes = np.unique(labels)
    if len(classes) < 2:
        raise ValueError(f"need at least 2 classes to score transferability; got {len(classes)}")
    if not np.isfinite(features).all():
        raise ValueError("features hold NaN or infinite values")
    return features, labels, classes


def logme_evidence(sigma: np.ndarray, x2: np.ndarray, residual: float, n: int, d: int) -> tuple[float, float, float]:
    """(evidence per sample, alpha, beta) of one target column at the fixed point of MacKay's updates.

    `sigma`: the nonzero squared singular values of the features (k of them), `x2`: the squared
    projections of the target on the matching left singular vectors, `residual`: the target's
    squared norm outside their span. The prior N(0, alpha^-1 I_d) and noise precision beta start at
    1 and follow gamma = sum(sigma / (sigma + alpha/beta)), alpha = gamma / |m|^2,
    beta = (n - gamma) / |y - F m|^2. The log-determinant counts the d - k zero eigenvalues of
    F^T F as log(alpha) each, which makes this the exact evidence log N(y; 0, I/beta + F F^T/alpha)
    / n (the reference code drops that term when d exceeds the rank; `tests` check the identity)."""
    alpha, beta = 1.0, 1.0
    for _ in range(LOGME_MAX_ITERATIONS):
        t = alpha / beta
        gamma = float((sigma / (sigma + t)).sum())
        m2 = float((sigma * x2 / (t + sigma) ** 2).sum())
        res2 = float((x2 / (1 + sigma / t) ** 2).sum()) + residual
        alpha, beta = gamma / (m2 + 1e-12), (n - gamma) / (res2 + 1e-12)
        if abs(alpha / beta - t) / t <= LOGME_TOLERANCE:
            break
    t = alpha / beta  # the weights' norm and the residual at the final precisions
    m2 = float((sigma * x2 / (t + sigma) ** 2).sum())
    res2 = float((x2 / (1 + sigma / t) ** 2).sum()) + residual
    log_det = float(np.log(alpha + beta * sigma).sum()) + (d - len(sigma)) * np.log(alpha)
    evidence = (
        d / 2 * np.log(alpha)
        + n / 2 * np.log(beta)
        - log_det / 2
        - beta / 2 * res2
        - alpha / 2 * m2
        - n / 2 * np.log(2 * np.pi)
    )
    return float(evidence / n), alpha, beta


def left_singular(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(U, squared singular values) of the n x d features, largest first, numerical rank only.
    With more features than rows, from the eigendecomposition of the n x n Gram matrix (a block's
    16,384 flattened values cost an n x n problem, not an SVD of n x 16,384)."""
    n, d = features.shape
    if d > n:
        sigma, u = np.linalg.eigh(features @ features.T)
        sigma, u = sigma[::-1], u[:, ::-1]
    else:
        u, s, _ = np.linalg.svd(features, full_matrices=False)
        sigma = s**2
    keep = sigma > sigma.max() * max(n, d) * np.finfo(np.float64).eps
    return u[:, keep], sigma[keep]


def principal_scores(features: np.ndarray, dimensions: int | None) -> np.ndarray:
    """The centred features projected on their top `dimensions` principal axes (fewer when the
    data has fewer; each axis's sign is arbitrary); None: the centred features themselves."""
    if dimensions is None:
        return features - features.mean(axis=0)
    u, sigma = left_singular(features - features.mean(axis=0))
    return u[:, :dimensions] * np.sqrt(sigma[:dimensions])


def logme(features: np.ndarray, labels: np.ndarray) -> float:
    """LogME: the mean over classes of the maximised evidence per image of the class's 0/1 column."""
    features, labels, classes = _checked(features, labels)
    n, d = features.shape
    u, sigma = left_singular(features)
    evidences = []
    for label in classes:
        y = (labels == label).astype(np.float64)
        x2 = (u.T @ y) ** 2
        evidences.append(logme_evidence(sigma, x2, max(float(y @ y - x2.sum()), 0.0), n, d)[0])
    return float(np.mean(evidences))


def ledoit_wolf(gram: np.ndarray, n_features: int) -> tuple[float, float]:
    """(shrinkage, mu) of scikit-learn's Ledoit-Wolf estimate, (1 - a) S + a mu I with
    S = X^T X / n, from the Gram matrix X X^T of the centred rows alone: every term it needs
    (tr S, the rows' squared norms, |X^T X|_F = |X X^T|_F) is a function of the Gram matrix, so a
    block's 16,384 features cost no 16,384 x 16,384 matrix."""
    n = len(gram)
    norms = np.diag(gram)
    trace = norms.sum() / n
    mu = trace / n_features
    delta_ = (gram**2).sum() / n**2
    beta = ((norms**2).sum() / n - delta_) / (n_features * n)
    delta = (delta_ - 2 * mu * trace + n_features * mu**2) / n_features
    beta = min(beta, delta)
    return (0.0 if beta == 0 else float(beta / delta)), float(mu)


def h_score(features: np.ndarray, labels: np.ndarray, dimensions: int | None = PCA_DIMENSIONS) -> float:
    """Regularised H-score: (1 - a) tr(S_a^-1 C_between), S_a the Ledoit-Wolf covariance of the
    features' top `dimensions` principal components (None: all features; shrinkage a estimated
    from the data), C_between the covariance of each image's class mean. Unchanged by scaling the
    features; without shrinkage (a = 0) the plain H-score tr(S^+ C_between).

    Computed in the n x n Gram space: with K = X X^T of the centred rows, P the class-averaging
    matrix and lambda = n a mu / (1 - a), Woodbury's identity gives
    (1 - a) / (a mu) * (tr(P K) - tr((K + lambda I)^-1 K P K)) / n; at a = 0, tr(K K^+ P)."""
    features, labels, classes = _checked(features, labels)
    centred = principal_scores(features, dimensions)
    n, d = centred.shape
    gram = centred @ centred.T
    members = (labels[:, None] == classes[None, :]).astype(np.float64)
    averaging = members @ (members / members.sum(axis=0)).T  # P: row i averages i's class
    shrinkage, mu = ledoit_wolf(gram, d)
    if shrinkage >= 1:
        return 0.0
    if shrinkage == 0:
        return float(np.trace(gram @ np.linalg.pinv(gram, hermitian=True) @ averaging))
    ridge = n * shrinkage * mu / (1 - shrinkage)
    kp = gram @ averaging
    inner = np.linalg.solve(gram + ridge * np.eye(n), kp @ gram)
    return float((1 - shrinkage) / (shrinkage * mu) * (np.trace(kp) - np.trace(inner)) / n)


def coding_rate(features: np.ndarray, eps: float = TRANSRATE_EPS) -> float:
    """0.5 log det(I + Z^T Z / (n eps)): the bits to code the n rows of Z up to distortion eps."""
    n, d = features.shape
    gram = features @ features.T if n < d else features.T @ features  # same nonzero spectrum
    _, log_det = np.linalg.slogdet(np.eye(len(gram)) + gram / (n * eps))
    return float(log_det / 2)


def transrate(
    features: np.ndarray, labels: np.ndarray, eps: float = TRANSRATE_EPS, dimensions: int | None = PCA_DIMENSIONS
) -> float:
    """TransRate: the coding rate of the features minus the mean over classes of each class's
    coding rate (rows of the globally centred features; every class weighs the same). The features
    are the top `dimensions` principal components with each row scaled to unit length, then
    centred (the authors' code normalises rows too): the rate is then free of the feature scale."""
    features, labels, classes = _checked(features, labels)
    reduced = principal_scores(features, dimensions)
    norms = np.linalg.norm(reduced, axis=1, keepdims=True)
    reduced = reduced / np.where(norms > 0, norms, 1.0)
    centred = reduced - reduced.mean(axis=0)
    within = np.mean([coding_rate(centred[labels == label], eps) for label in classes])
    return coding_rate(centred, eps) - float(within)


def gbc(features: np.ndarray, labels: np.ndarray, dimensions: int = PCA_DIMENSIONS) -> float:
    """Gaussian Bhattacharyya coefficient: -sum over ordered class pairs of exp(-D_B), D_B the
    Bhattacharyya distance of the two classes' spherical Gaussians in the top `dimensions` PCA
    components (fewer when the data has fewer). 0 for classes that never overlap, -C(C-1) for
    identical ones. The log-determinant term counts all k dimensions (the exact distance between
    spherical Gaussians; the reference code adds it once). A class with a single image has no
    variance to estimate and is left out."""
    features, labels, classes = _checked(features, labels)
    reduced = principal_scores(features, dimensions)
    k = reduced.shape[1]
    classes = [c for c in classes if (labels == c).sum() >= 2]
    if len(classes) < 2:
        raise ValueError("GBC needs at least 2 classes with 2 or more images each")
    floor = VARIANCE_FLOOR * max(float(reduced.var(axis=0).mean()), np.finfo(np.float64).tiny)
    means = np.stack([reduced[labels == c].mean(axis=0) for c in classes])
    variances = np.array([max(reduced[labels == c].var(axis=0).mean(), floor) for c in classes])
    total = 0.0
    for i in range(len(classes)):
        for j in range(len(classes)):
            if i != j:
                average = (variances[i] + variances[j]) / 2
                distance = ((means[i] - means[j]) ** 2).sum() / (8 * average) + k / 2 * (
                    np.log(average) - 0.5 * np.log(variances[i]) - 0.5 * np.log(variances[j])
                )
                total += np.exp(-distance)
    return float(-total)


def ridge_probe(
    train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray], alphas: tuple[float, ...]
) -> float:
    """Best validation accuracy over `alphas` of scikit-learn's RidgeClassifier (targets +-1 per
    class, an intercept) on features standardised with the training statistics. One
    decomposition serves every alpha: with X = U S V^T, the validation scores are
    X_val X^T U diag(1 / (s^2 + alpha)) U^T Y + mean(Y)."""
    (x, y), (x_val, y_val) = train, val
    x, y, classes = _checked(x, y)
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale[scale == 0] = 1.0  # a constant feature stays 0
    x, x_val = (x - mean) / scale, (np.asarray(x_val, dtype=np.float64) - mean) / scale
    targets = np.where(y[:, None] == classes[None, :], 1.0, -1.0)
    offset = targets.mean(axis=0)
    u, sigma = left_singular(x)
    projected, coefficients = x_val @ (x.T @ u), u.T @ (targets - offset)
    best = 0.0
    for alpha in alphas:
        scores = projected @ (coefficients / (sigma + alpha)[:, None]) + offset
        best = max(best, float((classes[scores.argmax(axis=1)] == np.asarray(y_val)).mean()))
    return best
