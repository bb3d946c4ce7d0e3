"""KL divergence between a posterior and a prior, added to the model's loss."""

import keras
import tensorflow as tf
import tensorflow_probability as tfp

from keras_elbo import _math
from keras_elbo.priors import Prior

tfd = tfp.distributions

MODES = ("auto", "analytic", "mc")


def has_closed_form_kl(q, p):
    """Whether TFP has a KL registered between the types of `q` and `p`."""
    try:
        tfd.kl_divergence(q, p)
    except NotImplementedError:
        return False
    return True


def standard_normal_like(q):
    """N(0, I) with the event shape and dtype of the distribution `q`.

    A multivariate normal for multivariate-normal posteriors (TFP registers no
    KL between `MultivariateNormalTriL` and `Independent(Normal)`), and an
    `Independent(Normal)` for any other posterior.
    """
    event_shape = q.event_shape
    if not event_shape.is_fully_defined():
        raise ValueError(f"The posterior's event shape must be known; got {event_shape}.")
    if isinstance(q, tfd.MultivariateNormalLinearOperator):
        return tfd.MultivariateNormalDiag(loc=tf.zeros(event_shape, q.dtype))
    normal = tfd.Normal(tf.zeros(event_shape, q.dtype), tf.ones(event_shape, q.dtype))
    return tfd.Independent(normal, reinterpreted_batch_ndims=len(event_shape))


def monte_carlo_kl(q, p, num_samples, seed, sample=None):
    """Monte Carlo KL[q || p]: the mean of `log q(z) - log p(z)` over samples.

    Draws `num_samples` reparameterised samples in one vectorised call; with
    `num_samples=1` and a `sample` already drawn from q, reuses that sample.
    Returns a tensor of q's batch shape.
    """
    if num_samples == 1 and sample is not None:
        z = tf.cast(sample, q.dtype)[tf.newaxis]
    else:
        z = q.sample(num_samples, seed=seed)
    return tf.reduce_mean(q.log_prob(z) - p.log_prob(z), axis=0)


