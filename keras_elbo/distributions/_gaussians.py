"""The Gaussians: `Normal`, `MultivariateNormalDiag`, `MultivariateNormalTriL`,
and the closed-form KL divergences between them."""

import math

from keras import ops

from keras_elbo import _backend
from keras_elbo.distributions._core import (
    Distribution,
    LocationScale,
    as_float,
    broadcast_batch,
    cast,
    check_rank,
    invalid_argument,
    is_constant,
    runtime_shape,
    static_shape,
)
from keras_elbo.distributions._kl import register_kl
from keras_elbo.distributions._special import (
    HALF_LOG_2PI,
    erfc,
    log_abs_diagonal,
    solve_lower,
)


class Normal(LocationScale):
    """Elementwise normal distributions, `N(loc, scale**2)`; event shape `()`.

    Formula:

    ```python
    log_prob(x) = -0.5 * ((x - loc) / scale)**2 - log(scale) - 0.5 * log(2 * pi)
    entropy() = 0.5 + 0.5 * log(2 * pi) + log(scale)
    cdf(x) = 0.5 * erfc(-(x - loc) / (scale * sqrt(2)))
    quantile(p) = loc + scale * sqrt(2) * erfinv(2 * p - 1)
    sample() = loc + scale * eps,  eps ~ N(0, 1)   # reparameterised
    ```

    In float32, `2 * p - 1` rounds for `p` within ~1e-7 of 0 or 1, so
    quantiles of such extreme `p` lose accuracy (TFP's `ndtri` does better).

    Args:
        loc: the mean, a tensor broadcastable against `scale`.
        scale: the standard deviation, positive.

    Example:

    >>> d = Normal(loc=0.0, scale=2.0)
    >>> round(float(d.log_prob(0.0)), 4)  # -log(2) - 0.5 * log(2 * pi)
    -1.6121
    >>> tuple(Normal([0.0, 1.0], 1.0).sample(5, seed=1).shape)
    (5, 2)
    """

    def __init__(self, loc, scale):
        super().__init__(loc, scale)

    def _standard_sample(self, shape, seed):
        return _backend.standard_normal(shape, self.dtype, seed)

    def _log_unnormalized(self, z):
        return -0.5 * ops.square(z)

    def _log_normalizer(self):
        return HALF_LOG_2PI

    def stddev(self):
        return self._scale

    def entropy(self):
        return 0.5 + HALF_LOG_2PI + ops.log(self._scale)

    def _standard_cdf(self, z):
        return 0.5 * erfc(-z * math.sqrt(0.5))

    def _standard_quantile(self, p):
        return math.sqrt(2.0) * ops.erfinv(2.0 * p - 1.0)


class MultivariateNormalDiag(Distribution):
    """Gaussians with diagonal covariance, `N(loc, diag(scale_diag**2))`.

    Event shape `(d,)`: `log_prob` and `entropy` sum the `Normal` terms over
    the last axis. Sampling is reparameterised.

    Args:
        loc: the mean, shape `(..., d)`.
        scale_diag: the standard deviations, positive, broadcastable
            against `loc`, at least 1-D.

    Example:

    >>> d = MultivariateNormalDiag(loc=[0.0, 0.0], scale_diag=[1.0, 2.0])
    >>> round(float(d.entropy()), 4)  # 2 * (0.5 + 0.5 * log(2 * pi)) + log(2)
    3.531
    >>> tuple(d.sample((4, 3), seed=1).shape)
    (4, 3, 2)
    """

    reparameterized = True
    _shape_source = "loc"
    _event_ndims = 1

    def __init__(self, loc, scale_diag):
        standard = is_constant(loc, 0.0) and is_constant(scale_diag, 1.0)
        loc, scale_diag = as_float(loc=loc, scale_diag=scale_diag)
        check_rank("loc", loc, 1, "a tensor of rank >= 1, shape (..., d)")
        check_rank("scale_diag", scale_diag, 1, "a tensor of rank >= 1, shape (..., d)")
        # The event axis broadcasts too (a scalar scale for every coordinate).
        self._marginals = Normal(*broadcast_batch(loc=(loc, 0), scale_diag=(scale_diag, 0)))
        self._marginals._standard = standard

    @property
    def loc(self):
        return self._marginals.loc

    @property
    def scale_diag(self):
        return self._marginals.scale

    def _sample(self, sample_shape, seed):
        return self._marginals._sample(sample_shape, seed)

    def log_prob(self, x):
        # The marginals' log-densities summed, with the sum taken before the
        # constant terms are added: on the parameters' shape, not on that of
        # many samples (the Monte Carlo KL's cost, benchmarks/kl_cost.py).
        z = self._marginals._standardized(x)
        constant = ops.sum(self._marginals._log_scale() + HALF_LOG_2PI, axis=-1)
        return -0.5 * ops.sum(ops.square(z), axis=-1) - constant

    def mean(self):
        return self._marginals.mean()

    def stddev(self):
        return self._marginals.stddev()

    def covariance(self):
        """The (diagonal) covariance matrix, `batch_shape + (d, d)`."""
        variance = self.variance()
        return variance[..., None] * ops.eye(static_shape(variance)[-1], dtype=self.dtype)

    def entropy(self):
        return ops.sum(self._marginals.entropy(), axis=-1)


