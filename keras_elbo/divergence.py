"""KL divergence between a posterior and a prior, added to the model's loss.

The distributions are the library's own (`keras_elbo.distributions`, on
every backend) or, on TensorFlow, users' TFP distributions; `_tfp` converts
TFP Gaussians so that one KL table serves both.
"""

import math
import threading
import weakref

import keras
import numpy as np

from keras_elbo import _math, _tfp
from keras_elbo import distributions as kd
from keras_elbo._base import deserialize_nested
from keras_elbo.priors import Prior

MODES = ("auto", "analytic", "mc", "mc_entropy")


def is_distribution(obj):
    """Whether `obj` is a distribution the regularizer takes: the library's
    own, or a TFP one on the TensorFlow backend."""
    return isinstance(obj, kd.Distribution) or _tfp.is_distribution(obj)


def _shape(shape):
    """A batch or event shape (a tuple, or TFP's TensorShape) as a tuple."""
    return tuple(shape) if isinstance(shape, tuple) else tuple(shape.as_list())


def closed_form_kl(q, p):
    """KL[q || p] in closed form, from the library's table (TFP Gaussians
    converted to the library's) or, between two other TFP distributions,
    TFP's. Raises `NotImplementedError` where neither has one."""
    q_lib, p_lib = _tfp.to_library(q), _tfp.to_library(p)
    if isinstance(q_lib, kd.Distribution) and isinstance(p_lib, kd.Distribution):
        return kd.kl_divergence(q_lib, p_lib)
    if _tfp.is_distribution(q) and _tfp.is_distribution(p):
        return _tfp.kl_divergence(q, p)
    raise NotImplementedError(
        f"No closed-form KL is registered between {type(q).__name__} and {type(p).__name__}."
    )


def has_closed_form_kl(q, p):
    """Whether a closed-form KL is registered between the types of `q` and `p`."""
    try:
        closed_form_kl(q, p)
    except NotImplementedError:
        return False
    return True


def has_closed_form_entropy(q):
    """Whether the distribution `q` implements `entropy()`."""
    try:
        q.entropy()
    except NotImplementedError:
        return False
    return True


def standard_normal_like(q):
    """N(0, I) with the event shape and dtype of the distribution `q`.

    A `MultivariateNormalDiag` for posteriors with one event axis (the closed
    form then applies to diagonal and full-covariance Gaussians alike), an
    elementwise `Normal` for elementwise posteriors (event shape `()`), and
    TFP's equivalents for a TFP posterior.
    """
    event_shape = _shape(q.event_shape)
    if None in event_shape:
        raise ValueError(f"The posterior's event shape must be known; got {event_shape}.")
    if _tfp.is_distribution(q):
        return _tfp.standard_normal_like(q)
    dtype = keras.backend.standardize_dtype(q.dtype)
    # NumPy constants: the distribution knows it is standard (no shift and
    # scaling of every sample in `log_prob`).
    zeros, ones = np.zeros(event_shape, dtype), np.ones(event_shape, dtype)
    if len(event_shape) == 0:
        return kd.Normal(zeros, ones)
    if isinstance(q, kd.Independent):  # the closed form is Independent's
        return kd.Independent(kd.Normal(zeros, ones), len(event_shape))
    if len(event_shape) == 1:
        return kd.MultivariateNormalDiag(zeros, ones)
    return kd.Independent(kd.Normal(zeros, ones), len(event_shape))


def default_prior_like(q):
    """The prior of `KLRegularizer(prior=None)` for the posterior `q`: for
    one-hot categorical and Bernoulli posteriors (`keras_elbo.discrete`), the
    uniform distribution of their event shape; else `standard_normal_like(q)`."""
    if isinstance(q, kd.Independent):
        inner = q.distribution
        event_shape = _shape(q.event_shape)
        for family in (kd.OneHotCategorical, kd.Bernoulli):
            if isinstance(inner, family) and None not in event_shape:
                zeros = np.zeros(event_shape, keras.backend.standardize_dtype(q.dtype))
                return kd.Independent(family(zeros), q.reinterpreted_batch_ndims)
    return standard_normal_like(q)


