"""Offline evaluation of a model with metrics that need no downloaded weights, and the promotion gate.

    plan = build_plan("data/shards", EvalSettings())                 # held-out prompts and clips
    metrics = evaluate_bundle("runs/tiny/bundle", plan, EvalSettings())
    result = evaluate_version("models:/fox@candidate", tracking_uri=uri, settings=EvalSettings())
    worse = regressions(candidate.metrics, champion.metrics, tolerance=0.1)

Generated with fixed seeds (item i of the plan gets `settings.seed + i`), so two versions see the
same prompts, clips and noise: each text prompt as a long video of `long_windows` trained lengths,
and each held-out clip in every conditioning mode the model was trained for (the card's modes, else
image and extend). Metrics (training/eval_metrics.py; lower is better unless said; docs/evaluation.md has the reasoning):

* `fidelity_psnr` (dB, higher), `fidelity_ssim` (higher): the output frames that reproduce the
  conditioning frames (metadata["anchor_frames"]) against those frames as the pipeline read them.
* `flicker`: mean absolute luma change (0..1) between consecutive frames left after warping the
  second onto the first with Farneback optical flow: change that motion does not explain.
* `flow_accel` (pixels/frame^2): mean |F[t+1](x + F[t](x)) - F[t](x)|, the change of optical flow
  along motion trajectories; 0 for constant motion (optical-flow smoothness).
* `drift`: on each long text video, the largest change of brightness, contrast or sharpness from
  its first trained-length stretch of frames to its last.

Held-out clips: the `clips` clips of the shards with the smallest `training.clip_index.eval_rank`, among
those `data.held_out` kept out of training (`training.clip_index.is_held_out`, the fraction read from the
version's tag reelforge.data.held_out; the gate uses the smaller fraction of its two versions, the
clips held out from both). None held out: text prompts only. A version trained without a split
(no tag, or 0) gets the smallest ranks as before, and EvalResult.seen_in_training says it saw them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from training.eval_metrics import drift, flicker, flow_accel, flows_of, psnr, ssim

logger = logging.getLogger(__name__)

# metric -> True when higher is better
HIGHER_IS_BETTER: dict[str, bool] = {"fidelity_psnr": True, "fidelity_ssim": True,
                                     "flicker": False, "flow_accel": False, "drift": False}  # fmt: skip
# Differences below these never count as worse, whatever the relative tolerance: a champion at
# ~0 flicker would otherwise refuse a candidate for measurement noise (0.0010 vs 0.0012 is +20%).
ABSOLUTE_SLACK: dict[str, float] = {
    "fidelity_psnr": 0.5,  # dB
    "fidelity_ssim": 0.01,
    "flicker": 0.005,  # half a percent of the luma range
    "flow_accel": 0.05,  # pixels / frame^2
    "drift": 0.01,
}
# Lossless anchors (the pixel autoencoder) give inf dB; capped so means and MLflow metrics stay finite.
PSNR_CAP_DB = 100.0
TAG_EVAL_PREFIX = "reelforge.eval."  # version tags: reelforge.eval.<metric>, reelforge.eval.run_id
TAG_FORCED = "reelforge.promoted_with_force"
TAG_FORCE_REASON = "reelforge.promote_force_reason"
# Prompts used when held-out captions are fewer than --prompts: plain scenes any model can attempt.
BUILTIN_PROMPTS = ("a red circle moving right on a dark blue background", "a person walking on a beach at sunset",
                   "waves rolling onto a rocky shore", "clouds drifting over a green hill")  # fmt: skip


# --- what to evaluate on -------------------------------------------------------------------


@dataclass(frozen=True)
class EvalSettings:
    """How much to generate; the defaults keep one evaluation to seconds on a CPU for tiny models."""

    prompts: int = 2  # text prompts, each generated as one long video
    clips: int = 2  # held-out clips, each conditioning every trained mode
    steps: int = 8  # Euler steps per window: few, both versions alike
    seed: int = 0
    long_windows: int = 3  # length of the text videos, in trained lengths (>= 2 to measure drift)

    def __post_init__(self) -> None:
        for name, least in (("prompts", 0), ("clips", 0), ("steps", 1), ("long_windows", 2)):  # 2: drift compares windows
            if getattr(self, name) < least:
                raise ValueError(f"{name} {getattr(self, name)!r} must be >= {least}")
        if self.prompts == 0 and self.clips == 0:
            raise ValueError("nothing to evaluate: prompts and clips are both 0")


@dataclass
class EvalClip:
    id: str
    caption: str
    mp4: bytes = field(repr=False)


@dataclass
class EvalPlan:
    """The prompts and held-out clips every evaluated version gets, in this order."""

    prompts: list[str]
    clips: list[EvalClip]
    data_dir: str | None = None
    data_manifest_sha256: str | None = None
    held_out: float = 0.0  # the data.held_out whose held-out clips these are; 0: smallest ranks, no split
    note: str = ""  # said in the output: where clips came from, or why there are none


def held_out_of(tags: Mapping[str, str]) -> float:
    """The data.held_out a version trained with, from its tags; 0 (no split) for versions without the tag."""
    from training.tracking import TAG_HELD_OUT

    return float(tags.get(TAG_HELD_OUT) or 0.0)


def build_plan(data_dir: str | None, settings: EvalSettings, held_out: float = 0.0) -> EvalPlan:
    """Held-out clips of `data_dir` (their captions are the first prompts), then built-in prompts.
    `held_out` > 0: only clips that fraction kept out of training (`held_out_of`); 0: the smallest ranks."""
    clips: list[EvalClip] = []
    manifest, note = None, "no shards (--data): text prompts only (flicker, flow, drift)"
    if data_dir is not None and settings.clips > 0:
        clips, manifest, num_held_out = _read_clips(data_dir, settings.clips, held_out)
        split = f"kept out of training by data.held_out={held_out:g}" if held_out > 0 else "lowest ranks: no split to draw from"
        note = f"{len(clips)} held-out clip(s) of {data_dir} ({split})"
        if held_out > 0 and num_held_out == 0:
            note = f"no clip of {data_dir} is held out at data.held_out={held_out:g}: text prompts only (flicker, flow, drift)"
            logger.warning("%s", note)
    captions = [clip.caption for clip in clips if clip.caption.strip()]
    prompts = list(dict.fromkeys(captions + list(BUILTIN_PROMPTS)))[: settings.prompts]
    if not prompts and not clips:
        raise ValueError(f"nothing to evaluate: --prompts 0 and no held-out clips ({note})")
    return EvalPlan(prompts, clips, data_dir=data_dir, data_manifest_sha256=manifest, held_out=held_out, note=note)


def _read_clips(data_dir: str, count: int, held_out: float) -> tuple[list[EvalClip], str, int]:
    """(the first `count` decodable clips in `eval_rank` order, among the held-out ones when
    `held_out` > 0; the manifest's sha256; how many clips are held out)."""
    from model.storage import resolve_uri
    from training.clip_index import eval_rank, is_held_out, read_clip_index
    from training.data import iter_shard_samples
    from training.tracking import manifest_sha256

    index = read_clip_index(data_dir)  # one-line ValueError for a folder that is no finished ingest
    ranked = [clip_id for clip_id in sorted(index.ids, key=eval_rank) if held_out == 0 or is_held_out(clip_id, held_out)]
    chosen = ranked[:count]
    wanted = set(chosen)
    filesystem, root = resolve_uri(data_dir)
    found: dict[str, EvalClip] = {}
    for shard in sorted({index.shard_of[index.index_of[clip_id]] for clip_id in chosen}):
        for raw in iter_shard_samples(filesystem, f"{root}/{index.shards[shard]}", wanted.__contains__):
            if "mp4" in raw and _decodes(raw["mp4"]):
                caption = raw["txt"].decode("utf-8", errors="replace").strip() if "txt" in raw else ""
                found[raw["__key__"]] = EvalClip(id=raw["__key__"], caption=caption, mp4=raw["mp4"])
    return [found[clip_id] for clip_id in chosen if clip_id in found], manifest_sha256(data_dir), len(ranked)


def _decodes(mp4: bytes) -> bool:
    """A clip that cannot be decoded is left out (for every version alike) rather than failing the run."""
    from model.video_io import read_video

    try:
        return len(read_video(mp4, num_frames=1)) == 1
    except ValueError as exc:
        logger.warning("held-out clip left out: %s", exc)
        return False


# --- evaluating a bundle -------------------------------------------------------------------


def trained_modes(extra: Any) -> list[str]:
    """Conditioning modes to evaluate besides text: the card's (bundle extra["card"]["modes"]) when
    the bundle has one, else image and extend."""
    card = extra.get("card")
    modes = card.get("modes") if isinstance(card, Mapping) else None
    return [mode for mode in ("image", "extend") if modes is None or mode in modes]


def evaluate_bundle(bundle_dir: str | Path, plan: EvalPlan, settings: EvalSettings) -> dict[str, float]:
    """Generate the plan's videos with the bundle and return the metrics (module docstring); a metric
    with nothing to measure (no clips: no fidelity) is left out."""
    from tqdm.auto import tqdm

    from model.pipeline import GenerationRequest, load_pipeline
    from model.video_io import read_image, read_video

    pipeline = load_pipeline(bundle_dir)
    size = pipeline.default_size
    window = pipeline.window_frames
    modes = trained_modes(pipeline.bundle.config.extra)
    items: list[tuple[str, str, EvalClip | None]] = [("text", prompt, None) for prompt in plan.prompts]
    items += [(mode, clip.caption, clip) for clip in plan.clips for mode in modes]
    values: dict[str, list[float]] = {name: [] for name in HIGHER_IS_BETTER}
    long_seconds = settings.long_windows * window / pipeline.fps
    with tempfile.TemporaryDirectory(prefix="reelforge-eval-") as tmp:
        for number, (mode, prompt, clip) in enumerate(tqdm(items, desc="evaluating", unit="video")):
            request = GenerationRequest(prompt=prompt, mode=mode, steps=settings.steps, seed=settings.seed + number)
            given = None  # the conditioning frames as the pipeline reads them
            if mode == "text":
                request.seconds = long_seconds
            elif mode == "image":
                first = read_video(clip.mp4, num_frames=1, fps=pipeline.fps, size=size)[0].numpy()  # (H, W, 3)
                request.image = Path(tmp) / f"{number}.png"
                cv2.imwrite(str(request.image), cv2.cvtColor(first, cv2.COLOR_RGB2BGR))
                given = read_image(request.image, size=size).numpy()[None]  # (1, H, W, 3)
            else:
                request.video = Path(tmp) / f"{number}.mp4"
                request.video.write_bytes(clip.mp4)
            video = pipeline.generate(request)
            frames = video.frames.cpu().numpy()  # (T, H, W, 3)
            if clip is not None:
                anchors = video.metadata["anchor_frames"]
                held = np.concatenate([frames[start:end] for start, end in anchors])
                if given is None:  # extend: the last frames of the clip, read as the pipeline reads them
                    given = read_video(request.video, last_frames=len(held), fps=pipeline.fps, size=size).numpy()
                values["fidelity_psnr"].append(min(psnr(held, given[: len(held)]), PSNR_CAP_DB))
                values["fidelity_ssim"].append(ssim(held, given[: len(held)]))
            flows = flows_of(frames)
            values["flicker"].append(flicker(frames, flows))
            values["flow_accel"].append(flow_accel(frames, flows))
            if mode == "text":
                values["drift"].append(drift(frames, window))
    return {name: float(np.nanmean(v)) for name, v in values.items() if v and not np.isnan(v).all()}


# --- a registered version -------------------------------------------------------------------


@dataclass
class EvalResult:
    name: str
    version: str
    metrics: dict[str, float]
    plan: EvalPlan
    run_id: str | None = None  # the MLflow run the metrics were logged to
    seen_in_training: bool = False  # this version trained on some of the plan's clips (`trained_on_plan`)


def resolve_version(client: Any, model_uri: str) -> Any:
    """`models:/NAME@ALIAS` or `models:/NAME/N` -> that ModelVersion; one-line ValueError otherwise."""
    from mlflow.exceptions import MlflowException

    match = re.fullmatch(r"models:/([^/@]+)(?:@([^/@]+)|/(\d+))", model_uri)
    if match is None:
        raise ValueError(f"model {model_uri!r}: give models:/NAME@ALIAS or models:/NAME/VERSION")
    name, alias, number = match.groups()
    try:
        return client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, number)
    except MlflowException:
        raise ValueError(f"model {model_uri!r}: no such registered version") from None


