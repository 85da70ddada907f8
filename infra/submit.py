"""`reelforge submit COMMAND [options] -- ARGS...`: run `python -m infra COMMAND ARGS...` as a Ray job.

    reelforge submit ingest --address http://head:8265 -- /data/raw --out /data/shards --config ingest/demo
    reelforge submit train --submission-id train-0601 -- --config train/tiny --data /data/shards --out /data/runs/tiny
    reelforge submit generate --no-wait -- --model models:/reelforge-t2v@champion --prompt "a fox" --out /data/fox.mp4

The cluster is `--address` or $RAY_ADDRESS, its dashboard URL. The job runs in a copy of this
checkout (Ray's runtime_env `working_dir`, uploaded once per content hash), or with `--image-uri`
in a container image that has reelforge installed. Before anything is sent, ARGS go through the
command's own parser and config check, and every path the job writes (`--out`, recaption's SHARDS
and `--materialize`, a local MLflow store) must be absolute or object storage: a relative one would
land in the job's working-dir copy, which Ray deletes with the session (training/run_dir.py refuses
the same inside a job).

`--submission-id ID` makes a submission idempotent: when the cluster has a job with that id
(running or finished) the command re-attaches to it, streams its output from the start and exits
with its outcome, instead of starting it twice (a retried Airflow task does exactly this).

Exit status: 0 the job SUCCEEDED; 1 it FAILED or was stopped elsewhere (with the job's reason in
one line); 2 nothing could be submitted (bad arguments, an output path that would not outlast the
job, the cluster unreachable or wanting a token); 130 interrupted: Ctrl-C stops the job when asked
to (a prompt on a terminal, `--stop-on-interrupt` anywhere), else leaves it running and prints how
to re-attach. `--no-wait` prints the submission id on stdout and exits 0 once the job is submitted.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

from infra import __version__
from infra.logs import setup_logging
from infra.ray_jobs import RayJobsClient, RayJobsError, SubmissionIdTaken, failure_reason

logger = logging.getLogger(__name__)

PROG = "reelforge submit"
# The commands a job may run -> the module whose build_parser() checks their arguments here first.
COMMANDS = {"ingest": "infra.ingest", "recaption": "infra.recaption", "train": "infra.train", "generate": "infra.generate"}
# Per command, the arguments (argparse dests) naming what the job writes, which must outlast the job.
OUTPUTS = {"ingest": ("out",), "recaption": ("shards", "materialize"), "train": ("out",), "generate": ("out",)}
# Left out of the working-dir package on top of what Ray leaves out by itself: its default excludes
# (.git, .venv, venv, __pycache__) and whatever .gitignore and .rayignore files list (runs/, demo/,
# mlruns/, *.egg-info, ...). These are the checkout's parts a job never reads.
PACKAGE_EXCLUDES = ["/tests/", "/benchmarks/", "/docs/", "/.ci/", ".*_cache/"]
POLL_S = 1.0
EXIT_FAILED, EXIT_NOT_SUBMITTED, EXIT_INTERRUPTED = 1, 2, 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        usage=f"{PROG} {{{','.join(COMMANDS)}}} [options] -- ARGS...",
        description="Run `python -m infra COMMAND ARGS...` as a job on a Ray cluster, streaming its output.",
        epilog="Everything after `--` is the command's own arguments. Exit status: 0 the job succeeded, 1 it "
        "failed, 2 nothing was submitted, 130 interrupted.",
    )
    parser.add_argument("command", choices=COMMANDS, help="the reelforge command the job runs")
    parser.add_argument("--address", metavar="URL", help="the cluster's dashboard URL, e.g. http://HEAD:8265 (default: $RAY_ADDRESS)")
    parser.add_argument(
        "--submission-id", metavar="ID",
        help="the job's id; when a job with this id exists, re-attach to it instead of submitting again (default: Ray makes one)",
    )  # fmt: skip
    parser.add_argument("--no-wait", action="store_true", help="print the submission id and exit once the job is submitted")
    parser.add_argument("--stop-on-interrupt", action="store_true", help="Ctrl-C stops the job (default: ask on a terminal, else detach)")
    parser.add_argument(
        "--image-uri", metavar="URI",
        help="run the job in this container image (reelforge installed in it) instead of a copy of this checkout",
    )  # fmt: skip
    parser.add_argument(
        "--pip", action="store_true",
        help="install reelforge's pinned dependencies (pyproject.toml) into the job's environment on each node, "
        "for a cluster whose Python lacks them (Ray's pip runtime env, cached per node)",
    )  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # What follows the first `--` belongs to the command, untouched (`--out` there is ingest's).
    own, command_args = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    args = build_parser().parse_args(own)
    setup_logging()
    try:
        if args.pip and args.image_uri:
            raise ValueError("--pip and --image-uri exclude each other: the image brings the dependencies")
        check_command_args(args.command, command_args)
        client = RayJobsClient.from_environment(args.address)
        return submit_and_follow(client, args, command_args)
    except (ValueError, RayJobsError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_NOT_SUBMITTED
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted before the job was submitted", file=sys.stderr)
        return EXIT_INTERRUPTED


# --- before anything is sent: the command's arguments and the paths that must outlast the job ------


def check_command_args(command: str, command_args: list[str]) -> None:
    """Parse ARGS with the command's own parser (its usage error exits 2 here), validate its config,
    and refuse (ValueError) an output path the job would write into its temporary working dir."""
    if command == "generate" and any(arg == "--batch" or arg.startswith("--batch=") for arg in command_args):
        module = importlib.import_module("infra.generate_batch")  # as infra.generate's main dispatches
    else:
        module = importlib.import_module(COMMANDS[command])
    parser = module.build_parser()
    args = parser.parse_args(command_args)
    for dest in OUTPUTS[command]:
        value = getattr(args, dest, None)
        if value is not None:
            check_outlasts_job(_flag(parser, dest), value)
    if not hasattr(args, "overrides"):
        return  # generate has no --config/--set
    from infra.config import load_config

    config = load_config(args.config, args.overrides)  # the job's first check: a bad key fails here, not on the cluster
    if command == "train":
        from infra.train import default_out
        from training.run_dir import local_store_path

        if args.out is None:
            raise ValueError(
                f"--out is not given, and reelforge train's default {default_out(args)} is relative, so the job would "
                "write it inside its working-dir copy, which Ray deletes with the session; pass an --out that outlasts "
                "the job, an absolute path every node sees (e.g. --out /shared/runs/NAME) or object storage"
            )
        store = config.mlflow.tracking_uri
        store_path = local_store_path(store) if store else None
        if store_path is not None and not store_path.is_absolute():
            raise ValueError(
                f"mlflow.tracking_uri {store} is a relative path, so the job would write its runs inside its working-dir "
                "copy, which Ray deletes with the session; set a tracking server (http://HOST:5000) or an absolute "
                "store every node sees (sqlite:////shared/mlflow.db)"
            )


def check_outlasts_job(flag: str, value: str) -> None:
    """Refuse a relative local path: in the job it resolves inside Ray's copy of this checkout."""
    if "://" in value and not value.startswith("file://"):
        return  # object storage (s3://, gs://, ...): outlasts any job
    path = Path(value.removeprefix("file://"))
    if not path.is_absolute():
        raise ValueError(
            f"{flag} {value} is relative, so the job would write it inside its working-dir copy, which Ray deletes "
            f"with the session; give an absolute path every node sees (e.g. {flag} /shared/{path.name or 'NAME'}) "
            "or object storage"
        )