def _event_size(q):
    """The size of the one event axis of `q`, for a prior of unset `latent_dim`."""
    event_shape = _shape(q.event_shape)
    if len(event_shape) != 1 or event_shape[0] is None:
        raise ValueError(
            "A prior with latent_dim=None takes its size from the posterior, which "
            f"needs a known event shape of one axis; got {event_shape}. Give the "
            "prior its latent_dim."
        )
    return int(event_shape[0])


def diagonal_normal_marginals(dist):
    """The elementwise `Normal` of the dimensions of a factorised Gaussian
    with one event axis, else None: the distributions whose KL is a sum over
    latent dimensions, as free bits needs."""
    dist = _tfp.to_library(dist)
    if isinstance(dist, kd.MultivariateNormalDiag):
        return kd.Normal(dist.mean(), dist.stddev())
    if (
        isinstance(dist, kd.Independent)
        and isinstance(dist.distribution, kd.Normal)
        and dist.reinterpreted_batch_ndims == 1
    ):
        return dist.distribution
    return None


def stop_parameter_gradients(dist):
    """`dist` with every parameter behind `stop_gradient`."""
    if _tfp.is_distribution(dist):
        return _tfp.stop_parameter_gradients(dist)
    return kd.stop_parameter_gradients(dist)


def draw(dist, sample_shape, seed_generator):
    """Reparameterised samples of a library or TFP distribution."""
    if _tfp.is_distribution(dist):
        return _tfp.sample(dist, sample_shape, seed_generator)
    return dist.sample(sample_shape, seed=seed_generator)


def kl_estimate(q, p, method, samples=None, path_derivative=False, balance=None):
    """KL[q || p] by one of three estimators, with q's batch shape.

    Works alike on joint distributions and on elementwise ones (`tfd.Normal`
    marginals, giving a KL per latent dimension).

    Formula:

    ```python
    analytic:   kl = KL[q || p]                       # the registered closed form
    mc:         kl = mean_s(log q(z_s) - log p(z_s))
    mc_entropy: kl = -H[q] - mean_s(log p(z_s))       # exact entropy
    balanced:   kl = balance * KL[sg(q) || p] + (1 - balance) * KL[q || sg(p)]
    ```

    Args:
        q, p: the posterior and the prior (`keras_elbo.distributions`
            objects, or on TensorFlow TFP distributions).
        method: `"analytic"`, `"mc"` or `"mc_entropy"`.
        samples: reparameterised samples of q: one sample (q's batch and
            event shape), or several along a leading axis; unused by
            `"analytic"`. One sample is best passed as the very tensor q
            returned: a flow's distribution then gives log q(z) from its
            sampling path without inverting the flow (as TFP's bijector
            cache does for a TFP one).
        path_derivative: in `"mc"`, evaluate log q with its parameters behind
            `stop_gradient`: the gradient keeps only the path through z
            ("sticking the landing", Roeder et al., 2017). The value is
            unchanged.
        balance: `None`, or KL balancing's `alpha` in [0, 1] (Hafner et al.,
            2021): the same value, with `alpha` of the gradient reaching the
            prior (through p's parameters, the samples held fixed) and
            `1 - alpha` the posterior (through q's parameters and the
            samples, p's parameters held fixed). `sg`: stop_gradient.
    """
    if method == "analytic":
        if balance is None:
            return closed_form_kl(q, p)
        to_q = closed_form_kl(q, stop_parameter_gradients(p))
        to_p = closed_form_kl(stop_parameter_gradients(q), p)
        return balance * to_p + (1.0 - balance) * to_q
    several = len(samples.shape) > len(_shape(q.batch_shape)) + len(_shape(q.event_shape))

    def mean_over_samples(values):
        return keras.ops.mean(values, axis=0) if several else values

    if method == "mc_entropy":
        neg_entropy = -q.entropy()
    else:
        q_density = stop_parameter_gradients(q) if path_derivative else q
        neg_entropy = mean_over_samples(q_density.log_prob(samples))
    if balance is None:
        return neg_entropy - mean_over_samples(p.log_prob(samples))
    to_q = neg_entropy - mean_over_samples(stop_parameter_gradients(p).log_prob(samples))
    to_p = keras.ops.stop_gradient(neg_entropy) - mean_over_samples(
        p.log_prob(keras.ops.stop_gradient(samples))
    )
    return balance * to_p + (1.0 - balance) * to_q


