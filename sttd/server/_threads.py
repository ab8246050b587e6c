"""The threads of the BLAS library under numpy: one, the caller's, in a server process.

numpy's OpenBLAS starts a thread per core at import and splits every large enough matrix
product over them (in sttd: the whisper backend's log-mel filter bank, once per decode). After
each product its threads spin for a while before they sleep, waiting for the next. In a server
whose parallelism is the engine's lanes (one decode per core, each on its own thread), that
spinning took a core's share from the lanes for nothing: one whisper session on a 2-core AMD
EPYC cost the server 45.6% of a core, 16.1 points of it in OpenBLAS's second thread, and 32.0%
with BLAS on the calling thread alone (benchmarks/README.md, "numpy's BLAS threads").

An operator who set a BLAS thread count (``OPENBLAS_NUM_THREADS``, ``MKL_NUM_THREADS``,
``BLIS_NUM_THREADS`` or ``OMP_NUM_THREADS``) keeps it. threadpoolctl sets the count on the
library already loaded, where the environment variables act only before numpy's import.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from threadpoolctl import threadpool_limits

__all__ = ["limit_blas_threads"]

log = logging.getLogger(__name__)

# The variables through which an operator chooses BLAS's threads (OpenBLAS, MKL, BLIS, and
# OpenMP, which some builds of each read).
_BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS",
                          "OMP_NUM_THREADS")


def limit_blas_threads(environ: Mapping[str, str] = os.environ) -> Any:
    """Run BLAS products on their calling thread only, unless `environ` sets a thread count.

    Returns the limiter (whose ``restore_original_limits`` undoes it), or None where the
    operator's setting stands. The limit holds for the whole process.
    """
    chosen = [name for name in _BLAS_THREAD_VARIABLES if name in environ]
    if chosen:
        log.info("server.blas_threads kept=%s", ",".join(chosen))
        return None
    return threadpool_limits(limits=1, user_api="blas")
