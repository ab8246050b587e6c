"""The server runs numpy's BLAS on the calling thread (`sttd.server._threads`)."""

from __future__ import annotations

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

from sttd.server._threads import limit_blas_threads


def _blas_threads() -> list[int]:
    return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]


def test_blas_runs_on_the_calling_thread_alone() -> None:
    np.ones((2, 2)) @ np.ones((2, 2))  # numpy's BLAS is loaded
    with threadpool_limits(limits=2, user_api="blas"):  # as on a 2-core machine, whatever this is
        assert _blas_threads() and all(n == 2 for n in _blas_threads())
        limiter = limit_blas_threads({})
        try:
            assert limiter is not None
            assert all(n == 1 for n in _blas_threads())
        finally:
            assert limiter is not None
            limiter.restore_original_limits()
        assert all(n == 2 for n in _blas_threads())


def test_an_operators_thread_count_stands() -> None:
    with threadpool_limits(limits=2, user_api="blas"):
        for variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            assert limit_blas_threads({variable: "2", "PATH": "/usr/bin"}) is None
            assert all(n == 2 for n in _blas_threads())
