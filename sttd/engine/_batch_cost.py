"""What one backend call costs as a function of how many requests it carries, sans I/O.

Theory of operation. A batched call pays a fixed part once (a decoder step is one matrix
product whatever the batch size: for tiny.en on a CPU it is most of a greedy decode) and a part
per request (each clip's encoder pass, its share of the steps)::

    seconds ~= fixed_s + per_request_s * requests

`BatchCost.observe` takes each call's size and duration into exponentially weighted sums, and
`line` fits that line to them by least squares, so the newest calls weigh most and the fit
follows the machine as its load changes. Until calls of different sizes have been seen the
two parts cannot be told apart, and the whole cost is taken as per request (fixed 0): the
dear side, so a batch sized from it comes out too small, never too big.

`room` is how many requests fit a time budget. While the fit is only a proportion and no call
seen was bigger than what it says fits, it allows one request more, so a scheduler that sizes
batches from it still tries a bigger call, and learns the line from it.
"""

from __future__ import annotations

import math

import attrs

__all__ = ["BatchCost"]

# How much of the sums each new call replaces.
_WEIGHT = 0.2
# The spread of sizes (weighted variance, requests squared) below which the sizes seen are
# one size, and the fit a proportion.
_MIN_SIZE_VARIANCE = 0.05


@attrs.define
class BatchCost:
    """A running fit of a call's duration against its number of requests."""

    _w: float = attrs.field(init=False, default=0.0)
    _n: float = attrs.field(init=False, default=0.0)
    _t: float = attrs.field(init=False, default=0.0)
    _nn: float = attrs.field(init=False, default=0.0)
    _nt: float = attrs.field(init=False, default=0.0)
    _largest: int = attrs.field(init=False, default=0)

    def observe(self, requests: int, seconds: float) -> None:
        """A call of `requests` requests took `seconds`."""
        if requests <= 0 or seconds < 0 or not math.isfinite(seconds):
            return
        keep = 1 - _WEIGHT
        self._w = keep * self._w + _WEIGHT
        self._n = keep * self._n + _WEIGHT * requests
        self._t = keep * self._t + _WEIGHT * seconds
        self._nn = keep * self._nn + _WEIGHT * requests * requests
        self._nt = keep * self._nt + _WEIGHT * requests * seconds
        self._largest = max(self._largest, requests)

    @property
    def seen(self) -> bool:
        return self._w > 0

    def line(self) -> tuple[float, float] | None:
        """(fixed_s, per_request_s), or None before any call was seen."""
        fitted = self._fit()
        if fitted is not None:
            return fitted
        if not self._w:
            return None
        return 0.0, self._t / self._n

    def _fit(self) -> tuple[float, float] | None:
        """The least-squares line, or None while the sizes seen cannot give one (or the line
        it gives makes no sense: a negative part)."""
        if not self._w:
            return None
        mean_n, mean_t = self._n / self._w, self._t / self._w
        variance = self._nn / self._w - mean_n * mean_n
        if variance < _MIN_SIZE_VARIANCE:
            return None
        slope = (self._nt / self._w - mean_n * mean_t) / variance
        fixed = mean_t - slope * mean_n
        if slope <= 0 or fixed < 0:
            return None
        return fixed, slope

    def per_request_s(self, requests: int) -> float | None:
        """The expected seconds per request of a call of `requests` requests."""
        line = self.line()
        if line is None or requests <= 0:
            return None
        fixed, per = line
        return fixed / requests + per

    def room(self, budget_s: float) -> int | None:
        """The most requests a call may carry to take about `budget_s` (at least 1); None when
        nothing is known, or calls cost nothing per request."""
        line = self.line()
        if line is None or line[1] <= 0:
            return None
        fixed, per = line
        fits = max(1, math.floor((budget_s - fixed) / per + 1e-9))
        if self._fit() is None and self._largest <= fits:
            fits = self._largest + 1  # only a proportion so far: try one more than ever seen
        return fits
