"""The estimator of the speed benchmarks (`speed.py`, `backends.py`,
`bayesian_cost.py`): same-round time ratios. NumPy only, so that a driver
that starts one worker per backend imports no Keras backend itself."""

import numpy as np


def paired_ratio(numerator, denominator, seed=0):
    """Median over rounds of the ratio of two variants' times measured in the
    same round (two sequences, one time per round), and a 90%
    percentile-bootstrap interval of that median."""
    ratios = np.asarray(numerator) / np.asarray(denominator)
    rng = np.random.default_rng(seed)
    resampled = np.median(rng.choice(ratios, size=(4000, len(ratios))), axis=1)
    low, high = np.percentile(resampled, [5, 95])
    return float(np.median(ratios)), float(low), float(high)
