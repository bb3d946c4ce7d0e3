"""The estimator of the speed benchmarks (`speed.py`, `backends.py`,
`bayesian_cost.py`): same-round time ratios, and their one-thread setting.
NumPy only at import, so that a driver that starts one worker per backend
imports no Keras backend itself."""

import time

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


def one_thread(backend):
    """Runs `backend` ("tensorflow", "jax" or "torch") on one CPU thread, as
    the speed benchmarks time it (JAX: set `XLA_FLAGS` before importing it)."""
    if backend == "tensorflow":
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    elif backend == "torch":
        import torch

        torch.set_num_threads(1)


def interleaved_ms(calls, rounds, repeats):
    """Milliseconds of process CPU time per call of each of `calls` (a dict
    of zero-argument callables, each called once first, untimed, to trace
    and compile): `{name: [one time per round]}`, the callables taken in
    turn in each round, `repeats` calls in a burst."""
    for call in calls.values():
        call()
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            started = time.process_time()
            for _ in range(repeats):
                call()
            times[name].append((time.process_time() - started) / repeats * 1e3)
    return times