def training_data_dir(client: Any, version: Any) -> str | None:
    """The shards the version trained on, when this machine can still see them: the training output
    folder (tag reelforge.out on the version or its run) records them in run.json."""
    from training.run_dir import RUN_RECORD
    from training.tracking import TAG_OUT

    out = version.tags.get(TAG_OUT)
    if out is None and version.run_id:
        out = client.get_run(version.run_id).data.tags.get(TAG_OUT)
    record = Path(out) / RUN_RECORD if out else None
    if record is None or not record.is_file():
        return None
    data = json.loads(record.read_text()).get("data")
    return str(data) if data else None


def evaluate_version(
    model_uri: str,
    *,
    tracking_uri: str,
    settings: EvalSettings,
    data_dir: str | None = None,
    plan: EvalPlan | None = None,
    log: bool = True,
) -> EvalResult:
    """Evaluate a registered version on `plan` (default: built from `data_dir`, else the version's
    training shards) and, with `log`, record the metrics in MLflow (`log_evaluation`)."""
    import mlflow
    from mlflow import MlflowClient

    from training.registry import download_registered_bundle

    client = MlflowClient(tracking_uri)
    version = resolve_version(client, model_uri)
    if plan is None:
        plan = build_plan(data_dir or training_data_dir(client, version), settings, held_out_of(version.tags))
    mlflow.set_tracking_uri(tracking_uri)  # download_registered_bundle reads the current store
    bundle = download_registered_bundle(f"models:/{version.name}/{version.version}")
    metrics = evaluate_bundle(bundle, plan, settings)
    result = EvalResult(name=version.name, version=str(version.version), metrics=metrics, plan=plan)
    result.seen_in_training = trained_on_plan(plan, version.tags)
    if log:
        result.run_id = log_evaluation(client, version, result, settings)
    return result


