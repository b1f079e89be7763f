"""Statistics of the runs, pure functions of plain values: the probe's share near the bounds and its modes, the
seeds' results at the last step they all reached, the aggregate's IQM with its interval, and the gap between curves.
"""

import math
import statistics
import warnings

import numpy as np

NEAR_BOUND, MODE_BANDWIDTH, MODE_PROMINENCE = 0.05, 0.1, 0.2  # the probe statistics' parameters (README, Results)


def near_bounds(values, counts, within=NEAR_BOUND):
    """The share of the samples within `within` of -1 or +1."""
    return counts[np.abs(values) >= 1.0 - within].sum() / counts.sum()


def count_modes(values, counts, bandwidth=MODE_BANDWIDTH, min_prominence=MODE_PROMINENCE):
    """The modes of a distribution on [-1, 1] given as (value, count) points: the local maxima of its Gaussian kernel
    density estimate (bandwidth in action units, on a grid of step 0.01, zero outside [-1, 1] so that a pile of
    samples at a bound is a mode) that rise at least min_prominence of the highest maximum above their surroundings
    (scipy's topographic prominence)."""
    from scipy.signal import find_peaks

    grid = np.linspace(-1.0, 1.0, 201)
    density = (counts * np.exp(-0.5 * ((grid[:, None] - values) / bandwidth) ** 2)).sum(axis=1)
    peaks, _ = find_peaks(np.pad(density, 1), prominence=min_prominence * density.max())
    return len(peaks)


def mean_std(values):
    """The mean and the population standard deviation (0 for one value)."""
    return statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0


def last_common_step(curves):
    """curves: one eval curve {step: return} per seed -> (the last step that every seed reached, each seed's return
    there, NaN for a seed that reached it without an evaluation there). The one rule of both summaries."""
    step = min(max(curve) for curve in curves)
    return step, [curve.get(step, math.nan) for curve in curves]


def common_steps(curves):
    """curves: eval curves {step: return} -> the steps at which every one has an evaluation, in order."""
    return sorted(set.intersection(*(set(curve) for curve in curves)))


def median_sps(per_seed):
    """The median over seeds of each seed's median training steps/s; seeds that logged none are left out (NaN if
    none did)."""
    medians = [statistics.median(sps) for sps in per_seed if sps]
    return statistics.median(medians) if medians else math.nan


def interval_estimate(scores, statistic, reps):
    """rliable's point estimate of statistic on scores (a (runs x tasks) matrix, or a pair of them for a comparison)
    and its 95% stratified-bootstrap confidence interval (resamples of the runs within each task, of each side
    independently for a pair; a fixed seed): (point, low, high)."""
    from rliable import library

    state = np.random.get_state()
    np.random.seed(0)  # rliable 1.2's StratifiedBootstrap draws its resamples from np.random, not from random_state
    with warnings.catch_warnings():  # rliable hands arch the RandomState that arch now calls deprecated
        warnings.simplefilter("ignore", FutureWarning)
        point, interval = library.get_interval_estimates(
            {"x": scores}, statistic, reps=reps, random_state=np.random.RandomState(0)
        )
    np.random.set_state(state)
    return float(np.ravel(point["x"])[0]), float(np.ravel(interval["x"][0])[0]), float(np.ravel(interval["x"][1])[0])


def iqm_ci(scores):
    """The interquartile mean of a (runs x tasks) score matrix and its 95% stratified-bootstrap confidence interval
    (rliable, 50,000 resamples of the runs within each task): (iqm, low, high)."""
    from rliable import metrics

    scores = np.asarray(scores, dtype=float)
    return interval_estimate(scores, lambda x: np.array([metrics.aggregate_iqm(x)]), reps=50_000)


def iqm(values):
    """The interquartile mean (rliable's aggregate_iqm: the mean of the middle 50%, scipy's trim_mean)."""
    from scipy.stats import trim_mean

    return float(trim_mean(np.asarray(values, dtype=float), proportiontocut=0.25, axis=None))


def improvement_probability(x, y):
    """rliable's probability of improvement of runs x over runs y, both (runs x tasks) matrices of the same tasks:
    the mean over tasks of P(X > Y) for a run of each drawn at random (ties count half), with its 95% stratified-
    bootstrap interval (2,000 independent resamples of each side's runs within each task): (p, low, high)."""
    from rliable import metrics

    pair = (np.asarray(x, dtype=float), np.asarray(y, dtype=float))
    return interval_estimate(pair, metrics.probability_of_improvement, reps=2_000)


def curve_gap(a, b):
    """The mean absolute difference of two eval curves ({step: return}) over the steps that both reached."""
    return statistics.fmean(abs(a[step] - b[step]) for step in sorted(set(a) & set(b)))
