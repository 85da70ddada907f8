"""One logging setup for every reelforge entry point (driver, Ray workers, torchrun ranks)."""

from __future__ import annotations

import logging
import os
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: str | int | None = None, rank: int = 0) -> None:
    """Log to stderr at `level` ($REELFORGE_LOG_LEVEL, default INFO); ranks other than 0 log warnings only,
    so a 64-worker run prints one progress line per interval, not 64."""
    if level is None:
        level = os.environ.get("REELFORGE_LOG_LEVEL", "INFO")
    if isinstance(level, str):
        level = logging.getLevelName(level.upper())
    if rank != 0:
        level = max(level, logging.WARNING)
    root = logging.getLogger()
    if not any(getattr(h, "_reelforge", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
        handler._reelforge = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level)
