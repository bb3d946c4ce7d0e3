"""Closed-form KL divergences: a table keyed by the pair of types, looked up
along both class hierarchies as in TFP's `kullback_leibler.py`. Each family's
module registers its own pairs at its end."""

from keras_elbo.distributions._core import Distribution, invalid_argument

_KL_TABLE = {}


def register_kl(type_q: type, type_p: type):
    """Decorator registering `fn(q, p)` as the closed form of `KL(q || p)`.

    The arguments are in the order of `kl_divergence(q, p)`. A pair is
    registered once: a second registration is a `ValueError`. Subclasses
    inherit registrations (see `kl_divergence`).

    Args:
        type_q: the class of the first argument (the posterior).
        type_p: the class of the second argument (the prior).

    Returns:
        A decorator that registers its function and returns it unchanged.

    Example:

    >>> from keras_elbo.distributions import Distribution
    >>> class Dirac(Distribution):
    ...     pass
    >>> @register_kl(Dirac, Dirac)
    ... def _kl_dirac_dirac(q, p):
    ...     return 0.0
    >>> kl_divergence(Dirac(), Dirac())
    0.0
    """
    for name, value in (("type_q", type_q), ("type_p", type_p)):
        if not isinstance(value, type):
            raise invalid_argument(name, "a class", repr(value))

    def register(fn):
        key = (type_q, type_p)
        if key in _KL_TABLE:
            raise ValueError(
                f"KL({type_q.__name__} || {type_p.__name__}) is already registered, "
                f"to {_KL_TABLE[key].__name__}; a pair of types is registered once."
            )
        _KL_TABLE[key] = fn
        return fn

    return register


def _lookup_kl(type_q, type_p):
    """The registered function nearest along both class hierarchies.

    Distance is the sum of the two positions in the method resolution
    orders; at equal distance the first found (nearest in `type_q`) wins, as
    in TFP.
    """
    best, best_distance = None, None
    for distance_q, parent_q in enumerate(type_q.__mro__):
        for distance_p, parent_p in enumerate(type_p.__mro__):
            fn = _KL_TABLE.get((parent_q, parent_p))
            distance = distance_q + distance_p
            if fn is not None and (best is None or distance < best_distance):
                best, best_distance = fn, distance
    return best


def has_closed_form_kl(q: Distribution, p: Distribution) -> bool:
    """Whether `kl_divergence(q, p)` has a registered closed form.

    Example:

    >>> from keras_elbo.distributions import Bernoulli, Normal
    >>> has_closed_form_kl(Normal(0.0, 1.0), Normal(0.0, 2.0))
    True
    >>> has_closed_form_kl(Normal(0.0, 1.0), Bernoulli(0.0))
    False
    """
    return _lookup_kl(type(q), type(p)) is not None


def kl_divergence(q: Distribution, p: Distribution):
    """The closed-form `KL(q || p) = E_q[log q(z) - log p(z)]`, of shape the batch.

    Looks the pair of types up in the table filled by `register_kl`, along
    both class hierarchies (a subclass of `Normal` uses the `Normal` form
    unless a nearer pair is registered).

    Args:
        q: a `Distribution` (the posterior).
        p: a `Distribution` (the prior), with the same event shape.

    Returns:
        The KL in nats, broadcast over both batch shapes.

    Raises:
        NotImplementedError: if no closed form is registered for the pair;
            estimate it by Monte Carlo instead.

    Example:

    >>> from keras_elbo.distributions import Normal
    >>> round(float(kl_divergence(Normal(1.0, 1.0), Normal(0.0, 1.0))), 4)  # 0.5 * 1**2
    0.5
    """
    fn = _lookup_kl(type(q), type(p))
    if fn is None:
        raise NotImplementedError(
            f"No closed-form KL divergence is registered for KL({type(q).__name__} || "
            f"{type(p).__name__}). Register one with keras_elbo.distributions.register_kl"
            f"({type(q).__name__}, {type(p).__name__}), or estimate it by Monte Carlo."
        )
    return fn(q, p)
