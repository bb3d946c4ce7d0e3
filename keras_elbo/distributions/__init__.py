"""Probability distributions written in `keras.ops`, for every Keras backend.

Small distribution objects with TensorFlow Probability's method names
(`sample`, `log_prob`, `mean`, `stddev`, `entropy`), computed with
`keras.ops` and `keras.random` only, so the same code runs on the TensorFlow,
JAX and PyTorch backends (TFP's JAX substrate breaks on current JAX, and
there is none for PyTorch). Closed-form KL divergences live in a table keyed
by the pair of types, looked up along the class hierarchy as in TFP's
`kullback_leibler.py`: `register_kl`, `kl_divergence`, `has_closed_form_kl`.

Parameters are float32 unless one of them is float64, in which case all are
float64 (on JAX only with `jax_enable_x64`). Float16 and bfloat16 parameters
(mixed precision) are computed in float32: a log-density or KL of a few
thousand nats overflows float16.

Special functions that `keras.ops` lacks are written in it (`_special.py`):
`log Gamma` and the regularised incomplete beta function (for the Student's
t CDF). Quantiles without a closed form (mixtures, Student's t) are found
with a fixed iteration count, so that they compile (XLA, `jax.jit`); they
carry no gradient.

Randomness: `sample(..., seed=...)` takes a `keras.random.SeedGenerator`
(each call draws new noise), an integer (the same draws at each call) or None
(Keras's global generator, refused inside a compiled JAX function).

The modules, by family (each registers its closed-form KL divergences at its
end, as distrax does): `_core.py` (the `Distribution` base, the
location-scale base, argument checks, seeds), `_kl.py` (the KL table),
`_gaussians.py`, `_continuous.py` (logistic, Student's t), `_discrete.py`
(Bernoulli, Poisson, categorical), `_relaxed.py` (their continuous
relaxations: Concrete, binary Concrete), `_meta.py` (mixtures,
`Independent`), `_special.py`.
"""

from keras_elbo.distributions._continuous import Logistic, StudentT
from keras_elbo.distributions._core import Distribution, stop_parameter_gradients
from keras_elbo.distributions._discrete import (
    Bernoulli,
    Categorical,
    OneHotCategorical,
    Poisson,
)
from keras_elbo.distributions._gaussians import (
    MultivariateNormalDiag,
    MultivariateNormalTriL,
    Normal,
)
from keras_elbo.distributions._kl import has_closed_form_kl, kl_divergence, register_kl
from keras_elbo.distributions._meta import Independent, MixtureSameFamily
from keras_elbo.distributions._relaxed import RelaxedBernoulli, RelaxedOneHotCategorical

__all__ = [
    "Bernoulli",
    "Categorical",
    "Distribution",
    "Independent",
    "Logistic",
    "MixtureSameFamily",
    "MultivariateNormalDiag",
    "MultivariateNormalTriL",
    "Normal",
    "OneHotCategorical",
    "Poisson",
    "RelaxedBernoulli",
    "RelaxedOneHotCategorical",
    "StudentT",
    "has_closed_form_kl",
    "kl_divergence",
    "register_kl",
    "stop_parameter_gradients",
]
