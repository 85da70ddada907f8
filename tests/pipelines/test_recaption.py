"""`reelforge recaption` end to end: real shards, a real local Ray, a real HTTP server on loopback
that speaks chat completions (tests/model/chat_server.py).

Faked, because it cannot exist here: the vision-language model behind the endpoint. The server
answers by the clip's duration, which the prompt carries ("... a 2.5-second video clip"), so
each clip gets a known kind of answer: a clean caption, one with a boilerplate opening, a loop,
a refusal, an HTTP 400. The tiny hf models of tests/model/tiny_vlm.py run through the job in
test_recaption_hf.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from infra.recaption import main
from tests.model.chat_server import ChatServer
from tests.training.conftest import write_shards

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
FPS = 8.0
# Clip durations (frames at 8 fps) and what the "model" answers for each.
ANSWERS = {
    1.0: "A red square slides slowly from left to right across a gray background.",
    1.5: "The video shows a blue circle bouncing in the middle of a dark frame.",
    2.0: "In this video, green stripes scroll upward while the light slowly fades.",
    2.5: "a man walks " * 40,  # a generation loop
    3.0: "I'm sorry, but I can't describe this video.",
    3.5: (400, {"error": {"message": "image too large for this model", "type": "invalid_request_error"}}),
    4.0: "Yellow dots drift apart on a white field as the camera zooms out.",
    4.5: "A purple triangle spins in place; its shadow stretches across the floor.",
}
POISON = 5.0  # this clip's mp4 member is not a video


def answer(body: dict) -> object:
    text = next(part["text"] for part in body["messages"][-1]["content"] if part["type"] == "text")
    seconds = float(re.search(r"a (\d+\.\d)-second video clip", text).group(1))
    return ANSWERS[seconds]


def endpoint_args(server: ChatServer, *extra: str) -> list[str]:
    return [
        "--set", "caption.backend=openai", "--set", f"caption.endpoint={server.url}", "--set", "caption.model=tiny-vlm",
        "--set", "caption.part_clips=3", "--set", "caption.max_retries=1", *(a for x in extra for a in ("--set", x)),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    clips = [
        {"num_frames": int(s * FPS), "fps": FPS, "width": 48, "height": 32, "caption": f"clip of {s} seconds", "bad": s == POISON}
        for s in [*ANSWERS, POISON]
    ]
    return write_shards(tmp_path_factory.mktemp("shards"), clips, clips_per_shard=4)


@pytest.fixture(scope="module")
def server():
    with ChatServer(reply=answer) as chat:
        yield chat


@pytest.fixture(scope="module")
def captioned(ray_local, shards: Path, server: ChatServer, tmp_path_factory) -> Path:
    """The set `clean`, made once for the module's tests (a copy of the shards, so they stay pristine)."""
    before = _tree_digest(shards)
    assert main([str(shards), "--caption-set", "clean", *endpoint_args(server)]) == 0
    assert _tree_digest(shards, skip="captions") == before, "the shards are never rewritten"
    return shards / "captions" / "clean"


def _tree_digest(root: Path, skip: str | None = None) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not (skip and p.relative_to(root).parts[0] == skip)
    }


def _rows(folder: Path) -> dict[str, dict]:
    rows = [row for part in sorted(folder.glob("part-*.parquet")) for row in pq.read_table(part).to_pylist()]
    assert len({r["clip_id"] for r in rows}) == len(rows), "one row per clip"
    return {r["old_caption"]: r for r in rows}


def test_every_clip_gets_a_caption_or_a_failure_with_its_reason(captioned: Path, server: ChatServer) -> None:
    rows = _rows(captioned)
    assert len(rows) == len(ANSWERS) + 1
    ok = {k: r for k, r in rows.items() if r["status"] == "ok"}
    assert ok["clip of 1.0 seconds"]["caption"] == ANSWERS[1.0] and ok["clip of 1.0 seconds"]["stripped"] is None
    assert ok["clip of 1.5 seconds"]["caption"] == "A blue circle bouncing in the middle of a dark frame."
    assert ok["clip of 1.5 seconds"]["stripped"] == "The video shows"
    assert ok["clip of 2.0 seconds"]["caption"].startswith("Green stripes") and ok["clip of 2.0 seconds"]["raw_caption"] == ANSWERS[2.0]
    reasons = {k: r["reason"] for k, r in rows.items() if r["status"] == "failed"}
    assert reasons["clip of 2.5 seconds"].startswith("repetition:")
    assert reasons["clip of 3.0 seconds"].startswith("refused: I'm sorry")
    assert reasons["clip of 3.5 seconds"] == "endpoint answered 400: image too large for this model"
    assert reasons["clip of 5.0 seconds"].startswith("frames: cannot decode the clip")
    assert len(ok) == 5 and all(r["caption"] == "" for k, r in rows.items() if k in reasons)
    # what each row records about how it was made
    manifest = json.loads((captioned / "manifest.json").read_text())
    assert {r["model"] for r in rows.values()} == {"tiny-vlm"} and {r["prompt_hash"] for r in rows.values()} == {manifest["record"]["prompt_hash"]}
    assert all(r["tokens"] > 5 for r in ok.values()) and all(r["frames_used"] == 4 for k, r in rows.items() if k != "clip of 5.0 seconds")
    summary = manifest["summary"]
    assert (summary["clips"], summary["ok"], summary["failed"], summary["stripped"]) == (9, 5, 4, 2)
    assert summary["failure_reasons"] == {"endpoint answered 400": 1, "frames": 1, "refused": 1, "repetition": 1}
    assert (captioned / "_SUCCESS").exists() and not list(captioned.rglob("*.tmp-*"))