class MultivariateNormalTriL(Distribution):
    """Gaussians `N(loc, scale_tril @ scale_tril.T)` with a lower-triangular scale.

    Only the lower triangle of `scale_tril` is read (as in TFP); its diagonal
    must be non-zero (the sign does not matter: `L` and `L` with a column
    negated give the same covariance). Event shape `(d,)`.

    Formula:

    ```python
    z = solve_triangular(scale_tril, x - loc, lower=True)
    log_prob(x) = -0.5 * sum(z**2) - sum(log(abs(diag(scale_tril)))) - 0.5 * d * log(2 * pi)
    entropy() = 0.5 * d * (1 + log(2 * pi)) + sum(log(abs(diag(scale_tril))))
    sample() = loc + scale_tril @ eps,  eps ~ N(0, I)   # reparameterised
    ```

    Args:
        loc: the mean, shape `(..., d)`.
        scale_tril: the Cholesky factor of the covariance, shape `(..., d, d)`.

    Example:

    >>> d = MultivariateNormalTriL(loc=[0.0, 0.0], scale_tril=[[1.0, 0.0], [1.0, 1.0]])
    >>> [round(float(s), 4) for s in d.stddev()]  # sqrt of diag(L @ L.T) = [1, 2]
    [1.0, 1.4142]
    >>> round(float(d.log_prob([0.0, 0.0])), 4)  # -log(2 * pi), det(L) = 1
    -1.8379
    """

    reparameterized = True
    _shape_source = "_loc"
    _event_ndims = 1

    def __init__(self, loc, scale_tril):
        loc, scale_tril = as_float(loc=loc, scale_tril=scale_tril)
        check_rank("loc", loc, 1, "a tensor of rank >= 1, shape (..., d)")
        expected = f"a tensor of shape (..., d, d) with d = {static_shape(loc)[-1]} (from `loc`)"
        check_rank("scale_tril", scale_tril, 2, expected)
        sizes = {static_shape(loc)[-1], *static_shape(scale_tril)[-2:]} - {None}
        if len(sizes) > 1:
            raise invalid_argument(
                "scale_tril", expected, f"a tensor of shape {static_shape(scale_tril)}"
            )
        self._loc, self._scale_tril = broadcast_batch(
            loc=(loc, 1), scale_tril=(ops.tril(scale_tril), 2)
        )

    @property
    def loc(self):
        return self._loc

    @property
    def scale_tril(self):
        return self._scale_tril

    def _sample(self, sample_shape, seed):
        shape = sample_shape + runtime_shape(self._loc, self._scale_tril[..., 0])
        eps = _backend.standard_normal(shape, self.dtype, seed)
        sample = self._loc + ops.squeeze(ops.matmul(self._scale_tril, eps[..., None]), axis=-1)
        self._last_draw = (sample, eps)
        return sample

    def log_prob(self, x):
        # Of its own sample, the noise it was drawn from, not a triangular
        # solve, which loses every digit in float32 once the off-diagonal
        # entries of a large scale outgrow its diagonal (a Monte Carlo KL of
        # 102 weights then read -1e33 and training diverged). Same value and
        # gradient, as for `Normal`.
        z = self._own_noise(x)
        if z is None:
            diff = cast(x, self.dtype) - self._loc
            z = solve_lower(self._scale_tril, diff[..., None])[..., 0]
        d = self.event_shape[0]
        log_det = ops.sum(log_abs_diagonal(self._scale_tril), axis=-1)
        return -0.5 * ops.sum(ops.square(z), axis=-1) - log_det - d * HALF_LOG_2PI

    def mean(self):
        return self._loc

    def stddev(self):
        # Var(x_i) = (L @ L.T)_ii = sum_j L_ij**2.
        return ops.sqrt(self.variance())

    def variance(self):
        return ops.sum(ops.square(self._scale_tril), axis=-1)

    def covariance(self):
        """The covariance matrix `L @ L.T`, `batch_shape + (d, d)`."""
        return ops.matmul(self._scale_tril, ops.swapaxes(self._scale_tril, -1, -2))

    def entropy(self):
        d = self.event_shape[0]
        log_det = ops.sum(log_abs_diagonal(self._scale_tril), axis=-1)
        return d * (0.5 + HALF_LOG_2PI) + log_det