def _flag(parser: argparse.ArgumentParser, dest: str) -> str:
    """How the user spells the argument `dest`: `--out`, or a positional's metavar (`SHARDS`)."""
    action = next(action for action in parser._actions if action.dest == dest)
    return action.option_strings[0] if action.option_strings else (action.metavar or dest.upper())


# --- the job: submit or re-attach, then follow it to its end ----------------------------------


def submit_and_follow(client: RayJobsClient, args: argparse.Namespace, command_args: list[str]) -> int:
    entrypoint = shlex.join(["python", "-m", "infra", args.command, *command_args])
    client.version()  # an unreachable cluster, or one that wants a token, says so before any packaging
    job = client.find(args.submission_id) if args.submission_id else None
    if job is None:
        try:
            submission_id = client.submit(
                entrypoint,
                submission_id=args.submission_id,
                runtime_env=job_runtime_env(client, args.image_uri, pip=args.pip),
                metadata={"reelforge_command": args.command, "reelforge_version": __version__},
            )
            logger.info("submitted job %s to %s", submission_id, client.address)
        except SubmissionIdTaken:  # submitted meanwhile, e.g. by the first try of a retried task
            job = client.job(args.submission_id)
    if job is not None:
        submission_id = args.submission_id
        if job["entrypoint"] != entrypoint:
            raise ValueError(
                f"job {submission_id} on {client.address} runs another command ({job['entrypoint']}); a submission id "
                "names one job: pass another --submission-id to submit this one"
            )
        logger.info("job %s exists on %s (%s): re-attaching to it instead of submitting it again", submission_id, client.address, job["status"])
    if args.no_wait:
        print(submission_id)
        return 0
    reattach = shlex.join(["reelforge", "submit", args.command, "--address", client.address, "--submission-id", submission_id, "--", *command_args])
    return follow(client, submission_id, stop_on_interrupt=args.stop_on_interrupt, reattach=reattach)


