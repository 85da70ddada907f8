"""Serving overhead against the pipeline called directly, and a burst of clients against a full queue.

    python benchmarks/serve.py [--requests 15] [--warmup 2] [--poll-ms 25,250] [--threads 1]
                               [--clients 32] [--max-queue 8] [--bursts 3] [--json benchmarks/results/serve.json]
    python benchmarks/serve.py --ray ...     # the same, served by `reelforge serve --ray` (Ray Serve:
                                             # an ingress and one generator replica, on a local Ray
                                             # this server starts; its CPU counts Ray's own processes)

Model: the tiny preset as `configs/train/tiny.yaml` trains it (DiT preset tiny, 2.97M parameters,
the `pixel` autoencoder, `minilm` text encoder, 8 frames of 32x32 at 8 fps), random-initialised and
written with `model.bundle.save_bundle` with the generation defaults and card a training export
writes (training/export.py), so requests take the bundle's defaults: 30 steps, guidance 5 (two DiT
rows per step). A random DiT costs exactly what a trained one does.

1. Overhead. The same fixed list of requests (prompt i, seed i, 8 frames, 30 steps) goes, round by
   round, through four paths; the order of the paths rotates every round so that load from other
   jobs on a shared machine falls on all of them alike:
     (a) in-process     `VideoPipeline.generate` + `model.mp4.write_mp4` in this process
     (b) /invocations   the real `reelforge serve` over HTTP (keep-alive session): one synchronous
                        POST in MLflow's `dataframe_records` format, the MP4 base64-decoded
     (c) /v1/videos     POST (202), then GET the status every `--poll-ms` until completed, then
                        GET the content; once per polling interval
   Measured per request: wall ms at the client; the job ms the server itself reports (the status's
   `timings.total_s`: generate + MP4 encode in its worker thread; `started_at`/`completed_at` are
   whole seconds, too coarse for sub-second jobs), and wall - job: what serving adds around the
   job, whatever the load does to the job itself; CPU ms (this process's CPU for (a); the server
   process's CPU plus this client's for (b)/(c)). Overhead = median over `--requests` rounds after
   `--warmup` rounds, path / (a) - 1; target < 5%. The paired overhead is the median of the
   per-round ratios (each round runs every path on the same request within seconds), the least
   disturbed by load that comes and goes. On a shared machine the CPU columns are the reliable ones,
   with `--threads 1` (the default here: see the flag) for both this process and the server. A poller learns of completion up to one interval
   late (on average half of one), and every poll is an HTTP request the server answers while the
   worker thread generates, so the interval is part of what (c) measures; the job ms separate the two.
   The MP4 bytes of every path are compared: the same seed must give the same video. Then, on the
   idle server, `--calls` keep-alive GETs of /health, a job's status and its content give the
   wall and CPU ms of one call: what one poll costs.

2. Burst. `--clients` threads, released together by a barrier, each POST /v1/videos once (a new
   connection each, distinct seeds) to the same server, started with `--max-queue`. Every answer
   must be 202 or 429 and every 429 must carry a Retry-After; every accepted job is then polled
   until completed and its content fetched (none lost). The RSS of the server's process tree
   (psutil, sampled every 100 ms by a thread) is read before, at its peak during, and after each
   burst; `--bursts` bursts show whether peak memory stays flat.

Prints markdown tables (machine, load, commit) and writes JSON.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import logging
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import requests
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # runs as `python benchmarks/serve.py` as well as `python -m benchmarks.serve`
# No progress bar per generation in path (a), as the server sets for itself; before the imports
# below, because tqdm reads it when it is first imported.
os.environ.setdefault("TQDM_DISABLE", "1")

from infra.config import load_config  # noqa: E402
from infra.logs import setup_logging  # noqa: E402

logger = logging.getLogger("benchmarks.serve")

PRESET = "train/tiny"  # configs/train/tiny.yaml: the model section gives the DiT, encoders and trained size
PROMPTS = [
    "a red circle moving right on a dark blue background",
    "a green square moving left on a dark blue background",
    "a yellow square moving down on a light gray background",
    "a white triangle spinning in the centre of a black background",
]
START_TIMEOUT_S = 300  # import torch + mlflow + FastAPI, load the bundle, two warm-up generations, on a shared CPU


# --- the model ---------------------------------------------------------------------------


def make_bundle(folder: Path) -> tuple[Path, dict]:
    """A random-initialised bundle of the tiny preset, written as a training export writes it."""
    from model.autoencoders import load_autoencoder
    from model.bundle import save_bundle
    from model.card import CARD_KEY, card_entry
    from model.dit import DiT, dit_config
    from model.text_encoders import load_text_encoder
    from training.export import generation_defaults

    cfg = load_config(PRESET)
    autoencoder = load_autoencoder(cfg.model.autoencoder)
    text_encoder = load_text_encoder(cfg.model.text_encoder)
    torch.manual_seed(0)
    dit_cfg = dit_config(cfg.model.preset, autoencoder.latent_channels, text_encoder.dim, **cfg.model.dit_overrides())
    dit = DiT(dit_cfg)
    bundle = save_bundle(
        folder, dit, dit_cfg, autoencoder=cfg.model.autoencoder, text_encoder=cfg.model.text_encoder,
        fps=cfg.model.fps, num_frames=cfg.model.num_frames, width=cfg.model.width, height=cfg.model.height,
        extra={"generation": generation_defaults(cfg.train),
               CARD_KEY: card_entry(cfg.train.conditioning, cfg.train.text_dropout, cfg.model.bucket_shapes())},
    )  # fmt: skip
    model = {
        "preset": cfg.model.preset, "autoencoder": cfg.model.autoencoder, "text_encoder": cfg.model.text_encoder,
        "params_M": round(sum(p.numel() for p in dit.parameters()) / 1e6, 2),
        "num_frames": cfg.model.num_frames, "size": cfg.model.size, "fps": cfg.model.fps,
    }  # fmt: skip
    return bundle, model


def request_body(index: int, num_frames: int, steps: int) -> dict:
    return {"prompt": PROMPTS[index % len(PROMPTS)], "num_frames": num_frames, "steps": steps, "seed": index}


# --- the server --------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServeProcess:
    """`python -m infra serve` in its own process group, on a free port, ready once /health is 200."""

    def __init__(self, bundle: Path, store: Path, max_queue: int, threads: int, log: Path, ray: bool = False) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        self._log = open(log, "ab")
        command = [sys.executable, "-m", "infra", "serve", "--model", str(bundle), "--store", str(store),
                   "--port", str(self.port), "--max-queue", str(max_queue)]  # fmt: skip
        # `reelforge serve` sets no thread count: torch takes OMP_NUM_THREADS, else one thread per core.
        env = os.environ | ({"OMP_NUM_THREADS": str(threads)} if threads > 0 else {})
        if ray:  # a Ray of its own, whose processes are this server's children; a replica gets one
            # CPU, so Ray gives it OMP_NUM_THREADS=1
            command += ["--ray", "--cpus-per-replica", "1"]
            env |= {"RAY_ADDRESS": "local", "RAY_USAGE_STATS_ENABLED": "0"}
        began = time.perf_counter()
        self.process = subprocess.Popen(command, cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        self.psutil = psutil.Process(self.process.pid)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.process.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-3000:]
                self.stop()
                raise RuntimeError(f"reelforge serve did not become ready (exit {self.process.returncode}):\n{tail}")
            try:
                if requests.get(f"{self.url}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.2)
        self.ready_s = time.perf_counter() - began  # start-up, model load and the engine's warm-up

    def tree(self) -> list[psutil.Process]:
        try:
            return [self.psutil, *self.psutil.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def cpu_s(self) -> float:
        total = 0.0
        for proc in self.tree():
            try:
                times = proc.cpu_times()
                total += times.user + times.system
            except psutil.NoSuchProcess:
                pass
        return total

    def rss_bytes(self) -> int:
        total = 0
        for proc in self.tree():
            try:
                total += proc.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total

    def stop(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGTERM)  # the group this object started, nothing else
            self.process.wait(timeout=60)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self._log.close()


# --- 1. overhead -------------------------------------------------------------------------


def in_process(pipeline, body: dict) -> dict:
    """(a): the pipeline and the MP4 writer, nothing else."""
    from model.mp4 import write_mp4
    from model.pipeline import GenerationRequest

    cpu, began = time.process_time(), time.perf_counter()
    video = pipeline.generate(GenerationRequest(**body))
    mp4 = write_mp4(video.frames, video.fps, None)
    wall = time.perf_counter() - began
    return {"wall_s": wall, "job_s": wall, "cpu_s": time.process_time() - cpu, "mp4": mp4}


def invocations(server: ServeProcess, session: requests.Session, body: dict) -> dict:
    """(b): one synchronous MLflow scoring request."""
    known = _job_ids(server, session)
    # The server's CPU is read outside this process's CPU window: a psutil tree scan costs ~3 ms here.
    server_cpu = server.cpu_s()
    cpu, began = time.process_time(), time.perf_counter()
    response = session.post(f"{server.url}/invocations", json={"dataframe_records": [body]}, timeout=120)
    if response.status_code != 200:
        raise RuntimeError(f"/invocations answered {response.status_code}, not 200: {response.text[:300]}")
    mp4 = base64.b64decode(response.json()["predictions"][0]["video_mp4_base64"])
    wall, client_cpu = time.perf_counter() - began, time.process_time() - cpu
    cpu_s = server.cpu_s() - server_cpu + client_cpu
    # /invocations answers predictions only: its job is the one the list did not have before (read
    # outside the timing). Not "the newest": the list orders by created_at, whole seconds, then id.
    (job,) = [j for j in _jobs(server, session) if j["id"] not in known]
    return {"wall_s": wall, "job_s": job["timings"]["total_s"], "cpu_s": cpu_s, "mp4": mp4}


def _jobs(server: ServeProcess, session: requests.Session) -> list[dict]:
    # The first page of 100 (the most the server lists) holds every job of the last second or more.
    return session.get(f"{server.url}/v1/videos", params={"limit": "100"}, timeout=30).json()["data"]


def _job_ids(server: ServeProcess, session: requests.Session) -> set[str]:
    return {job["id"] for job in _jobs(server, session)}


def videos(server: ServeProcess, session: requests.Session, body: dict, poll_s: float) -> dict:
    """(c): submit, poll every `poll_s`, fetch the content."""
    server_cpu = server.cpu_s()
    cpu, began = time.process_time(), time.perf_counter()
    response = session.post(f"{server.url}/v1/videos", json=body, timeout=30)
    if response.status_code != 202:
        raise RuntimeError(f"POST /v1/videos answered {response.status_code}, not 202: {response.text[:300]}")
    job_id, estimated_s, polls = response.json()["id"], response.json()["estimated_s"], 0
    while True:
        time.sleep(poll_s)
        status = session.get(f"{server.url}/v1/videos/{job_id}", timeout=30).json()
        polls += 1
        if status["status"] == "completed":
            break
        if status["status"] in ("failed", "cancelled"):
            raise RuntimeError(f"job {job_id} {status['status']}: {status.get('error')}")
    content = session.get(f"{server.url}/v1/videos/{job_id}/content", timeout=30)
    content.raise_for_status()
    wall, client_cpu = time.perf_counter() - began, time.process_time() - cpu
    return {"wall_s": wall, "job_s": status["timings"]["total_s"], "polls": polls, "estimated_s": estimated_s,
            "cpu_s": server.cpu_s() - server_cpu + client_cpu, "mp4": content.content}  # fmt: skip


def bench_overhead(server: ServeProcess, pipeline, args: argparse.Namespace) -> tuple[list[dict], list[float], list[float]]:
    """One row per path, the server's `estimated_s` for every /v1/videos job in submission order, and
    the 1-minute load average at the start of every round."""
    paths = {"(a) in-process": lambda session, body: in_process(pipeline, body),
             "(b) /invocations, sync": lambda session, body: invocations(server, session, body)}  # fmt: skip
    for poll_ms in args.poll_ms:
        paths[f"(c) /v1/videos, poll {poll_ms:g} ms"] = lambda session, body, s=poll_ms / 1000: videos(server, session, body, s)
    names = list(paths)
    samples: dict[str, list[dict]] = {name: [] for name in names}
    mismatched, estimates, loads = 0, [], []
    session = requests.Session()
    for round_index in range(args.warmup + args.requests):
        body = request_body(round_index, args.num_frames, args.steps)
        loads.append(os.getloadavg()[0])
        order = names[round_index % len(names) :] + names[: round_index % len(names)]  # rotate: no path always first
        results = {name: paths[name](session, body) for name in order}
        digests = {hashlib.sha256(r["mp4"]).hexdigest() for r in results.values()}
        mismatched += len(digests) > 1
        estimates += [results[name]["estimated_s"] for name in order if "estimated_s" in results[name]]
        if round_index >= args.warmup:
            for name, result in results.items():
                samples[name].append({k: v for k, v in result.items() if k != "mp4"})
        logger.info("round %d/%d: %s", round_index + 1, args.warmup + args.requests,
                    ", ".join(f"{name.split()[0]} {1000 * results[name]['wall_s']:.0f} ms" for name in names))  # fmt: skip
    session.close()
    if mismatched:
        raise RuntimeError(f"{mismatched} rounds gave different MP4 bytes on different paths for the same request")

    base_wall = statistics.median(s["wall_s"] for s in samples[names[0]])
    base_cpu = statistics.median(s["cpu_s"] for s in samples[names[0]])
    rows = []
    for name in names:
        walls = sorted(s["wall_s"] for s in samples[name])
        wall, cpu = statistics.median(walls), statistics.median(s["cpu_s"] for s in samples[name])
        # Paired: each round ran every path on the same request within a few seconds of each other.
        pairs = list(zip(samples[name], samples[names[0]]))
        paired = statistics.median(s["wall_s"] / a["wall_s"] - 1 for s, a in pairs)
        rows.append({
            "path": name, "requests": len(walls),
            "wall_ms_median": round(1000 * wall, 1), "wall_ms_p90": round(1000 * walls[int(0.9 * (len(walls) - 1))], 1),
            "overhead": round(wall / base_wall - 1, 4), "overhead_paired_median": round(paired, 4),
            "job_ms_median": round(1000 * statistics.median(s["job_s"] for s in samples[name]), 1),
            # What the client waits for outside the server's job: HTTP, parsing, the store, base64, polling.
            "outside_job_ms_median": round(1000 * statistics.median(s["wall_s"] - s["job_s"] for s in samples[name]), 1),
            "cpu_ms_median": round(1000 * cpu, 1), "cpu_overhead": round(cpu / base_cpu - 1, 4),
            "cpu_ms_paired_median": round(1000 * statistics.median(s["cpu_s"] - a["cpu_s"] for s, a in pairs), 1),
            "polls_median": statistics.median(s["polls"] for s in samples[name]) if "polls" in samples[name][0] else None,
            "samples": samples[name],
        })  # fmt: skip
    return rows, estimates, loads


def bench_calls(server: ServeProcess, calls: int) -> list[dict]:
    """Wall and CPU ms of one call of each read endpoint on the idle server (nothing generating):
    what one poll costs, and the floor under every HTTP path."""
    session = requests.Session()
    job_id = _jobs(server, session)[0]["id"]  # any completed job
    rows = []
    for name, path in [("GET /health", "/health"), ("GET /v1/videos/{id}", f"/v1/videos/{job_id}"),
                       ("GET /v1/videos/{id}/content", f"/v1/videos/{job_id}/content")]:  # fmt: skip
        session.get(server.url + path, timeout=30).raise_for_status()
        server_cpu = server.cpu_s()
        cpu, began = time.process_time(), time.perf_counter()
        for _ in range(calls):
            session.get(server.url + path, timeout=30).raise_for_status()
        wall, client_cpu = time.perf_counter() - began, time.process_time() - cpu
        rows.append({"call": name, "calls": calls, "wall_ms": round(1000 * wall / calls, 2),
                     "server_cpu_ms": round(1000 * (server.cpu_s() - server_cpu) / calls, 2),
                     "client_cpu_ms": round(1000 * client_cpu / calls, 2)})  # fmt: skip
    session.close()
    return rows


# --- 2. burst ----------------------------------------------------------------------------


class RssSampler:
    """The server tree's RSS every `period_s`, in a thread, while the burst runs."""

    def __init__(self, server: ServeProcess, period_s: float = 0.1) -> None:
        self.server, self.period_s = server, period_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.server.rss_bytes())
            self._stop.wait(self.period_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def one_burst(server: ServeProcess, args: argparse.Namespace, burst: int) -> dict:
    barrier = threading.Barrier(args.clients)
    answers: list[dict | None] = [None] * args.clients

    def client(index: int) -> None:
        body = request_body(1000 * (burst + 1) + index, args.num_frames, args.steps)
        barrier.wait()
        began = time.perf_counter()
        try:
            response = requests.post(f"{server.url}/v1/videos", json=body, timeout=60)  # a new connection per client
            answers[index] = {"status": response.status_code, "ms": 1000 * (time.perf_counter() - began),
                              "retry_after": response.headers.get("Retry-After"),
                              "id": response.json().get("id") if response.status_code == 202 else None}  # fmt: skip
        except requests.RequestException as exc:  # lost: counted, never raised from a thread
            answers[index] = {"status": None, "ms": 1000 * (time.perf_counter() - began), "error": str(exc)[:200]}

    rss_before = server.rss_bytes()
    cpu_before, began = server.cpu_s(), time.perf_counter()
    with RssSampler(server) as sampler:
        threads = [threading.Thread(target=client, args=(i,), name=f"client-{i}") for i in range(args.clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        answered_s = time.perf_counter() - began
        accepted = [a["id"] for a in answers if a and a["status"] == 202]
        finals, pending, session = {}, set(accepted), requests.Session()
        deadline = time.monotonic() + 60 + 10 * len(accepted)
        while pending and time.monotonic() < deadline:
            time.sleep(0.5)  # one sweep of the accepted jobs per 0.5 s: polls must not slow the drain they measure
            for job_id in sorted(pending):
                status = session.get(f"{server.url}/v1/videos/{job_id}", timeout=30).json()
                if status["status"] in ("completed", "failed", "cancelled"):
                    finals[job_id] = status["status"]
                    pending.discard(job_id)
        drained_s = time.perf_counter() - began
    contents_ok = sum(
        1 for job_id, final in finals.items()
        if final == "completed" and (c := session.get(f"{server.url}/v1/videos/{job_id}/content", timeout=30)).status_code == 200
        and c.headers.get("content-type") == "video/mp4" and len(c.content) > 0
    )  # fmt: skip
    session.close()
    cpu_s = server.cpu_s() - cpu_before
    time.sleep(1.0)  # let the allocator settle before reading "after"
    codes: dict[str, int] = {}
    for answer in answers:
        key = str(answer["status"]) if answer else "none"
        codes[key] = codes.get(key, 0) + 1
    refused = [a for a in answers if a and a["status"] == 429]
    retry_after = [int(a["retry_after"]) for a in refused if (a["retry_after"] or "").isdigit()]
    post_ms = sorted(a["ms"] for a in answers if a)
    accepted_ms = [a["ms"] for a in answers if a and a["status"] == 202]
    return {
        "burst": burst + 1, "clients": args.clients, "codes": codes,
        "accepted": len(accepted), "refused_429": len(refused),
        "only_202_or_429": set(codes) <= {"202", "429"},
        "429_with_retry_after": len(retry_after), "retry_after_s": sorted(set(retry_after)),
        "completed": sum(1 for f in finals.values() if f == "completed"), "lost": len(accepted) - len(finals),
        "not_completed": sum(1 for f in finals.values() if f != "completed"), "contents_ok": contents_ok,
        "post_ms_median": round(statistics.median(post_ms), 1), "post_ms_max": round(post_ms[-1], 1),
        "post_ms_median_202": round(statistics.median(accepted_ms), 1) if accepted_ms else None,
        "post_ms_median_429": round(statistics.median(a["ms"] for a in refused), 1) if refused else None,
        "answered_s": round(answered_s, 3), "drained_s": round(drained_s, 2), "server_cpu_s": round(cpu_s, 2),
        "rss_before_mib": round(rss_before / 2**20, 1), "rss_peak_mib": round(max(sampler.peak, rss_before) / 2**20, 1),
        "rss_after_mib": round(server.rss_bytes() / 2**20, 1),
    }  # fmt: skip


# --- report ------------------------------------------------------------------------------


def machine() -> str:
    name = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        models = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        name = models[0] if models else name
    return f"{os.cpu_count()} x {name}, no GPU, torch {torch.__version__} (torch threads per process, here and in the server: {torch.get_num_threads()})"


def git(*command: str) -> str:
    return subprocess.run(["git", *command], cwd=REPO, capture_output=True, text=True).stdout.strip()


def markdown(result: dict) -> str:
    lines = [
        f"Machine: {result['machine']}, shared with other jobs (load average {result['load_before']} before, "
        f"{result['load_after']} after, 1-minute load {result['load_1min_during_overhead'][0]}-"
        f"{result['load_1min_during_overhead'][1]} during the overhead rounds); commit {result['commit']}{' + local changes' if result['local_changes'] else ''}",
        f"Served by: {'`reelforge serve --ray` (Ray Serve: ingress + one generator replica, local Ray)' if result.get('ray') else '`reelforge serve`'}",
        f"Model: DiT preset {result['model']['preset']} ({result['model']['params_M']}M), {result['model']['autoencoder']} "
        f"autoencoder, {result['model']['text_encoder']}; requests of {result['num_frames']} frames "
        f"{result['model']['size']}, {result['steps']} steps, guidance 5; server ready in {result['server_ready_s']:.1f} s "
        f"(load + warm-up); same MP4 bytes on every path: {result['identical_mp4']}",
        "",
        "| path | requests | wall ms (median) | wall ms (p90) | overhead vs (a) | paired overhead (median) "
        "| server job ms | wall - job ms | CPU ms (server + client) | CPU vs (a) | CPU vs (a), paired ms | polls |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["overhead"]:
        polls = "" if r["polls_median"] is None else f"{r['polls_median']:g}"
        lines.append(
            f"| {r['path']} | {r['requests']} | {r['wall_ms_median']:.0f} | {r['wall_ms_p90']:.0f} | {100 * r['overhead']:+.1f}% | "
            f"{100 * r['overhead_paired_median']:+.1f}% | {r['job_ms_median']:.0f} | {r['outside_job_ms_median']:.0f} | "
            f"{r['cpu_ms_median']:.0f} | {100 * r['cpu_overhead']:+.1f}% | {r['cpu_ms_paired_median']:+.0f} | {polls} |"
        )  # fmt: skip
    job_ms = result["overhead"][1]["job_ms_median"]
    lines += [
        "",
        f"The server's own estimate (`estimated_s` at submit) of these jobs: {result['estimated_s'][0]:g} s for the first, "
        f"{result['estimated_s'][-1]:g} s for the last; they take {job_ms / 1000:.2f} s (median server job time, /invocations).",
        "",
        "| one call on the idle server (keep-alive) | wall ms | server CPU ms | client CPU ms |",
        "|---|---:|---:|---:|",
        *(f"| {c['call']} | {c['wall_ms']:.1f} | {c['server_cpu_ms']:.1f} | {c['client_cpu_ms']:.1f} |" for c in result["calls"]),
        "",
        f"Burst: {result['bursts'][0]['clients']} concurrent clients, one POST /v1/videos each, --max-queue {result['max_queue']}",
        "",
        "| burst | 202 | 429 | other | 429 with Retry-After (values s) | completed / accepted | lost | content ok "
        "| POST ms median / max | all answered s | drained s | RSS before / peak / after MiB |",
        "|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for b in result["bursts"]:
        other = sum(n for code, n in b["codes"].items() if code not in ("202", "429"))
        values = ",".join(map(str, b["retry_after_s"]))
        lines.append(
            f"| {b['burst']} | {b['accepted']} | {b['refused_429']} | {other} | {b['429_with_retry_after']} ({values}) | "
            f"{b['completed']} / {b['accepted']} | {b['lost']} | {b['contents_ok']} | {b['post_ms_median']:.0f} / {b['post_ms_max']:.0f} | "
            f"{b['answered_s']:.2f} | {b['drained_s']:.1f} | {b['rss_before_mib']:.0f} / {b['rss_peak_mib']:.0f} / {b['rss_after_mib']:.0f} |"
        )  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=15, help="measured rounds (one request through every path each)")
    parser.add_argument("--warmup", type=int, default=2, help="rounds run first and not measured")
    parser.add_argument("--poll-ms", default="25,250", help="polling intervals of the /v1/videos client, comma-separated")
    parser.add_argument("--num-frames", type=int, default=None, help="frames per request (default: the preset's trained length)")
    parser.add_argument("--steps", type=int, default=30, help="denoising steps per request (30: the bundle's default)")
    parser.add_argument("--calls", type=int, default=100, help="calls per read endpoint on the idle server")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients in a burst")
    parser.add_argument("--max-queue", type=int, default=8, help="the server's --max-queue")
    parser.add_argument("--bursts", type=int, default=3)
    # Torch threads per process, here and in the server (OMP_NUM_THREADS); 0: torch's default, one
    # per core, which is how `reelforge serve` runs unless told. On a shared host two OpenMP threads
    # per process wait on each other among other jobs: a ~1 s tiny-preset request took 1-66 s at load
    # 5-7 on 2 cores, in-process as much as served, and its CPU time grew 5-7x (docs/benchmarks.md).
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ray", action="store_true", help="serve with `reelforge serve --ray` (Ray Serve) instead")
    parser.add_argument("--json", type=Path, help="default: benchmarks/results/serve.json (serve-ray.json with --ray)")
    args = parser.parse_args(argv)
    args.json = args.json or REPO / "benchmarks" / "results" / ("serve-ray.json" if args.ray else "serve.json")
    setup_logging()
    try:
        args.poll_ms = [float(p) for p in args.poll_ms.split(",")]
    except ValueError:
        parser.error(f"--poll-ms must be comma-separated numbers, got {args.poll_ms!r}")
    if args.threads < 0:
        parser.error(f"--threads must be >= 0, got {args.threads}")
    for name in ("requests", "calls", "clients", "max_queue", "bursts", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")

    from model.pipeline import load_pipeline

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    load_before = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rf-serve-bench-") as work:
        work = Path(work)
        bundle, model = make_bundle(work / "bundle")
        args.num_frames = args.num_frames or model["num_frames"]
        pipeline = load_pipeline(bundle, device="cpu")
        logger.info("starting reelforge serve%s (--max-queue %d)", " --ray" if args.ray else "", args.max_queue)
        server = ServeProcess(bundle, work / "store", args.max_queue, args.threads, work / "serve.log", ray=args.ray)
        try:
            logger.info("server ready in %.1f s; overhead: %d + %d rounds", server.ready_s, args.warmup, args.requests)
            overhead, estimates, loads = bench_overhead(server, pipeline, args)
            del pipeline  # the burst measures the server alone
            calls = bench_calls(server, args.calls)
            bursts = []
            for burst in range(args.bursts):
                bursts.append(one_burst(server, args, burst))
                logger.info("burst %d: %s", burst + 1, {k: bursts[-1][k] for k in ("codes", "completed", "lost", "rss_peak_mib")})
        except BaseException:
            logger.error("server log tail:\n%s", (work / "serve.log").read_text(errors="replace")[-3000:])
            raise
        finally:
            server.stop()

    result = {
        "machine": machine(), "load_before": load_before, "load_after": ", ".join(f"{v:.1f}" for v in os.getloadavg()),
        "commit": git("rev-parse", "--short", "HEAD"),
        "local_changes": bool(git("status", "--porcelain", "--", "infra/serve", "model")),
        "argv": sys.argv[1:] if argv is None else argv, "model": model, "num_frames": args.num_frames, "steps": args.steps,
        "max_queue": args.max_queue, "ray": args.ray, "server_ready_s": round(server.ready_s, 1), "identical_mp4": True,
        "wall_s": round(time.perf_counter() - began, 1), "threads": torch.get_num_threads(),
        "load_1min_during_overhead": [round(min(loads), 1), round(max(loads), 1)],
        "overhead": overhead, "estimated_s": estimates, "calls": calls, "bursts": bursts,
    }  # fmt: skip
    bad = [b["burst"] for b in bursts if not b["only_202_or_429"] or b["lost"] or b["not_completed"]
           or b["429_with_retry_after"] != b["refused_429"] or b["contents_ok"] != b["accepted"]]  # fmt: skip
    print(markdown(result))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    logger.info("wrote %s (%.0f s in all)", args.json, result["wall_s"])
    if bad:
        logger.error("bursts %s broke a promise: an answer other than 202/429, a 429 without Retry-After, or a lost job", bad)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
