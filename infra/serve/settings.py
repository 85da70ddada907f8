"""`reelforge serve`'s settings, checked when they are made (a bad one fails before the server starts):
`ServeSettings` for every server, `RaySettings` for how `--ray` sizes its deployments."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServeSettings:
    model: str  # models:/NAME@ALIAS, models:/NAME/N, runs:/…, or a bundle folder
    store: str = "reelforge-jobs"
    max_queue: int = 16  # jobs accepted and not finished (queued + running); the next one gets 429
    sync_budget_s: float = 30.0  # /invocations runs synchronously when its estimate fits in this
    job_timeout_s: float = 3600.0
    ttl_s: float = 7 * 86400.0  # finished jobs and their videos are deleted this long after they end
    reload_every_s: float = 60.0  # how often an alias is re-resolved (0: never); a moved alias is loaded between jobs
    device: str | None = None
    dtype: str | None = None
    warmup: bool = True
    threads: int | None = None  # torch CPU threads (None: torch's default, every core)

    def __post_init__(self) -> None:
        flags = {"max_queue": "--max-queue", "sync_budget_s": "--sync-budget", "job_timeout_s": "--job-timeout", "ttl_s": "--ttl-hours"}
        for name, flag in flags.items():
            if not getattr(self, name) > 0:
                raise ValueError(f"{flag} must be > 0, got {getattr(self, name)!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {self.threads!r}")
        if self.reload_every_s < 0:
            raise ValueError(f"--reload-every must be >= 0, got {self.reload_every_s!r}")


@dataclass(frozen=True)
class RaySettings:
    """How `--ray` sizes its deployments, and the body limit its ingress applies; checked when made."""

    min_replicas: int = 1
    max_replicas: int = 1
    gpus_per_replica: float | None = None  # None: 1 when the cluster has GPUs, else 0
    cpus_per_replica: float = 1.0
    max_body_bytes: int = 64 << 20

    def __post_init__(self) -> None:
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"--replicas {self.min_replicas}:{self.max_replicas} must be MIN[:MAX] with 1 <= MIN <= MAX")
        if self.gpus_per_replica is not None and self.gpus_per_replica < 0:
            raise ValueError(f"--gpus-per-replica must be >= 0, got {self.gpus_per_replica!r}")
        if self.cpus_per_replica < 0:
            raise ValueError(f"--cpus-per-replica must be >= 0, got {self.cpus_per_replica!r}")


def parse_replicas(text: str) -> tuple[int, int]:
    """"2" -> (2, 2); "1:4" -> (1, 4) (autoscaled); ValueError naming the flag."""
    low, _, high = text.partition(":")
    try:
        return int(low), int(high or low)
    except ValueError:
        raise ValueError(f"--replicas {text!r} must be MIN[:MAX], e.g. 1 or 1:4") from None