def follow(client: RayJobsClient, submission_id: str, *, stop_on_interrupt: bool, reattach: str) -> int:
    """Stream the job's output to stdout until it ends; its exit status (module docstring)."""
    written = 0
    try:
        for text in client.follow_logs(submission_id, poll_s=POLL_S):
            written += _write(text)
    except KeyboardInterrupt:
        if not (stop_on_interrupt or (sys.stdin.isatty() and _confirm("stop the job? [y/N] "))):
            logger.warning(
                "detached: job %s keeps running on %s; re-attach with `%s`, or stop it with `ray job stop --address %s %s`",
                submission_id, client.address, reattach, client.address, submission_id,
            )  # fmt: skip
            return EXIT_INTERRUPTED
        try:
            client.stop(submission_id)
            logger.info("stopping job %s", submission_id)
            for text in client.follow_logs(submission_id, poll_s=POLL_S, offset=written):
                _write(text)
        except KeyboardInterrupt:  # a second Ctrl-C: stop waiting for it
            logger.warning("detached while job %s stops", submission_id)
            return EXIT_INTERRUPTED
        logger.info("job %s %s", submission_id, client.status(submission_id))
        return EXIT_INTERRUPTED
    job = client.job(submission_id)
    if job["status"] == "SUCCEEDED":
        logger.info("job %s SUCCEEDED", submission_id)
        return 0
    print(f"{PROG}: job {submission_id} {job['status']}: {failure_reason(job)}", file=sys.stderr)
    return EXIT_FAILED


def _write(text: str) -> int:
    sys.stdout.write(text)
    sys.stdout.flush()
    return len(text)


def _confirm(question: str) -> bool:
    """Ask on the terminal; a second Ctrl-C or end of input is a no."""
    sys.stderr.write("\n" + question)
    sys.stderr.flush()
    try:
        return sys.stdin.readline().strip().lower() in ("y", "yes")
    except KeyboardInterrupt:
        return False


# --- what the job runs in ---------------------------------------------------------------------------


def job_runtime_env(client: RayJobsClient, image_uri: str | None, *, pip: bool = False) -> dict[str, Any]:
    """`{"image_uri": URI}` with --image-uri (the image has reelforge and its dependencies; nothing is
    uploaded), else `{"working_dir": gcs://_ray_pkg_<hash>.zip}`: this checkout, uploaded if the
    cluster does not hold that content yet. With --pip also Ray's `pip` env: each node makes a
    virtualenv on top of its Python (so what it has already is not installed again) with the
    checkout's pinned dependencies, once per requirement set."""
    if image_uri:
        return {"image_uri": image_uri}
    root = checkout_root()
    env: dict[str, Any] = {"working_dir": upload_checkout(client, root)}
    if pip:
        env["pip"] = {"packages": project_requirements(root), "pip_check": False}
    return env


def project_requirements(root: Path) -> list[str]:
    """The runtime requirements pyproject.toml pins (its `[project] dependencies`, extras left out)."""
    import tomllib

    with open(root / "pyproject.toml", "rb") as handle:
        return list(tomllib.load(handle)["project"]["dependencies"])


def checkout_root() -> Path:
    """The checkout this reelforge runs from (the folder holding infra/ and pyproject.toml)."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file():
        raise ValueError(
            f"reelforge runs from an installed package ({root}), not a checkout, so there is no working dir to send; "
            "run it from a checkout, or pass --image-uri with an image that has reelforge installed"
        )
    return root


def upload_checkout(client: RayJobsClient, root: Path) -> str:
    """Package `root` as `ray job submit --working-dir` does and upload it unless the cluster has it.

    Ray's packaging code makes the zip and its content-hash URI, so what is left out (.gitignore and
    .rayignore at every level, Ray's default excludes) is exactly what `ray job submit` leaves out;
    our client uploads it, so the token and every error go through the one place (infra/ray_jobs.py)
    that the rest of this command and the Airflow DAGs use. `JobSubmissionClient` would do both but
    sends its token only under RAY_AUTH_MODE=token and raises errors of its own shape.
    """
    from ray._private import ray_constants
    from ray._private.runtime_env.packaging import create_package, get_uri_for_directory

    # Ray's packaging logs a line for every .gitignore it reads, those of ignored folders included.
    logging.getLogger("ray._private.runtime_env.packaging").setLevel(logging.WARNING)
    excludes = ray_constants.get_runtime_env_default_excludes() + PACKAGE_EXCLUDES
    include_gitignore = os.environ.get(ray_constants.RAY_RUNTIME_ENV_IGNORE_GITIGNORE, "0") != "1"
    package_uri = get_uri_for_directory(str(root), include_gitignore, excludes=excludes)
    if client.package_exists(package_uri):
        logger.info("working dir %s: the cluster holds it already (%s)", root, package_uri)
        return package_uri
    with tempfile.TemporaryDirectory() as scratch:
        package = Path(scratch) / "working_dir.zip"
        create_package(str(root), package, include_gitignore, excludes=excludes)
        data = package.read_bytes()
    logger.info("working dir %s: uploading %s (%.1f MiB)", root, package_uri, len(data) / 2**20)
    client.upload_package(package_uri, data)
    return package_uri


if __name__ == "__main__":
    sys.exit(main())