def test_requests_carry_the_frames_prompt_and_model(captioned: Path, server: ChatServer) -> None:
    bodies = [r.body for r in server.requests[: len(ANSWERS)]]
    assert len(bodies) == len(ANSWERS), "one request per decodable clip, none for the poison clip"
    for body in bodies:
        assert body["model"] == "tiny-vlm" and body["temperature"] == 0.0 and body["max_tokens"] == 160
        content = body["messages"][-1]["content"]
        images = [part["image_url"]["url"] for part in content if part["type"] == "image_url"]
        assert len(images) == 4 and all(url.startswith("data:image/jpeg;base64,") for url in images)
        assert content[-1]["type"] == "text" and content[-1]["text"].startswith("These are 4 frames in order from a")


def test_a_rerun_asks_nothing_and_a_changed_prompt_is_refused_in_one_line(captioned: Path, shards: Path, server: ChatServer, capsys) -> None:
    asked = len(server.requests)
    assert main([str(shards), "--caption-set", "clean", *endpoint_args(server)]) == 0
    assert "nothing new" in capsys.readouterr().out and len(server.requests) == asked
    with pytest.raises(SystemExit) as refused:
        main([str(shards), "--caption-set", "clean", *endpoint_args(server, "caption.prompt=Describe the {frames} frames.")])
    message = str(refused.value)
    assert message.startswith("recaption: caption set") and "changed: prompt" in message and "\n" not in message
    assert len(server.requests) == asked


def test_report_shows_old_and_new_captions_in_a_browser(captioned: Path, tmp_path: Path) -> None:
    from tests.pipelines.test_report import _chromium

    dom = _chromium(["--virtual-time-budget=5000", "--dump-dom", (captioned / "report.html").as_uri()], tmp_path)
    check = re.search(r'id="thumb-check" data-decoded="(\d+)" data-total="(\d+)"', dom)
    assert check and int(check.group(1)) == int(check.group(2)) == 8, "every decodable sampled clip has a thumbnail that decodes"
    assert dom.count('class="clip" data-status="failed"') == 4 and dom.count('class="clip" data-status="ok"') == 5
    assert 'data-kind="repetition"' in dom and 'data-kind="endpoint answered 400"' in dom
    assert "The video shows</td><td>1</td>" in dom and "clip of 1.5 seconds</td><td>A blue circle" in dom


def test_the_endpoint_failing_stops_the_job_in_one_line_and_a_rerun_finishes(ray_local, shards: Path, server: ChatServer) -> None:
    server.fail_next(503, times=2)  # the first clip's try and its one retry: the job stops
    with pytest.raises(SystemExit) as stopped:
        main([str(shards), "--caption-set", "outage", *endpoint_args(server, "caption.concurrency=1", "caption.part_clips=9")])
    message = str(stopped.value)
    assert "gave up after 2 tries" in message and "rerun the same command to resume" in message and "\n" not in message
    folder = shards / "captions" / "outage"
    assert not (folder / "_SUCCESS").exists() and not list(folder.glob("part-*.parquet")), "no clip blamed for the outage"
    assert main([str(shards), "--caption-set", "outage", *endpoint_args(server, "caption.concurrency=1", "caption.part_clips=9")]) == 0
    assert len(_rows(folder)) == len(ANSWERS) + 1


