"""`reelforge serve --model models:/NAME@ALIAS [--store DIR|s3://…] [--port P] [--max-queue N]`.

Serves one model (a registry reference or a bundle folder) with the app of infra/serve/app.py on
uvicorn. The store keeps every job (docs/serving.md); the server takes its lease, so a second
server on the same store is refused in one line. Settings fail before anything starts, naming the
flag; the model loads in the background while `/health` answers 503.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from infra.logs import setup_logging
from model.errors import one_line

logger = logging.getLogger(__name__)

PROG = "reelforge serve"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Serve a registered model: MLflow's REST protocol plus async /v1/videos jobs.")
    parser.add_argument("--model", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/model or a bundle folder")
    parser.add_argument("--store", default=os.environ.get("REELFORGE_SERVE_STORE", "reelforge-jobs"),
                        help="folder or s3://bucket/prefix for jobs and videos (default: $REELFORGE_SERVE_STORE or ./reelforge-jobs)")  # fmt: skip
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-queue", type=int, default=16, help="jobs accepted and not finished; more get 429 with Retry-After")
    parser.add_argument("--sync-budget", type=float, default=30.0, help="seconds: /invocations over this estimate answers 202 with a job")
    parser.add_argument("--job-timeout", type=float, default=3600.0, help="seconds a job may run before it fails")
    parser.add_argument("--ttl-hours", type=float, default=168.0, help="finished jobs and videos are deleted after this")
    parser.add_argument("--reload-every", type=float, default=60.0, help="seconds between alias checks; a moved alias is loaded (0: never)")
    parser.add_argument("--max-body-mb", type=float, default=64.0, help="larger request bodies get 413")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="DiT weights dtype (default: as saved)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: every core; on a CPU server leave one for HTTP)")
    parser.add_argument("--no-warmup", action="store_true", help="skip the one-step warm-up that calibrates time estimates")
    ray = parser.add_argument_group("on Ray Serve (--ray; docs/serving.md)")
    ray.add_argument("--ray", action="store_true",
                     help="serve on Ray Serve: an ingress plus generator replicas, on RAY_ADDRESS's cluster (else a local Ray)")  # fmt: skip
    ray.add_argument("--replicas", default="1", help="generator replicas: N, or MIN:MAX to autoscale on waiting jobs (default 1)")
    ray.add_argument("--gpus-per-replica", type=float, help="GPUs per generator replica (default: 1 when the cluster has GPUs, else 0)")
    ray.add_argument("--cpus-per-replica", type=float, default=1.0, help="CPUs reserved per generator replica (default 1)")
    return parser


def settings_from_args(args: argparse.Namespace) -> tuple[Any, Any]:
    """(ServeSettings, RaySettings) from parsed flags; ValueError naming the flag."""
    from infra.serve.settings import RaySettings, ServeSettings, parse_replicas

    if not 0 < args.port < 65536:
        raise ValueError(f"--port {args.port} is not a TCP port")
    if not args.max_body_mb > 0:
        raise ValueError(f"--max-body-mb must be > 0, got {args.max_body_mb}")
    settings = ServeSettings(
        model=args.model, store=args.store, max_queue=args.max_queue, sync_budget_s=args.sync_budget,
        job_timeout_s=args.job_timeout, ttl_s=args.ttl_hours * 3600, reload_every_s=args.reload_every,
        device=args.device, dtype=args.dtype, warmup=not args.no_warmup, threads=args.threads,
    )  # fmt: skip
    low, high = parse_replicas(args.replicas)
    ray_settings = RaySettings(min_replicas=low, max_replicas=high, gpus_per_replica=args.gpus_per_replica,
                               cpus_per_replica=args.cpus_per_replica, max_body_bytes=int(args.max_body_mb * (1 << 20)))  # fmt: skip
    return settings, ray_settings


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    os.environ.setdefault("TQDM_DISABLE", "1")  # progress is on /v1/videos/{id}, not a bar per job in the log
    args = build_parser().parse_args(argv)
    try:
        settings, ray_settings = settings_from_args(args)
        if args.ray:
            from infra.serve.model_ref import check_reference

            check_reference(settings.model)  # before Ray starts
            return serve_on_ray(settings, ray_settings, args.host, args.port)
        from infra.serve.engine import Engine

        engine = Engine(settings)
        engine.start()
    except ValueError as exc:
        print(f"{PROG}: error: {one_line(exc)}", file=sys.stderr)
        return 2
    import uvicorn

    from infra.serve.app import create_app

    app = create_app(engine, max_body_bytes=int(args.max_body_mb * (1 << 20)))
    try:
        # log_config=None: our one line per request (app.py) instead of uvicorn's access log
        uvicorn.run(app, host=args.host, port=args.port, log_config=None, access_log=False)
    finally:
        engine.stop()
    return 0


def serve_on_ray(settings: Any, ray_settings: Any, host: str, port: int) -> int:
    """Deploy the app on Ray Serve (infra/serve/on_ray.py) and keep it up until SIGINT/SIGTERM,
    which delete it, as `serve run` does. Ray: RAY_ADDRESS's cluster, else a local instance."""
    import signal
    import threading

    from ray import serve

    from infra.cluster import start_ray
    from infra.serve.on_ray import APP_NAME, build_app

    start_ray()
    serve.start(http_options={"host": host, "port": port})
    stopped = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopped.set())
    try:
        serve.run(build_app(settings, ray_settings), name=APP_NAME, route_prefix="/")
        logger.info("serving %s on Ray Serve at http://%s:%d/ (Ctrl-C stops it)", settings.model, host, port)
        stopped.wait()
    except RuntimeError as exc:  # a deployment failed to start: Serve says which and why
        print(f"{PROG}: error: {one_line(exc)}", file=sys.stderr)
        return 1
    finally:
        logger.info("deleting the %s application", APP_NAME)
        serve.delete(APP_NAME)
    return 0


def app_builder(args: dict[str, str]) -> Any:
    """`serve run infra.serve.cli:app_builder model=... store=... replicas=1:4`, and a RayService's
    import_path: the arguments are `reelforge serve`'s flags without their dashes."""
    from infra.serve.on_ray import build_app

    argv = []
    for key, value in args.items():
        flag = f"--{key.replace('_', '-')}"
        if value is True or value is False:  # a switch (no_warmup: true)
            argv += [flag] if value else []
        else:
            argv += [flag, str(value)]
    parsed = build_parser().parse_args(argv)
    settings, ray_settings = settings_from_args(parsed)
    return build_app(settings, ray_settings)