@keras.saving.register_keras_serializable(package="keras_elbo")
class KLRegularizer(keras.layers.Layer):
    """Adds `weight * KL[q(z|x) || p(z)]` to the model's loss through `add_loss`.

    Called as `kl_regularizer(z, posterior=q)`, with `z` a sample of the TFP
    distribution `q`: it returns `z` unchanged and records one loss, the KL
    summed over latent dimensions and averaged over the batch (nats per
    example). A reconstruction loss such as `BernoulliNLL` given to `compile`
    then makes the model's `loss` the negative ELBO. Posterior layers such as
    `GaussianPosterior` call it for you; any layer of your own that builds a TFP
    distribution can call it the same way.

    The unweighted KL is logged as the metric `metric_name` (default `"kl"`) in
    `fit` and `evaluate`. The weight is held in the non-trainable variable
    `kl_weight`, which a callback may change during training (KL annealing).

    Modes:

    - `"analytic"`: TFP's registered closed form. Raises a `ValueError` naming
      both distribution types where none is registered.
    - `"mc"`: `mean(log q(z_s) - log p(z_s))` over `num_samples`
      reparameterised samples z_s of q, drawn in one vectorised call; with
      `num_samples=1` it reuses the sample `z` it is given.
    - `"auto"`: the closed form where one is registered for the pair of
      distribution types, else `"mc"`. Decided once per pair of types, when
      the layer first sees them (model construction), not at each step.

    Formula:

    ```python
    kl = mean_over_batch(sum_over_latent_dims(KL[q(z|x) || p(z)]))
    loss += kl_weight * kl
    ```

    Args:
        prior: p(z). `None` (the default) is the standard normal of the
            posterior's shape. A prior layer (`MixturePrior`, `NormalPrior`, or
            a subclass of `Prior`) trains with the model and saves with it. A
            TFP distribution object also trains, but cannot be saved:
            `model.save` raises an error that names the layer to use instead.
        mode: `"auto"`, `"analytic"` or `"mc"`. Defaults to `"auto"`.
        num_samples: Monte Carlo samples per example, a positive integer.
            Defaults to `1`.
        weight: non-negative multiplier of the KL in the loss (beta of a
            beta-VAE). Defaults to `1.0`.
        seed: seed of the Monte Carlo samples. Defaults to `None`.
        metric_name: name of the logged KL metric; give each regularizer of a
            model its own. Defaults to `"kl"`.

    Call arguments:
        z: a sample of `posterior`, returned unchanged.
        posterior: the TFP distribution q(z|x), as a keyword argument (Keras
            layers take only tensors positionally).

    Returns:
        `z`, unchanged.

    Example:

    >>> import tensorflow_probability as tfp
    >>> q = tfp.distributions.MultivariateNormalDiag(loc=[[1.0, 0.0]])
    >>> reg = KLRegularizer()
    >>> z = reg(q.sample(seed=(0, 0)), posterior=q)
    >>> [round(float(loss), 4) for loss in reg.losses]  # 0.5 * 1.0**2
    [0.5]

    Reference: Kingma & Welling, 2014, "Auto-encoding variational Bayes".
    """

    def __init__(
        self,
        prior: Prior | tfd.Distribution | None = None,
        mode: str = "auto",
        num_samples: int = 1,
        weight: float = 1.0,
        seed: int | None = None,
        metric_name: str = "kl",
        **kwargs,
    ):
        # Log-densities and KL are computed in float32, whatever the policy.
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if mode not in MODES:
            raise _math.invalid_argument("mode", f"one of {MODES}", mode)
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise _math.invalid_argument("num_samples", "a positive integer", num_samples)
        if not (isinstance(weight, int | float) and weight >= 0):
            raise _math.invalid_argument("weight", "a non-negative number", weight)
        if prior is not None and not isinstance(prior, Prior | tfd.Distribution):
            raise _math.invalid_argument(
                "prior",
                "None, a prior layer (e.g. keras_elbo.MixturePrior) or a TFP distribution",
                prior,
            )
        self.prior = prior
        self.mode = mode
        self.num_samples = num_samples
        self.weight = float(weight)
        self.seed = seed
        self.metric_name = metric_name
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.kl_metric = keras.metrics.Mean(name=metric_name)
        self._closed_form = {}  # (type(q), type(p)) -> bool, filled on first sight

    def build(self, input_shape=None):
        self.kl_weight = self.add_weight(
            shape=(),
            initializer=keras.initializers.Constant(self.weight),
            trainable=False,
            name="kl_weight",
        )
        self.built = True

    def prior_distribution(self, posterior):
        """p(z) as a TFP distribution, for the given posterior q(z|x)."""
        if self.prior is None:
            return standard_normal_like(posterior)
        if isinstance(self.prior, Prior):
            return self.prior.distribution()
        return self.prior

    def kl_divergence(self, posterior, sample=None):
        """KL[q || p] per example (a tensor of q's batch shape), by `mode`."""
        prior = self.prior_distribution(posterior)
        self._check_event_shapes(posterior, prior)
        if self._use_closed_form(posterior, prior):
            return tfd.kl_divergence(posterior, prior)
        return monte_carlo_kl(
            posterior, prior, self.num_samples, _math.tfp_seed(self.seed_generator), sample
        )

    def call(self, z, posterior=None):
        if not isinstance(posterior, tfd.Distribution):
            raise TypeError(
                "KLRegularizer must be called as `kl_regularizer(z, posterior=q)` "
                f"with q a TFP distribution. Received: posterior={posterior!r}"
            )
        kl = tf.reduce_mean(self.kl_divergence(posterior, sample=z))
        self.add_loss(tf.cast(self.kl_weight, kl.dtype) * kl)
        self.kl_metric.update_state(kl)
        return z

    def _use_closed_form(self, q, p):
        key = (type(q), type(p))
        if key not in self._closed_form:
            self._closed_form[key] = self.mode != "mc" and has_closed_form_kl(q, p)
            if self.mode == "analytic" and not self._closed_form[key]:
                raise ValueError(
                    "KLRegularizer(mode='analytic'): TFP has no closed-form KL "
                    f"between {type(q).__name__} (posterior) and {type(p).__name__} "
                    "(prior). Use mode='mc' for a Monte Carlo estimate, or "
                    "mode='auto' to use the closed form where one exists."
                )
        return self._closed_form[key]

    def _check_event_shapes(self, q, p):
        if q.event_shape.is_fully_defined() and p.event_shape.is_fully_defined():
            if q.event_shape != p.event_shape:
                raise ValueError(
                    f"The prior of '{self.name}' has event shape "
                    f"{tuple(p.event_shape)} but the posterior has "
                    f"{tuple(q.event_shape)}: give the prior the posterior's "
                    "latent_dim."
                )

    def get_config(self):
        if isinstance(self.prior, tfd.Distribution):
            raise ValueError(
                f"KLRegularizer '{self.name}' has a TFP distribution object "
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
                "seed": self.seed,
                "metric_name": self.metric_name,
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["prior"] = keras.saving.deserialize_keras_object(config["prior"])
        return cls(**config)
