"""Activation range estimators: minmax, percentile and entropy (TensorRT's KL-divergence threshold search).

Two passes over the same feeds: the first finds each tensor's absolute maximum, the second fills a histogram of
|x| over [0, amax] from which percentile and entropy pick a clipping threshold. Numpy only.
"""

from __future__ import annotations

import numpy as np

METHODS = ("entropy", "percentile", "minmax")
BINS = 2048
QUANT_BINS = 128


class RangeObserver:
    """Per-tensor absolute maximum and |x| histogram."""

    def __init__(self, bins: int = BINS):
        self.bins = bins
        self.amax: dict[str, float] = {}
        self.hist: dict[str, np.ndarray] = {}

    def observe_max(self, name: str, x: np.ndarray) -> None:
        if x.size:
            self.amax[name] = max(self.amax.get(name, 0.0), float(np.max(np.abs(x))))

    def observe_hist(self, name: str, x: np.ndarray) -> None:
        top = self.amax.get(name, 0.0)
        if not x.size or top <= 0:
            return
        h, _ = np.histogram(np.abs(x), bins=self.bins, range=(0.0, top))
        self.hist[name] = self.hist.get(name, 0) + h

    def thresholds(self, method: str, percentile: float = 99.99) -> dict[str, float]:
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
        out = {}
        for name, top in self.amax.items():
            hist = self.hist.get(name)
            if method == "minmax" or hist is None or top <= 0:
                out[name] = top
            elif method == "percentile":
                out[name] = percentile_threshold(hist, top, percentile)
            else:
                out[name] = entropy_threshold(hist, top)
        return out


def percentile_threshold(hist: np.ndarray, top: float, percentile: float) -> float:
    cdf = np.cumsum(hist) / max(1, hist.sum())
    idx = int(np.searchsorted(cdf, percentile / 100.0))
    return float(min(top, (idx + 1) * top / len(hist)))


def entropy_threshold(hist: np.ndarray, top: float, quant_bins: int = QUANT_BINS, stride: int = 4) -> float:
    """The clipping threshold minimising KL(P || Q), P the clipped reference histogram, Q its 128-level version."""
    hist = hist.astype(np.float64)
    bins = len(hist)
    if hist[quant_bins:].sum() == 0:
        nz = np.nonzero(hist)[0]
        return float((nz[-1] + 1) * top / bins) if nz.size else top
    best, best_i = np.inf, bins
    for i in range(quant_bins, bins + 1, stride):
        p = hist[:i].copy()
        p[-1] += hist[i:].sum()
        nonzero = hist[:i] != 0
        # quantize the first i bins into quant_bins levels, spread each level back over its non-empty bins
        edges = np.linspace(0, i, quant_bins + 1).astype(int)
        level = np.repeat(np.arange(quant_bins), np.diff(edges))
        sums = np.add.reduceat(hist[:i], edges[:-1])
        counts = np.add.reduceat(nonzero.astype(np.float64), edges[:-1])
        q = np.where(nonzero, (sums / np.maximum(counts, 1))[level], 0.0)
        ps, qs = p.sum(), q.sum()
        if qs == 0:
            continue
        p, q = p / ps, q / qs
        valid = p > 0
        kl = float(np.sum(p[valid] * np.log(p[valid] / np.maximum(q[valid], 1e-12))))
        if kl < best:
            best, best_i = kl, i
    return float(best_i * top / bins)
