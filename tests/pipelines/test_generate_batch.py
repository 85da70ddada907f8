"""`reelforge generate --batch` end to end: a tiny random-initialised bundle (tests/model/test_pyfunc.py),
a real local Ray, a request table with a bad row of each kind, reruns that resume."""

from __future__ import annotations

import base64
import contextlib
import io
import re
import shutil
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from infra.generate import main
from model.bundle import bundle_sha256
from pipelines.generate_batch import prepare_rows
from tests.model.test_pyfunc import FRAMES, HEIGHT, WIDTH, tiny_bundle

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

STEPS = 2  # every row: the model is random, two steps show the whole path


def png(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (WIDTH, HEIGHT), color).save(buffer, format="PNG")
    return buffer.getvalue()


# (request cells, what becomes of the row)
ROWS = [
    ({"prompt": "a red fox running through fresh snow", "seed": 7}, "ok"),
    ({"prompt": "waves rolling onto a beach at dusk"}, "ok"),  # no seed: one derived from its id
    ({"prompt": "the fox turns its head", "mode": "image", "image": "inputs/first.png"}, "ok"),  # a path, from the table's folder
    ({"prompt": "a blue square drifts", "mode": "image", "image": base64.b64encode(png((0, 0, 255))).decode()}, "ok"),
    ({"prompt": "a broken image", "mode": "image", "image": "bm90IGFuIGltYWdl!!"}, "invalid"),  # not base64: checked up front
    ({"prompt": "too wide for the model", "width": WIDTH + 4}, "refused"),  # the model's own check, in its actor
]


def table_of(rows: list[dict]) -> pa.Table:
    """Rows with different keys as one table (`from_pylist` alone takes its columns from the first row)."""
    names = list(dict.fromkeys(name for row in rows for name in row))
    return pa.Table.from_pylist([{name: row.get(name) for name in names} for row in rows])


def decode(path: Path) -> tuple[np.ndarray, float]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)]), float(stream.average_rate)


def run(table: Path, out: Path, bundle: Path, *extra: str) -> tuple[int, str]:
    """`reelforge generate --batch ...` in this process (on the session's Ray): (exit status, stdout)."""
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        status = main(["--batch", str(table), "--out", str(out), "--model", str(bundle), *extra])
    return status, stdout.getvalue()


def line_counts(line: str) -> dict[str, int]:
    match = re.search(r"(\d+) requests: (\d+) ok, (\d+) failed", line)
    assert match, line
    return dict(zip(("rows", "ok", "failed"), map(int, match.groups())))


def mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return tiny_bundle(tmp_path_factory.mktemp("batch") / "bundle")


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("requests")
    (folder / "inputs").mkdir()
    (folder / "inputs" / "first.png").write_bytes(png((200, 40, 40)))
    path = folder / "requests.parquet"
    pq.write_table(table_of([cells | {"steps": STEPS} for cells, _ in ROWS]), path)
    return path


@pytest.fixture(scope="module")
def first_run(ray_local, table: Path, bundle: Path, tmp_path_factory) -> tuple[Path, int, str]:
    out = tmp_path_factory.mktemp("batch-out") / "out"
    status, stdout = run(table, out, bundle)
    return out, status, stdout


def test_every_row_gets_a_video_or_its_reason(first_run, bundle: Path) -> None:
    out, status, stdout = first_run
    assert status == 1, "some rows failed"
    assert (out / "_SUCCESS").exists()
    results = pq.read_table(out / "results.parquet").to_pylist()
    assert [r["row"] for r in results] == list(range(len(ROWS)))
    expected = {"ok": "ok", "invalid": "failed", "refused": "failed"}
    assert [r["status"] for r in results] == [expected[kind] for _, kind in ROWS]
    assert len({r["id"] for r in results}) == len(ROWS)
    for result, (cells, kind) in zip(results, ROWS):
        assert result["prompt"] == cells["prompt"]
        if kind == "ok":
            frames, fps = decode(out / result["mp4"])
            assert frames.shape == (result["num_frames"], result["height"], result["width"], 3) == (FRAMES, HEIGHT, WIDTH, 3)
            assert fps == pytest.approx(result["fps"])
            assert result["reason"] is None and result["bundle_sha256"] == bundle_sha256(bundle)
            assert result["seed"] == cells.get("seed", result["seed"]) and result["seed"] is not None
        else:
            assert result["mp4"] is None and not (out / "videos" / f"{result['id']}.mp4").exists()
    invalid, refused = (results[i]["reason"] for i, (_, kind) in enumerate(ROWS) if kind != "ok")
    assert "column image" in invalid and "base64" in invalid
    assert str(WIDTH + 4) in refused
    assert sorted(p.name for p in (out / "videos").iterdir()) == sorted(f"{r['id']}.mp4" for r in results if r["status"] == "ok")
    # The last line is true: the counts are results.parquet's.
    last = stdout.strip().splitlines()[-1]
    assert line_counts(last) == {"rows": len(results), "ok": sum(r["status"] == "ok" for r in results), "failed": sum(r["status"] == "failed" for r in results)}


