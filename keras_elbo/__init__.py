"""keras_elbo: variational inference as drop-in Keras 3 layers.

The KL term of the ELBO is added by `KLRegularizer` through `add_loss`; a
reconstruction loss from `keras_elbo.losses` given to `compile` closes the
ELBO, and `model.fit` trains it. Every loss is in nats per example: summed
over event dimensions, averaged over the batch.
"""

from keras_elbo._quiet import quiet_demo_start

quiet_demo_start()

import keras  # noqa: E402

# Every module computes with `keras.ops` and `keras.random`, and runs on
# TensorFlow, JAX and PyTorch; TensorFlow Probability is imported only where a
# user's program already did (keras_elbo/_tfp.py).
from keras_elbo.bayesian import (
    BayesianConv1D,
    BayesianConv2D,
    BayesianConv3D,
    BayesianDense,
    DenseVariational,
)
from keras_elbo.calibration import (
    BrierScore,
    ExpectedCalibrationError,
    brier_score,
    classification_nll,
    coverage_calibration_error,
    expected_calibration_error,
    fit_temperature,
    gaussian_predictive_nll,
    interval_coverage,
    reliability_diagram,
)
from keras_elbo.callbacks import (
    CyclicalAnnealing,
    ExponentialDecay,
    KLAnnealing,
    LinearWarmup,
    TemperatureAnnealing,
)
from keras_elbo.discrete import (
    BernoulliPosterior,
    BernoulliPrior,
    CategoricalPosterior,
    CategoricalPrior,
    ConditionalCategoricalPrior,
)
from keras_elbo.distributed import fold_in_seeds
from keras_elbo.divergence import KLRegularizer
from keras_elbo.evaluation import evaluate_elbo, importance_weighted_log_likelihood
from keras_elbo.flows import MADE, FlowPosterior, InverseAutoregressiveFlow
from keras_elbo.losses import BernoulliNLL, GaussianNLL, bernoulli_nll, gaussian_nll
from keras_elbo.model import ELBOModel, _FunctionalELBOModel
from keras_elbo.outputs import (
    Categorical,
    IndependentBernoulli,
    IndependentLogistic,
    IndependentNormal,
    IndependentPoisson,
    IndependentStudentT,
    MixtureLogistic,
    MixtureNormal,
    MultivariateNormalTriL,
    OneHotCategorical,
)
from keras_elbo.posteriors import GaussianPosterior, Posterior
from keras_elbo.predictive import predictive_moments
from keras_elbo.priors import (
    ConditionalGaussianPrior,
    ConditionalMixturePrior,
    ConditionalPrior,
    MixturePrior,
    NormalPrior,
    Prior,
    ScaleMixturePrior,
    VampPrior,
)
from keras_elbo.weight_posteriors import FullCovarianceWeights, MeanFieldWeights

__version__ = "0.1.0"

__all__ = [
    "BayesianConv1D",
    "BayesianConv2D",
    "BayesianConv3D",
    "BayesianDense",
    "BernoulliNLL",
    "BernoulliPosterior",
    "BernoulliPrior",
    "BrierScore",
    "Categorical",
    "CategoricalPosterior",
    "CategoricalPrior",
    "ConditionalCategoricalPrior",
    "ConditionalGaussianPrior",
    "ConditionalMixturePrior",
    "ConditionalPrior",
    "CyclicalAnnealing",
    "DenseVariational",
    "ELBOModel",
    "ExponentialDecay",
    "ExpectedCalibrationError",
    "FlowPosterior",
    "FullCovarianceWeights",
    "GaussianNLL",
    "GaussianPosterior",
    "IndependentBernoulli",
    "IndependentLogistic",
    "IndependentNormal",
    "IndependentPoisson",
    "IndependentStudentT",
    "InverseAutoregressiveFlow",
    "KLAnnealing",
    "KLRegularizer",
    "LinearWarmup",
    "MADE",
    "MeanFieldWeights",
    "MixtureLogistic",
    "MixtureNormal",
    "MixturePrior",
    "MultivariateNormalTriL",
    "NormalPrior",
    "OneHotCategorical",
    "Posterior",
    "Prior",
    "ScaleMixturePrior",
    "TemperatureAnnealing",
    "VampPrior",
    "__version__",
    "bernoulli_nll",
    "brier_score",
    "classification_nll",
    "coverage_calibration_error",
    "custom_objects",
    "evaluate_elbo",
    "expected_calibration_error",
    "fit_temperature",
    "fold_in_seeds",
    "gaussian_nll",
    "gaussian_predictive_nll",
    "importance_weighted_log_likelihood",
    "interval_coverage",
    "predictive_moments",
    "reliability_diagram",
]

_SERIALIZABLE = [
    BayesianConv1D,
    BayesianConv2D,
    BayesianConv3D,
    BayesianDense,
    BernoulliNLL,
    BernoulliPosterior,
    BernoulliPrior,
    BrierScore,
    Categorical,
    CategoricalPosterior,
    CategoricalPrior,
    ConditionalCategoricalPrior,
    ConditionalGaussianPrior,
    ConditionalMixturePrior,
    DenseVariational,
    ExpectedCalibrationError,
    FlowPosterior,
    FullCovarianceWeights,
    GaussianNLL,
    GaussianPosterior,
    IndependentBernoulli,
    IndependentLogistic,
    IndependentNormal,
    IndependentPoisson,
    IndependentStudentT,
    KLRegularizer,
    MADE,
    MeanFieldWeights,
    MixtureLogistic,
    MixtureNormal,
    MixturePrior,
    MultivariateNormalTriL,
    NormalPrior,
    OneHotCategorical,
    ScaleMixturePrior,
    VampPrior,
    _FunctionalELBOModel,  # what ELBOModel(inputs, outputs) returns and saves
]


def custom_objects():
    """The dict to pass to `keras.saving.load_model(..., custom_objects=...)`.

    Every class is also registered with Keras under the package name
    `keras_elbo`, so after `import keras_elbo` a model loads without it too.

    Example:

    >>> custom_objects()["keras_elbo>GaussianPosterior"].__name__
    'GaussianPosterior'
    """
    # Keys are the registered names (`package>Class`), which is what a saved
    # `.keras` config records and what `load_model` looks up.
    return {keras.saving.get_registered_name(cls): cls for cls in _SERIALIZABLE}