def trained_on_plan(plan: EvalPlan, tags: Mapping[str, str]) -> bool:
    """Whether the version with `tags` trained on a clip of `plan`: it trained on the plan's shards
    (the same manifest sha256) and some clip lies outside the split it kept out (`held_out_of`)."""
    from training.clip_index import is_held_out
    from training.tracking import TAG_MANIFEST_SHA256

    if plan.data_manifest_sha256 is None or plan.data_manifest_sha256 != tags.get(TAG_MANIFEST_SHA256):
        return False
    return any(not is_held_out(clip.id, held_out_of(tags)) for clip in plan.clips)


def log_evaluation(client: Any, version: Any, result: EvalResult, settings: EvalSettings) -> str:
    """One MLflow run per evaluation, in the experiment of the version's training run: its params
    say what was evaluated, its metrics are linked to the version's logged model (MLflow 3 shows
    them on the model and version pages), evaluation.json holds everything. The version also gets
    tags reelforge.eval.<metric> and reelforge.eval.run_id, readable without opening the run."""
    from mlflow.entities import Metric, Param

    from training.tracking import get_or_create_experiment

    if version.run_id:
        experiment_id = client.get_run(version.run_id).info.experiment_id
    else:
        experiment_id = get_or_create_experiment(client, "reelforge", None)
    plan = result.plan
    run = client.create_run(
        experiment_id,
        run_name=f"eval-{version.name}-v{version.version}",
        tags={"reelforge.eval.model": f"models:/{version.name}/{version.version}"},
    )
    run_id = run.info.run_id
    params = {f"eval.{key}": value for key, value in dataclasses.asdict(settings).items()}
    params |= {
        "eval.prompts_used": json.dumps(plan.prompts)[:6000],
        "eval.clip_ids": ",".join(clip.id for clip in plan.clips)[:6000] or "none",
        "eval.data": plan.data_dir or "none",
        "eval.data_manifest_sha256": plan.data_manifest_sha256 or "none",
        "eval.held_out": plan.held_out,
    }
    # the version's logged model; a SQLite registry leaves model_id unset but names it in `source`
    source = version.source or ""
    model_id = version.model_id or (source.removeprefix("models:/") if source.startswith("models:/m-") else None)
    now_ms = int(time.time() * 1000)
    metrics = [Metric(key, value, now_ms, 0, model_id=model_id, run_id=run_id) for key, value in result.metrics.items()]
    client.log_batch(run_id, metrics=metrics, params=[Param(key, str(value)) for key, value in params.items()])
    client.log_dict(run_id, {"model": f"models:/{version.name}/{version.version}", "metrics": result.metrics,
                             "settings": dataclasses.asdict(settings), "note": plan.note, "held_out": plan.held_out,
                             "prompts": plan.prompts, "clips": [clip.id for clip in plan.clips]}, "evaluation.json")  # fmt: skip
    client.set_terminated(run_id)
    for key, value in result.metrics.items():
        client.set_model_version_tag(version.name, version.version, f"{TAG_EVAL_PREFIX}{key}", f"{value:.6g}")
    client.set_model_version_tag(version.name, version.version, f"{TAG_EVAL_PREFIX}run_id", run_id)
    logger.info("logged evaluation of %s version %s to run %s", version.name, version.version, run_id)
    return run_id