def test_a_rerun_does_no_new_work(first_run, table: Path, bundle: Path) -> None:
    out, _, _ = first_run
    before = mtimes(out)
    status, stdout = run(table, out, bundle)
    assert status == 1 and "nothing new" in stdout
    assert mtimes(out) == before


def test_a_deleted_video_is_regenerated_alone_and_alike(first_run, table: Path, bundle: Path) -> None:
    out, _, _ = first_run
    results = pq.read_table(out / "results.parquet").to_pylist()
    unseeded = results[1]  # its seed was derived from its id: a rerun must make the same video
    frames_before, _ = decode(out / unseeded["mp4"])
    (out / unseeded["mp4"]).unlink()
    before = mtimes(out)
    status, stdout = run(table, out, bundle)
    assert status == 1 and "this run generated 1 (0 failed)" in stdout
    after = mtimes(out)
    changed = {name for name in after if before.get(name) != after[name]}
    assert {n for n in changed if n.startswith("videos/")} == {unseeded["mp4"]}
    assert np.array_equal(decode(out / unseeded["mp4"])[0], frames_before)
    rerun = pq.read_table(out / "results.parquet").to_pylist()
    assert [(r["id"], r["status"], r["seed"]) for r in rerun] == [(r["id"], r["status"], r["seed"]) for r in results]


def test_ids_are_stable_and_seeds_derived_from_them(tmp_path: Path) -> None:
    """The same request cells give the same id in any table, whatever the column types (a pandas
    integer column with a gap is float); a given `id` column is used as it is."""
    rows = [{"prompt": "a", "seed": 3, "steps": 2}, {"prompt": "b", "steps": 2}]
    first = prepare_rows(table_of(rows), str(tmp_path / "t.parquet"))
    again = prepare_rows(table_of([{"prompt": "b", "steps": 2.0}, {"prompt": "a", "seed": 3.0, "steps": 2}]), str(tmp_path / "t.parquet"))
    assert [r.id for r in first] == [r.id for r in reversed(again)]
    assert [r.cells["seed"] for r in first] == [r.cells["seed"] for r in reversed(again)] and first[0].cells["seed"] == 3
    named = prepare_rows(table_of([row | {"id": f"clip-{i}"} for i, row in enumerate(rows)]), str(tmp_path / "t.parquet"))
    assert [r.id for r in named] == ["clip-0", "clip-1"]
    assert named[1].cells["seed"] != first[1].cells["seed"], "a derived seed follows the id"


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing", "no such file"),
        ("no-prompt", "no 'prompt' column"),
        ("unknown", "'promt' (did you mean 'prompt'?)"),
        ("duplicate-id", "'a' is in rows 0 and 1"),
        ("other-model", "another model"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(case: str, expected: str, request, table: Path, bundle: Path, tmp_path: Path, capsys) -> None:
    requests, out, model = tmp_path / "requests.parquet", tmp_path / "out", bundle
    tables = {"no-prompt": [{"seed": 1}], "unknown": [{"promt": "a fox"}], "duplicate-id": [{"id": "a", "prompt": "x"}, {"id": "a", "prompt": "y"}]}
    if case in tables:
        pq.write_table(table_of(tables[case]), requests)
    if case == "other-model":  # the first run's --out, and a bundle with other bytes
        requests, out, model = table, request.getfixturevalue("first_run")[0], Path(shutil.copytree(bundle, tmp_path / "other"))
        (model / "notes.txt").write_text("fine-tuned\n")
    status, _ = run(requests, out, model)
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert len(err) == 1 and err[0].startswith("reelforge generate: error: ") and expected in err[0], err
    assert case == "other-model" or not out.exists()