def test_sigkill_midway_then_rerun_equals_a_clean_run(ray_local, captioned: Path, shards: Path, tmp_path: Path) -> None:
    with ChatServer(reply=answer, latency_s=0.4) as slow:
        args = [str(shards), "--caption-set", "killed", *endpoint_args(slow, "caption.concurrency=1", "caption.part_clips=2")]
        env = os.environ | {"RAY_ADDRESS": ray_local.get_runtime_context().gcs_address, "PYTHONPATH": str(REPO)}
        log = tmp_path / "killed.log"
        with log.open("wb") as sink:
            process = subprocess.Popen([sys.executable, "-m", "infra", "recaption", *args], cwd=REPO, env=env, start_new_session=True, stdout=sink, stderr=sink)
        folder = shards / "captions" / "killed"
        deadline = time.monotonic() + 180
        try:
            while not list(folder.glob("part-*.parquet")):
                assert process.poll() is None, log.read_text(errors="replace")[-3000:]
                assert time.monotonic() < deadline, "no part appeared"
                time.sleep(0.05)
        finally:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        assert not (folder / "_SUCCESS").exists(), "the run was meant to die mid-way"
        committed = {r["clip_id"] for part in folder.glob("part-*.parquet") for r in pq.read_table(part).to_pylist()}
        asked_before = len(slow.requests)
        assert main(args) == 0
        asked_by_rerun = len(slow.requests) - asked_before
    fields = ("caption", "raw_caption", "status", "reason", "stripped", "truncated", "tokens", "frames_used")
    clean, resumed = _rows(captioned), _rows(folder)
    assert {k: [r[f] for f in fields] for k, r in resumed.items()} == {k: [r[f] for f in fields] for k, r in clean.items()}
    poison = next(r["clip_id"] for r in clean.values() if (r["reason"] or "").startswith("frames:"))
    assert 0 < asked_by_rerun <= len(ANSWERS) - len(committed - {poison}), "the rerun asks only for clips no part holds"
    assert json.loads((folder / "manifest.json").read_text())["set_id"] == json.loads((captioned / "manifest.json").read_text())["set_id"]


def test_ingest_captions_with_an_endpoint_from_the_frames_it_holds(ray_local, tmp_path: Path) -> None:
    """caption.backend=openai at ingest: one request per kept clip, with frames of that clip (no
    second decode: the frames ingest holds), the reply cleaned into the manifest and the shard."""
    from fractions import Fraction

    from infra.footage import FootageSpec, varied_shots, write_video
    from infra.ingest import main as ingest
    from tests.model.chat_server import default_caption

    source = tmp_path / "src" / "v0.mp4"
    source.parent.mkdir()
    write_video(FootageSpec("v0", "mp4", "libx264", 160, 120, Fraction(12), varied_shots([("moving", 2.5)] * 2)), source)
    with ChatServer() as server:
        settings = ["clips.min_seconds=1.0", "clips.max_seconds=2.0", "clips.fps=8", "clips.size=64x64", "caption.frames=3",
                    "caption.backend=openai", f"caption.endpoint={server.url}", "caption.model=tiny-vlm"]  # fmt: skip
        assert ingest([str(source.parent), "--out", str(tmp_path / "out"), *(a for s in settings for a in ("--set", s))]) == 0
        bodies = [r.body for r in server.requests]
    manifest = pq.read_table(tmp_path / "out" / "manifest.parquet").to_pylist()
    assert len(manifest) >= 2 and len(bodies) == len(manifest), "one request per kept clip"
    assert sorted(r["caption"] for r in manifest) == sorted(default_caption(b) for b in bodies)
    assert {r["caption_model"] for r in manifest} == {"tiny-vlm"}
    for body in bodies:
        images = [p for p in body["messages"][-1]["content"] if p["type"] == "image_url"]
        assert len(images) == 3 and body["messages"][-1]["content"][-1]["text"].startswith("These are 3 frames in order from a")


def test_a_local_hf_model_captions_through_the_job(ray_local, shards: Path, tmp_path: Path) -> None:
    """caption.backend=hf on a tiny random Qwen2-VL saved by the test (no model hub here): its
    generate() output for each clip's frames lands in the set, with the folder's content hash as
    the revision the set and every row record."""
    from model.chat_hf import resolve_revision
    from tests.model.tiny_vlm import save_tiny_qwen2_vl

    folder = save_tiny_qwen2_vl(tmp_path / "tiny-qwen2-vl")
    args = [str(shards), "--caption-set", "hf", "--set", "caption.backend=hf", "--set", f"caption.model={folder}",
            "--set", "caption.max_new_tokens=12", "--set", "caption.min_words=1", "--set", "caption.frames=2",
            "--set", "caption.max_pixels=3136", "--set", "caption.batch_size=4"]  # fmt: skip
    assert main(args) in (0, 1)  # random weights may fail every caption (a loop); the rows say why
    rows = _rows(shards / "captions" / "hf")
    revision = resolve_revision(str(folder))
    assert revision.startswith("sha256:") and {r["revision"] for r in rows.values()} == {revision}
    assert json.loads((shards / "captions" / "hf" / "manifest.json").read_text())["record"]["revision"] == revision
    decodable = {k: r for k, r in rows.items() if k != f"clip of {POISON} seconds"}
    assert len(decodable) == len(ANSWERS) and all(r["raw_caption"] is not None and r["output_tokens"] for r in decodable.values())
    assert all(r["frames_used"] == 2 and (r["status"] == "ok" or r["reason"]) for r in decodable.values())


