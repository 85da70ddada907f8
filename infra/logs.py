"""One logging setup for every reelforge entry point: the driver, its Ray workers, torchrun ranks.

The driver calls `setup_logging()` (each command does, first thing). Ray workers are other
processes: `worker_logging_hook()` is what `infra.cluster.start_ray` hands Ray as the job's
`worker_process_setup_hook`, so every worker of the job logs the same way without importing
infra (the hook is `logging.basicConfig` with our arguments, which pickles by reference to the
standard library).
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATE_FORMAT = "%H:%M:%S"


def log_level(rank: int = 0) -> int:
    """$REELFORGE_LOG_LEVEL (default INFO); ranks other than 0 log warnings only, so a 64-worker run
    prints one progress line per interval, not 64."""
    level = logging.getLevelName(os.environ.get("REELFORGE_LOG_LEVEL", "INFO").upper())
    if not isinstance(level, int):
        raise SystemExit(f"REELFORGE_LOG_LEVEL={os.environ['REELFORGE_LOG_LEVEL']!r} is not a logging level")
    return level if rank == 0 else max(level, logging.WARNING)


def setup_logging(rank: int = 0) -> None:
    """Log to stderr at `log_level(rank)`; calling it again changes nothing but the level."""
    # Against a tracking server MLflow writes "View run ... at: URL" lines to stdout whenever a run
    # ends (training's, the promotion gate's evaluation run), in the middle of a command's result
    # (`promote` prints one line that scripts read). Our log already names each run; set the
    # variable to false to get MLflow's links back.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    root = logging.getLogger()
    if not any(getattr(h, "_reelforge", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT, datefmt=DATE_FORMAT))
        handler._reelforge = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(log_level(rank))


def worker_logging_hook() -> Callable[[], None]:
    """A zero-argument callable that sets up a Ray worker process's logging like the driver's."""
    # basicConfig writes to the worker's own stderr, which Ray forwards to the driver. Ray names a
    # setup hook by its __name__, which a partial lacks: update_wrapper gives it basicConfig's.
    hook = functools.partial(logging.basicConfig, level=log_level(), format=FORMAT, datefmt=DATE_FORMAT)
    return functools.update_wrapper(hook, logging.basicConfig)