def _batch_mean(terms, example_weights=None):
    """`(*batch, num_terms)` per-element KL terms to nats per example.

    The first batch axis is the batch: summed over the other batch axes
    (positions of a latent map, elements of an elementwise posterior), then
    averaged over the batch; an empty batch gives 0, not the NaN of a mean
    over nothing. With no batch axis (a Bayesian layer's weights) the terms
    are the whole KL.

    `example_weights`, a `(n,)` tensor or `None`, weighs each example's KL
    as Keras weighs a compiled loss by `sample_weight`: `sum_i w_i KL_i / N`
    over the N rows. The rows may be the n examples or K samples of each,
    sample-major (the lower posteriors of a multi-sample step): row
    `k * n + i` is weighed by `w_i`.
    """
    if len(terms.shape) == 1:
        return terms
    per_example = keras.ops.sum(terms, axis=tuple(range(1, len(terms.shape) - 1)))
    count = keras.ops.cast(keras.ops.shape(per_example)[0], per_example.dtype)
    if example_weights is not None:
        weights = keras.ops.cast(example_weights, per_example.dtype)
        samples = keras.ops.reshape(per_example, (-1, keras.ops.shape(weights)[0], terms.shape[-1]))
        per_example = samples * weights[None, :, None]
    axes = tuple(range(len(per_example.shape) - 1))
    return keras.ops.sum(per_example, axis=axes) / keras.ops.maximum(count, 1.0)