def test_materialize_writes_shards_whose_captions_are_the_sets(captioned: Path, shards: Path, server: ChatServer, tmp_path: Path, capsys) -> None:
    import tarfile

    from training.clip_index import read_clip_index

    out = tmp_path / "materialized"
    assert main([str(shards), "--caption-set", "clean", *endpoint_args(server), "--materialize", str(out)]) == 0
    assert "materialized 5 clips into" in capsys.readouterr().out
    ok = {r["clip_id"]: r for r in _rows(captioned).values() if r["status"] == "ok"}

    def read(folder: Path) -> dict[str, dict[str, bytes]]:
        samples: dict[str, dict[str, bytes]] = {}
        for shard in sorted(folder.glob("shard-*.tar")):
            with tarfile.open(shard) as tar:
                for member in tar.getmembers():
                    key, _, ext = member.name.partition(".")
                    samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
        return samples

    samples, originals = read(out), read(shards)
    assert samples.keys() == ok.keys(), "only clips with a usable caption"
    for clip_id, sample in samples.items():
        meta = json.loads(sample["json"])
        assert sample["txt"].decode() == ok[clip_id]["caption"] == meta["caption"] and meta["caption_set"] == "clean"
        assert sample["mp4"] == originals[clip_id]["mp4"], "video bytes copied as they are"
    index = read_clip_index(str(out))  # a plain ingest-shaped folder: training reads it without the set
    assert sorted(index.ids) == sorted(ok) and (out / "_SUCCESS").exists()
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert main([str(shards), "--caption-set", "clean", *endpoint_args(server), "--materialize", str(out)]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before, "a rerun writes nothing"


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        (["caption.backend=openai", "caption.endpoint=http://127.0.0.1:9/v1", "caption.model=m"],
         "recaption: caption.backend=openai: chat endpoint http://127.0.0.1:9/v1/models cannot be reached"),
        (["caption.backend=hf", "caption.model=/nonexistent/model"], "recaption: caption.backend=hf: chat model folder /nonexistent/model does not exist"),
        (["caption.backend=metadata"], "recaption: recaption needs a model captioner: caption.backend=hf or openai"),
        (["caption.backend=openai", "caption.endpoint=http://h/v1", "caption.model=m", "model.text_encoder=t5:/no/such/t5"],
         "recaption: cannot load the t5 text encoder's tokenizer from '/no/such/t5'"),
    ],
)  # fmt: skip
def test_a_captioner_that_is_not_there_fails_before_any_work_in_one_line(shards: Path, settings: list[str], expected: str) -> None:
    with pytest.raises(SystemExit) as failure:
        main([str(shards), "--caption-set", "never", *(a for s in settings for a in ("--set", s))])
    assert str(failure.value).startswith(expected) and "\n" not in str(failure.value), failure.value
    assert not (shards / "captions" / "never").exists()


def test_shards_on_object_storage_get_a_caption_set_there(shards: Path, tmp_path: Path, monkeypatch) -> None:
    """s3:// shards (a real S3-compatible server on loopback, moto): the job reads them with
    read_webdataset, commits its parts, report and _SUCCESS into the bucket, and training reads
    the set from there. Its own local Ray, so the workers get the endpoint variables."""
    from tests.pipelines.test_faults import S3Server
    from training.clip_index import read_clip_index

    server = S3Server(tmp_path / "moto.log")
    try:
        for path in sorted(shards.glob("*")):
            if path.is_file():
                with server.fs.open_output_stream(f"bucket/shards/{path.name}") as stream:
                    stream.write(path.read_bytes())
        with ChatServer(reply=answer) as chat:
            env = os.environ | server.env | {"RAY_ADDRESS": "local", "PYTHONPATH": str(REPO)}
            command = [sys.executable, "-m", "infra", "recaption", "s3://bucket/shards", "--caption-set", "s3set", *endpoint_args(chat)]
            done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, done.stderr[-3000:]
        listed = {info.base_name for info in server.fs.get_file_info(pafs.FileSelector("bucket/shards/captions/s3set"))}
        assert {"_SUCCESS", "manifest.json", "report.html"} <= listed and any(n.startswith("part-") for n in listed)
        for key, value in server.env.items():
            monkeypatch.setenv(key, value)
        index = read_clip_index("s3://bucket/shards", "s3set")
        assert sum(c is not None for c in index.captions) == 5 and ANSWERS[1.0] in index.captions
    finally:
        server.close()