@register_kl(Normal, Normal)
def _kl_normal_normal(q, p):
    """Elementwise; written as in distrax so it stays accurate when q is close to p:

    ```python
    log_ratio = log(q.scale) - log(p.scale)
    kl = 0.5 * ((q.loc - p.loc) / p.scale)**2 + 0.5 * expm1(2 * log_ratio) - log_ratio
    ```
    """
    p_shape, q_shape = static_shape(p.loc), static_shape(q.loc)
    broadcasts_into_q = len(p_shape) <= len(q_shape) and all(
        n == 1 or n == m for n, m in zip(p_shape[::-1], q_shape[::-1], strict=False)
    )
    if p._standard and broadcasts_into_q:  # N(0, 1), the default prior: no shift, no scaling
        log_ratio, z = ops.log(q.scale), q.loc
    else:
        log_ratio, z = ops.log(q.scale) - ops.log(p.scale), (q.loc - p.loc) / p.scale
    return 0.5 * ops.square(z) + 0.5 * ops.expm1(2.0 * log_ratio) - log_ratio


@register_kl(MultivariateNormalDiag, MultivariateNormalDiag)
def _kl_diag_diag(q, p):
    """The `Normal` KL summed over the event axis."""
    return ops.sum(_kl_normal_normal(q._marginals, p._marginals), axis=-1)


def _kl_gaussians(loc_q, trace, loc_p, solve_p, log_det_q, log_det_p, d):
    """`0.5 * (trace + |solve_p(loc_p - loc_q)|**2 - d + 2 * (log_det_p - log_det_q))`.

    `trace = tr(Sigma_p^-1 Sigma_q)`, `solve_p(v) = L_p^-1 v` (batched
    over the last axis of `v`), `log_det_* = log|det L_*|`.
    """
    mahalanobis = ops.sum(ops.square(solve_p(loc_p - loc_q)), axis=-1)
    return 0.5 * (trace + mahalanobis - d) + log_det_p - log_det_q


@register_kl(MultivariateNormalTriL, MultivariateNormalDiag)
def _kl_tril_diag(q, p):
    """`tr(Sigma_p^-1 Sigma_q) = sum((L_q / scale_p[:, None])**2)`; no solve needed."""
    scale_p = p.scale_diag
    trace = ops.sum(ops.square(q.scale_tril / scale_p[..., None]), axis=(-2, -1))
    return _kl_gaussians(
        q.loc,
        trace,
        p.loc,
        lambda v: v / scale_p,
        ops.sum(log_abs_diagonal(q.scale_tril), axis=-1),
        ops.sum(ops.log(scale_p), axis=-1),
        q.event_shape[0],
    )


def _kl_to_tril(loc_q, tril_q, log_det_q, d, p):
    """KL to a `MultivariateNormalTriL` p: `tr = |L_p^-1 L_q|_F**2` by a triangular solve."""
    tril_p = p.scale_tril
    trace = ops.sum(ops.square(solve_lower(tril_p, tril_q)), axis=(-2, -1))
    return _kl_gaussians(
        loc_q,
        trace,
        p.loc,
        lambda v: solve_lower(tril_p, v[..., None])[..., 0],
        log_det_q,
        ops.sum(log_abs_diagonal(tril_p), axis=-1),
        d,
    )


@register_kl(MultivariateNormalTriL, MultivariateNormalTriL)
def _kl_tril_tril(q, p):
    log_det_q = ops.sum(log_abs_diagonal(q.scale_tril), axis=-1)
    return _kl_to_tril(q.loc, q.scale_tril, log_det_q, q.event_shape[0], p)


@register_kl(MultivariateNormalDiag, MultivariateNormalTriL)
def _kl_diag_tril(q, p):
    d = q.event_shape[0]
    # diag(scale_q) as a matrix: eye * scale_q broadcast along the rows.
    tril_q = ops.eye(d, dtype=q.dtype) * q.scale_diag[..., None, :]
    log_det_q = ops.sum(ops.log(q.scale_diag), axis=-1)
    return _kl_to_tril(q.loc, tril_q, log_det_q, d, p)