@keras.saving.register_keras_serializable(package="keras_elbo")
class KLRegularizer(keras.layers.Layer):
    """Adds `weight * KL[q(z|x) || p(z)]` to the model's loss through `add_loss`.

    Called as `kl_regularizer(z, posterior=q)`, with `z` a sample of the
    distribution `q` (a `keras_elbo.distributions` object, or on TensorFlow a
    TFP distribution): it returns `z` unchanged and records one loss, the KL
    in nats per example. The first axis of q's batch shape is the batch: the
    KL is summed over every other axis (latent dimensions, and the positions
    of a latent map of shape `(batch, h, w, latent_dim)` or of an elementwise
    `tfd.Normal` of batch shape `(batch, latent_dim)`) and averaged over the
    batch. A posterior with an empty batch shape (the weights of a Bayesian
    layer) adds its whole KL. A reconstruction loss such as `BernoulliNLL`
    given to `compile` then makes the model's `loss` the negative ELBO.
    Posterior layers such as `GaussianPosterior` call it for you; any layer of
    your own that builds a distribution can call it the same way.

    The KL is not logged by the layer itself: `keras_elbo.ELBOModel` logs the
    unweighted KL of each regularizer (named by `metric_name`), the
    reconstruction term and the negative ELBO at weight 1, in `fit` and
    `evaluate`. The layer keeps the last batch's KL and added loss in two
    non-trainable variables (`last_kl`, `last_penalty`) for that
    purpose; within an `ELBOModel` step they hold the sum over the layer's
    calls (a posterior applied at each step of a loop over time). The weight
    is held in the non-trainable variable `kl_weight`, which a callback may
    change during training (`KLAnnealing`).

    Modes:

    - `"analytic"`: the closed form registered for the pair of types in the
      library's KL table (`keras_elbo.distributions.register_kl`; on
      TensorFlow, TFP's for two TFP distributions). Raises a `ValueError`
      naming both distribution types, and `mode="mc"`, where none is.
    - `"mc"`: `mean(log q(z_s) - log p(z_s))` over `num_samples`
      reparameterised samples z_s of q, drawn in one vectorised call; with
      `num_samples=1` it reuses the sample `z` it is given.
    - `"mc_entropy"`: `-H[q] - mean(log p(z_s))`, the entropy of q exact and
      only the cross-entropy sampled; for posteriors with a closed-form
      entropy (Gaussian, diagonal or full). With a posterior narrower than
      the prior, as in a trained VAE, most of the variance of `"mc"` comes
      from `log q(z_s)`, which this removes. Measured in
      `tests/test_divergence.py` (4-d diagonal Gaussian q of scales 0.1 to
      0.5, 5-component mixture prior, 1 sample, 300 draws): the variance of
      the estimate is 3.8 (TensorFlow) to 9.5 (JAX, PyTorch) times lower
      than `"mc"`'s; the draws differ by backend. Its gradient is the
      same as `"mc"`'s, sample by sample: for a location-scale q the
      reparameterised gradient of log q(z) is already exact. Near the prior
      (scales about 1) it is the other way round: `"mc"` is better there,
      its variance 0.13 times `"mc_entropy"`'s (measured with the TFP-based
      version of this layer).
    - `"auto"`: the closed form where one is registered for the pair of
      distribution types, else `"mc_entropy"` where q has a closed-form
      entropy, else `"mc"`. Decided once per pair of types, when the layer
      first sees them (model construction), not at each step.

    Free bits (Kingma et al., 2016): with `free_bits=lam > 0`, the loss holds
    `sum_j max(lam, kl_j)` instead of the KL, with `kl_j` the batch-averaged KL
    of latent dimension j: a dimension whose KL is below `lam` nats gets no
    gradient pushing it further towards the prior, which counters posterior
    collapse. This needs a KL that is a sum over dimensions (a diagonal
    Gaussian posterior and a factorised prior); otherwise the whole KL is
    clamped at `lam * latent_dim`. On a latent map (q of batch shape
    `(batch, *positions)`, H positions), `kl_j` is dimension j's KL summed
    over the positions and its floor `lam * H`: `lam` nats per latent
    scalar. The logged `kl` metric stays the true KL,
    so with free bits `loss` is an upper bound of the negative ELBO, not the
    negative ELBO itself.

    Formula:

    ```python
    kl_j = mean_over_batch(sum_positions(KL_j[q(z|x) || p(z)]))  # per latent dim j
    kl = sum_j(kl_j)                                             # logged metric
    loss += kl_weight * sum_j(max(free_bits * H, kl_j))          # kl when free_bits=0
    # H: the positions of a latent map per example (1 for a (batch, d) posterior)
    loss += kl_weight * mean_over_batch(sum_positions(max(free_nats, KL)))  # free_nats > 0
    ```

    Args:
        prior: p(z). `None` (the default) is the standard normal of the
            posterior's shape. A prior layer (`MixturePrior`, `NormalPrior`, or
            a subclass of `Prior`) trains with the model and saves with it;
            one with `latent_dim=None` takes the posterior's event size when
            first used (see `check_posterior`). A fixed TFP distribution
            object (one that holds no `tf.Variable`) also works, but cannot
            be saved: `model.save` raises an error that names the layer to
            use instead. A TFP distribution holding variables is refused: a
            Keras 3 model does not train `tf.Variable`s it does not own; use a
            prior layer for a trainable prior. A conditional prior
            (`ConditionalGaussianPrior`, `ConditionalMixturePrior`, or a
            subclass of `ConditionalPrior`) is p(z | c) of the `prior_inputs`
            c of each call, one distribution per example.
        mode: `"auto"`, `"analytic"`, `"mc"` or `"mc_entropy"`. Defaults to
            `"auto"`.
        num_samples: Monte Carlo samples per example, a positive integer.
            Defaults to `1`.
        weight: non-negative multiplier of the KL in the loss (beta of a
            beta-VAE). Defaults to `1.0`.
        free_bits: non-negative nats per latent dimension below which the KL
            is not penalised. Defaults to `0.0` (off).
        path_derivative: use the path-derivative gradient ("sticking the
            landing", Roeder et al., 2017) where log q(z) is sampled: log q is
            evaluated with its parameters behind `stop_gradient`. Same value;
            the gradient is exactly zero when q equals p, and its variance is
            lower near the prior (19 to 45 times in the test above, scales
            about 1, by backend) but higher for a narrow posterior (100 to 200
            times, scales 0.1 to 0.5).
            With `mode="auto"` it selects `"mc"` where there is no closed
            form, instead of `"mc_entropy"`. Defaults to `False`.
        seed: seed of the Monte Carlo samples. Defaults to `None`.
        metric_name: name under which `ELBOModel` logs this KL, or `None`:
            `"kl"` when the model has one regularizer, else
            `"<posterior layer name>_kl"`. Names must differ within a model.
            Defaults to `None`.
        balance: KL balancing (Hafner et al., 2021, DreamerV2), `None` (off)
            or `alpha` in [0, 1]: the loss holds
            `alpha * KL[sg(q) || p] + (1 - alpha) * KL[q || sg(p)]`
            (`sg`: stop_gradient), the same value as the KL, with `alpha` of
            its gradient reaching the prior and `1 - alpha` the posterior; for
            a learned or conditional prior, which `alpha > 0.5` moves towards
            the posterior faster than the posterior towards it. DreamerV2
            uses 0.8. Defaults to `None`.
        free_nats: non-negative floor of each example's KL at each position
            (each step of a `(batch, time, latent_dim)` posterior, or each
            call of a layer applied in a loop over time): the loss holds
            `sum_positions(max(free_nats, KL))`, averaged over the batch, so an
            example's step whose KL is below it gets no gradient towards the
            prior (DreamerV3's free nats, 1.0 there: Hafner et al., 2023).
            Unlike `free_bits` (a floor per latent dimension of the
            batch-averaged KL), it floors the whole KL per example and step.
            The logged `kl` stays the true KL. Defaults to `0.0` (off).

    Call arguments:
        z: a sample of `posterior`, returned unchanged.
        posterior: the distribution q(z|x) (a `keras_elbo.distributions`
            object, or on TensorFlow a TFP distribution), as a keyword
            argument (Keras layers take only tensors positionally).
        posterior_layer: the layer that made `posterior`, for the prior (a
            `VampPrior` is built from it), when the regularizer is called by
            code of one's own; `None` (the default) means the posterior layer
            that holds this regularizer (see `holder`).
        prior_inputs: the tensor c of a conditional prior p(z | c)
            (`ConditionalGaussianPrior`, `ConditionalMixturePrior`), its
            leading axes q's batch axes; `None` for any other prior.
            Posterior layers pass on their own `prior_inputs`.

    Returns:
        `z`, unchanged.

    Example:

    >>> from keras_elbo.distributions import MultivariateNormalDiag
    >>> q = MultivariateNormalDiag(loc=[[1.0, 0.0]], scale_diag=[[1.0, 1.0]])
    >>> reg = KLRegularizer()
    >>> z = reg(q.sample(seed=0), posterior=q)
    >>> [round(float(loss), 4) for loss in reg.losses]  # 0.5 * 1.0**2
    [0.5]

    Reference: Kingma & Welling, 2014, "Auto-encoding variational Bayes".
    """

    def __init__(
        self,
        prior=None,
        mode: str = "auto",
        num_samples: int = 1,
        weight: float = 1.0,
        free_bits: float = 0.0,
        path_derivative: bool = False,
        seed: int | None = None,
        metric_name: str | None = None,
        balance: float | None = None,
        free_nats: float = 0.0,
        **kwargs,
    ):
        # Log-densities and KL are computed in float32 (float64 under a
        # float64 floatx), whatever the policy.
        kwargs.setdefault("dtype", _math.density_dtype())
        super().__init__(**kwargs)
        if metric_name is not None and (not isinstance(metric_name, str) or not metric_name):
            raise _math.invalid_argument("metric_name", "None or a non-empty string", metric_name)
        if prior is not None and not (isinstance(prior, Prior) or is_distribution(prior)):
            raise _math.invalid_argument(
                "prior",
                "None, a prior layer (e.g. keras_elbo.MixturePrior), a "
                "keras_elbo.distributions object or (on TensorFlow) a TFP distribution",
                prior,
            )
        if _tfp.is_distribution(prior) and prior.variables:
            raise _math.invalid_argument(
                "prior",
                "a TFP distribution without variables: a Keras 3 model does not train "
                f"the {len(prior.variables)} tf.Variable(s) this one holds. For a "
                "trainable prior use a prior layer (keras_elbo.NormalPrior, "
                "keras_elbo.MixturePrior, or a subclass of keras_elbo.Prior)",
                prior,
            )
        self.prior = prior
        self.mode = _math.choice("mode", mode, MODES)
        self.num_samples = _math.integer("num_samples", num_samples)
        self.weight = _math.real("weight", weight, non_negative=True)
        self.free_bits = _math.real("free_bits", free_bits, non_negative=True)
        self.free_nats = _math.real("free_nats", free_nats, non_negative=True)
        if self.free_bits > 0 and self.free_nats > 0:
            raise _math.invalid_argument(
                "free_nats",
                f"0 when free_bits is set (free_bits={self.free_bits}): choose one floor",
                free_nats,
            )
        self.path_derivative = _math.boolean("path_derivative", path_derivative)
        self.seed = _math.seed("seed", seed)
        if balance is not None:
            balance = _math.real("balance", balance, non_negative=True)
            if balance > 1:
                raise _math.invalid_argument("balance", "None or a number in [0, 1]", balance)
        self.balance = balance
        self.metric_name = metric_name
        self.seed_generator = _math.seed_generator(self.seed, "KLRegularizer")
        self._methods = {}  # (type(q), type(p)) -> estimator, chosen on first sight
        # Weak references to the posterior layers that hold this regularizer
        # (`attach`): not tracked, a posterior is not a sublayer of its KL.
        object.__setattr__(self, "_holders", [])
        # While `ELBOModel` traces or runs a step: its calls so far, per
        # thread (MirroredStrategy traces replicas in threads); else None.
        self._calls_in_step = None
        # Each example's weight (`sample_weight`) while `ELBOModel` steps,
        # by thread (TensorFlow's MirroredStrategy traces replicas in threads).
        self._example_weights = {}

    def build(self, input_shape=None):
        self.kl_weight = self.add_weight(
            shape=(),
            initializer=keras.initializers.Constant(self.weight),
            trainable=False,
            name="kl_weight",
        )
        # The last batch's KL and added loss, for `ELBOModel` to log. State
        # written in `call` and read in the model's `compute_loss`: unlike a
        # metric updated in `call`, this works on every backend (JAX threads
        # non-trainable variables through the step). Aggregation "none": with
        # "mean" or "sum" the assignment's cross-replica merge under
        # MirroredStrategy cuts the first replica's gradient tape.
        self.last_kl = self.add_weight(
            shape=(), initializer="zeros", trainable=False, name="last_kl"
        )
        self.last_penalty = self.add_weight(
            shape=(), initializer="zeros", trainable=False, name="last_penalty"
        )
        self.built = True

    def load_own_variables(self, store):
        # Files written before `last_kl` and `last_penalty` existed hold
        # `kl_weight` alone.
        if len(store.keys()) == 1:
            self.kl_weight.assign(store["0"])
        else:
            super().load_own_variables(store)

    def attach(self, posterior_layer):
        """Records `posterior_layer` as a layer that holds this regularizer.

        Posterior layers call it from their constructor, so that a prior built
        from the posterior layer itself (`VampPrior`) finds it without each
        call passing it.
        """
        if all(ref() is not posterior_layer for ref in self._holders):
            self._holders.append(weakref.ref(posterior_layer))

    # A method, not a property: Keras's saving walks a layer's attributes
    # for the layers it holds, and would go round the posterior's for good.
    def holder(self):
        """The posterior layer that holds this regularizer, or `None` when
        none or several do (a prior that needs it then says so)."""
        holders = [ref() for ref in self._holders]
        holders = [layer for layer in holders if layer is not None]
        return holders[0] if len(holders) == 1 else None

    @property
    def conditional(self) -> bool:
        """Whether the prior is computed from `prior_inputs` at each call
        (a `ConditionalPrior`)."""
        return isinstance(self.prior, Prior) and self.prior.conditional

    def prior_distribution(self, posterior, posterior_layer=None, prior_inputs=None):
        """p(z) as a `keras_elbo.distributions` object (or the user's TFP
        distribution, on TensorFlow), for the given posterior q(z|x); a
        conditional prior's p(z | prior_inputs). A prior layer gets
        `posterior_layer`, by default the one that holds this regularizer.

        A prior layer whose `latent_dim` is `None` (`NormalPrior()`,
        `ScaleMixturePrior()`) first gets the posterior's event size as its
        `latent_dim`, kept from then on (and in its config).
        """
        self._check_prior_inputs(prior_inputs)
        if posterior_layer is None:
            posterior_layer = self.holder()
        if self.prior is None:
            return default_prior_like(posterior)
        if isinstance(self.prior, Prior):
            if self.prior.conditional:
                return self.prior.distribution(prior_inputs, posterior_layer=posterior_layer)
            if getattr(self.prior, "latent_dim", 0) is None:
                self.prior.latent_dim = _event_size(posterior)
            return self.prior.distribution(posterior_layer=posterior_layer)
        return self.prior

    def _check_prior_inputs(self, prior_inputs):
        if self.conditional and prior_inputs is None:
            raise ValueError(
                f"The prior of KLRegularizer '{self.name}' is conditional "
                f"({type(self.prior).__name__}): p(z | c) needs the tensor c. Call the "
                "posterior layer as `posterior(features, prior_inputs=c)` (or the "
                "regularizer as `kl_regularizer(z, posterior=q, prior_inputs=c)`)."
            )
        if not self.conditional and prior_inputs is not None:
            prior = type(self.prior).__name__ if self.prior is not None else "None (N(0, I))"
            raise ValueError(
                f"KLRegularizer '{self.name}' received prior_inputs, but its prior, "
                f"{prior}, does not take any. For a prior computed from tensors of the "
                "model use a conditional prior (keras_elbo.ConditionalGaussianPrior, "
                "keras_elbo.ConditionalMixturePrior or a subclass of "
                "keras_elbo.ConditionalPrior)."
            )

    def method(self, posterior, prior):
        """The estimator `mode` resolves to for this pair of distributions."""
        key = (type(posterior), type(prior))
        if key not in self._methods:
            self._methods[key] = self._resolve_method(posterior, prior)
        return self._methods[key]

    def check_posterior(self, posterior):
        """Raises `ValueError` now if this regularizer cannot handle `posterior`.

        Posterior layers call it from `build` with an example distribution:
        a prior whose event shape differs from the posterior's, or a `mode`
        with no estimator for the pair (`"analytic"` without a closed form),
        then fails at model construction with a message naming the fix. A
        prior layer with `latent_dim=None` gets the posterior's event size as
        its `latent_dim` here (see `prior_distribution`).
        """
        if self.conditional:
            # p(z | c) exists only once c does: its size is checked now, the
            # estimator chosen at the first call.
            q_shape = _shape(posterior.event_shape)
            p_shape = tuple(self.prior.event_shape)
            if q_shape != p_shape:
                sizes = (
                    f"latent_dim={self.prior.latent_dim}"
                    if p_shape == (getattr(self.prior, "latent_dim", None),)
                    else f"event shape {p_shape}"
                )
                raise ValueError(
                    f"The prior of '{self.name}' has {sizes} but the posterior has event "
                    f"shape {q_shape}: give the prior the posterior's sizes."
                )
            return
        prior = self.prior_distribution(posterior)
        self._check_event_shapes(posterior, prior)
        self.method(posterior, prior)

    def kl_divergence(self, posterior, sample=None, prior_inputs=None):
        """KL[q || p] per example, by `mode`: shape `(batch,)`, summed over
        every other axis of q's batch shape (a scalar when it is empty)."""
        p = self.prior_distribution(posterior, prior_inputs=prior_inputs)
        terms = self._kl_terms(posterior, p, sample, per_dimension=False)
        return _math.sum_event_dims(terms[..., 0])

    def call(self, z, posterior=None, posterior_layer=None, prior_inputs=None, add_to_loss=True):
        if not is_distribution(posterior):
            raise TypeError(
                "KLRegularizer must be called as `kl_regularizer(z, posterior=q)` "
                "with q a keras_elbo.distributions object (or, on TensorFlow, a TFP "
                f"distribution). Received: posterior={posterior!r}"
            )
        p = self.prior_distribution(posterior, posterior_layer, prior_inputs)
        terms = self._kl_terms(posterior, p, z, self.free_bits > 0)
        objective = None
        example_weights = self._example_weights.get(threading.get_ident())
        if self.free_nats > 0:
            # Each example's KL at each position (time step) floored.
            per_position = keras.ops.sum(terms, axis=-1, keepdims=True)
            floored = keras.ops.maximum(per_position, self.free_nats)
            objective = keras.ops.sum(_batch_mean(floored, example_weights))
        # (num_terms,): nats per example, per term
        terms = _batch_mean(terms, example_weights)
        kl = keras.ops.sum(terms)
        if objective is None:
            objective = kl
        if self.free_bits > 0:
            # One term per latent dimension, or one for the whole KL; a term
            # stands for this many latent scalars of one example.
            positions = math.prod(_shape(posterior.batch_shape)[1:])
            per_term = positions * math.prod(_shape(posterior.event_shape)) // terms.shape[-1]
            objective = keras.ops.sum(keras.ops.maximum(terms, self.free_bits * per_term))
        penalty = keras.ops.cast(self.kl_weight, objective.dtype) * objective
        if not add_to_loss:
            # `ELBOModel(objective="iwae")` weighs log p(z) - log q(z|x) itself.
            penalty = keras.ops.zeros_like(penalty)
        else:
            self.add_loss(penalty)
        self._keep(self.last_kl, keras.ops.stop_gradient(kl))
        self._keep(self.last_penalty, keras.ops.stop_gradient(penalty))
        return z

    def _keep(self, variable, value):
        """Stores `value` in `variable`; within one `ELBOModel` step, the sum
        over this regularizer's calls (a layer applied at every step of a
        loop over time adds one KL per call, and the step's KL is their sum)."""
        calls = self._calls_in_step
        if calls is None:
            variable.assign(value)
            return
        key = (threading.get_ident(), id(variable))
        if calls.get(key, 0):
            variable.assign_add(value)
        else:
            variable.assign(value)
        calls[key] = calls.get(key, 0) + 1

    def _kl_terms(self, q, p, sample, per_dimension):
        """KL per example, shape `(*batch, terms)`: one term per latent
        dimension when `per_dimension` and the KL factorises, else one."""
        self._check_event_shapes(q, p)
        method = self.method(q, p)
        samples = None
        if method != "analytic":
            dtype = keras.backend.standardize_dtype(q.dtype)
            if self.num_samples == 1 and sample is not None:
                # The very tensor q returned (not a cast copy, where the dtype
                # already agrees): a flow posterior then has log q(z) cached.
                same = keras.backend.standardize_dtype(sample.dtype) == dtype
                samples = sample if same else keras.ops.cast(sample, dtype)
            else:
                samples = draw(q, (self.num_samples,), self.seed_generator)
        if per_dimension:
            q_dims, p_dims = diagonal_normal_marginals(q), diagonal_normal_marginals(p)
            if q_dims is not None and p_dims is not None:
                return kl_estimate(
                    q_dims, p_dims, method, samples, self.path_derivative, self.balance
                )
        return kl_estimate(q, p, method, samples, self.path_derivative, self.balance)[..., None]

    def _resolve_method(self, q, p):
        closed_form = self.mode in ("auto", "analytic") and has_closed_form_kl(q, p)
        if closed_form:
            return "analytic"
        if self.mode == "analytic":
            raise ValueError(
                "KLRegularizer(mode='analytic'): no closed-form KL is registered "
                f"between {type(q).__name__} (posterior) and {type(p).__name__} "
                "(prior). Use mode='mc' for a Monte Carlo estimate, or "
                "mode='auto' to use the closed form where one exists."
            )
        entropy = self.mode in ("auto", "mc_entropy") and has_closed_form_entropy(q)
        if entropy and not (self.mode == "auto" and self.path_derivative):
            return "mc_entropy"
        if self.mode == "mc_entropy":
            raise ValueError(
                f"KLRegularizer(mode='mc_entropy'): the posterior {type(q).__name__} "
                "has no closed-form entropy. Use mode='mc', or mode='auto'."
            )
        return "mc"

    def _check_event_shapes(self, q, p):
        q_shape, p_shape = _shape(q.event_shape), _shape(p.event_shape)
        if None not in q_shape + p_shape and q_shape != p_shape:
            raise ValueError(
                f"The prior of '{self.name}' has event shape {p_shape} but the "
                f"posterior has {q_shape}: give the prior the posterior's latent_dim."
            )

    def get_config(self):
        if is_distribution(self.prior):
            raise ValueError(
                f"KLRegularizer '{self.name}' has a distribution object "
                f"({type(self.prior).__name__}) as its prior, which cannot be "
                "saved. To save the model, use a prior layer instead: "
                "keras_elbo.NormalPrior for a fixed normal, "
                "keras_elbo.MixturePrior for a mixture of Gaussians, or a "
                "subclass of keras_elbo.Prior with a get_config."
            )
        config = super().get_config()
        config.update(
            {
                "prior": keras.saving.serialize_keras_object(self.prior),
                "mode": self.mode,
                "num_samples": self.num_samples,
                "weight": self.weight,
                "free_bits": self.free_bits,
                "path_derivative": self.path_derivative,
                "seed": self.seed,
                "metric_name": self.metric_name,
                "balance": self.balance,
                "free_nats": self.free_nats,
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        return cls(**deserialize_nested(config, "prior"))