# --- the promotion gate ----------------------------------------------------------------------


def regressions(
    candidate: dict[str, float], champion: dict[str, float], tolerance: float
) -> list[tuple[str, float, float]]:
    """(metric, candidate, champion) for each metric both have on which the candidate is worse by
    more than max(tolerance x |champion|, ABSOLUTE_SLACK[metric]), worst (relative) first."""
    if not 0 <= tolerance:
        raise ValueError(f"tolerance {tolerance!r} must be >= 0 (a fraction: 0.1 = 10%)")
    worse = []
    for metric, higher in HIGHER_IS_BETTER.items():
        if metric not in candidate or metric not in champion:
            continue
        new, old = candidate[metric], champion[metric]
        loss = (old - new) if higher else (new - old)
        if loss > max(tolerance * abs(old), ABSOLUTE_SLACK[metric]):
            worse.append((metric, new, old, loss / max(abs(old), ABSOLUTE_SLACK[metric])))
    return [(metric, new, old) for metric, new, old, _ in sorted(worse, key=lambda w: -w[3])]


@dataclass
class PromotionOutcome:
    promoted: bool
    line: str  # what the command prints: the alias move, or the refusal
    candidate: EvalResult | None = None
    champion: EvalResult | None = None


def promote_with_gate(
    name: str,
    alias: str,
    from_alias: str,
    *,
    tracking_uri: str,
    settings: EvalSettings,
    data_dir: str | None = None,
    tolerance: float = 0.1,
    force: bool = False,
) -> PromotionOutcome:
    """Move `alias` to the version `from_alias` points to, if the candidate is not worse than the
    version `alias` points to now (`regressions`), both evaluated on one plan: its clips are held out
    from both (the smaller data.held_out of the two; by rank alone when either has no split). No
    version at `alias` yet: the candidate alone is evaluated (its metrics recorded) and promoted.
    `force` promotes a worse candidate and records that on it (tags reelforge.promoted_with_force and _force_reason)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from training.registry import check_names, promote

    check_names(name, alias)
    client = MlflowClient(tracking_uri)
    try:
        target = client.get_model_version_by_alias(name, from_alias)
    except MlflowException:
        raise ValueError(f"model {name!r} has no alias {from_alias!r}") from None
    try:
        current = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        current = None  # first time this alias is set
    outcome = PromotionOutcome(promoted=False, line="")
    if current is None or str(current.version) != str(target.version):
        held_out = min(held_out_of(version.tags) for version in (target, current) if version is not None)
        plan = build_plan(data_dir or training_data_dir(client, target), settings, held_out)
        evaluate = dict(tracking_uri=tracking_uri, settings=settings, plan=plan)  # the same plan for both
        outcome.candidate = evaluate_version(f"models:/{name}/{target.version}", **evaluate)
        if current is not None:
            outcome.champion = evaluate_version(f"models:/{name}/{current.version}", **evaluate)
            worse = regressions(outcome.candidate.metrics, outcome.champion.metrics, tolerance)
            if worse:
                parts = ") and ".join(f"{metric} ({new:.3g} vs {old:.3g}" for metric, new, old in worse)
                reason = (f"candidate version {target.version} is worse than champion version {current.version} "
                          f"on {parts}, tolerance {tolerance:.0%})")  # fmt: skip
                if not force:
                    outcome.line = f"refused: {reason}; --force promotes anyway"
                    return outcome
                client.set_model_version_tag(name, target.version, TAG_FORCED, "true")
                client.set_model_version_tag(name, target.version, TAG_FORCE_REASON, f"@{alias}: {reason}")
                outcome.line = f" (forced: {reason})"
    # the version evaluated, not whatever from_alias points to by now
    promote(name, alias, tracking_uri=tracking_uri, version=int(target.version))
    outcome.promoted = True
    outcome.line = f"{name}@{alias} -> version {target.version}{outcome.line}"
    return outcome
