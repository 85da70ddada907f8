"""The DAGs' folders, local or on object storage: a small pathlib-like view over pyarrow filesystems.

    landing = Location("s3://footage/landing")          # or "/data/landing": an absolute local folder
    landing / "day2" / "cam0.mp4"                        # a Location; nothing is read until asked
    (shards / "_SUCCESS").is_file(); (shards / "manifest.parquet").sha256()
    record.write_text(text)                              # a reader sees the whole file or none
    landing.walk()                                       # every file below: (Location, size, mtime_ns)

The landing folder and the shards may be a shared volume or an object-store prefix that the Airflow
workers and the Ray cluster both reach (docs/airflow.md). Both go through the same pyarrow filesystem
rule as the rest of reelforge (model/storage.py's `resolve_uri`), so a URI names the same objects here
as in the ingest job the DAG submits. pyarrow is the one dependency this adds to Airflow's venv (it has
none of its own); it is imported when a location is first used, not when a DAG file is parsed.

A location resolves its filesystem on first use, and the locations made from it with `/` share it:
one S3 client per configured folder, not one per file.
"""

from __future__ import annotations

import os
import posixpath
from functools import cached_property
from typing import TYPE_CHECKING, NamedTuple

from model.storage import file_sha256, resolve_uri

if TYPE_CHECKING:
    import pyarrow.fs

# What a DAG folder may be besides an absolute local path: the object stores pyarrow has a filesystem
# for (and file://). Anything else fails the settings check, before a URI reaches pyarrow.
OBJECT_STORE_SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "hdfs")


class LocatedFile(NamedTuple):
    location: Location
    size_bytes: int
    mtime_ns: int  # an object's LastModified on object storage


class Location:
    def __init__(self, uri: str, *, _base: tuple[Location, str] | None = None) -> None:
        self.uri = uri.rstrip("/") or "/"
        self._base = _base  # (the location this one was made from with `/`, the name below it)

    @classmethod
    def parse(cls, value: str, name: str) -> Location:
        """A configured folder (`name` is its variable): an absolute path, file://PATH, or SCHEME://BUCKET[/PREFIX]
        for an object store pyarrow knows; anything else is a ValueError in one line naming `name`."""
        if value.startswith("file://"):
            value = value.removeprefix("file://")
        scheme, sep, rest = value.partition("://")
        if sep:
            if scheme.lower() not in OBJECT_STORE_SCHEMES:
                raise ValueError(f"{name}={value}: {scheme}:// is not a storage reelforge reads; give an absolute folder or one of "
                                 + ", ".join(f"{s}://" for s in OBJECT_STORE_SCHEMES))  # fmt: skip
            if not rest.strip("/"):
                raise ValueError(f"{name}={value} names no bucket; give {scheme}://BUCKET/PREFIX")
            return cls(value)
        if not value.startswith("/"):
            raise ValueError(f"{name}={value} is relative; give an absolute folder or an object-store prefix (s3://BUCKET/PREFIX) "
                             "that the Airflow workers and the Ray cluster both see")  # fmt: skip
        return cls(os.path.normpath(value))

    @property
    def is_local(self) -> bool:
        return "://" not in self.uri

    @property
    def asset_uri(self) -> str:
        """The URI of an Airflow asset for this folder: file://PATH, or the object-store URI itself."""
        return f"file://{self.uri}" if self.is_local else self.uri

    @property
    def name(self) -> str:
        return posixpath.basename(self.uri)

    def __truediv__(self, name: str) -> Location:
        return Location(f"{self.uri}/{name}", _base=(self, name))

    def __str__(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        return f"Location({self.uri!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Location) and other.uri == self.uri

    def __hash__(self) -> int:
        return hash(self.uri)

    def __lt__(self, other: Location) -> bool:
        return self.uri < other.uri

    @property
    def bucket(self) -> Location:
        """The bucket of an object-store location (it shares this location's filesystem)."""
        scheme, _, rest = self.uri.partition("://")
        bucket = Location(f"{scheme}://{rest.split('/')[0]}")
        bucket.__dict__["_resolved"] = (self._fs, self._path.split("/")[0])
        return bucket

    @cached_property
    def _resolved(self) -> tuple[pyarrow.fs.FileSystem, str]:
        """(filesystem, path in it), on first use: a DAG file builds locations when it is parsed, and
        parsing must not wait on storage. Locations made with `/` share their base's filesystem."""
        if self._base is not None:
            base, name = self._base
            return base._fs, f"{base._path}/{name}"
        return resolve_uri(self.uri)

    @property
    def _fs(self) -> pyarrow.fs.FileSystem:
        return self._resolved[0]

    @property
    def _path(self) -> str:
        return self._resolved[1]

    # --- reading -------------------------------------------------------------------------------------

    def _type(self) -> pyarrow.fs.FileType:
        return self._fs.get_file_info(self._path).type

    def is_file(self) -> bool:
        import pyarrow.fs

        return self._type() == pyarrow.fs.FileType.File

    def is_dir(self) -> bool:
        """A local folder; on object storage, a prefix that holds at least one object, or a bucket."""
        import pyarrow.fs

        return self._type() == pyarrow.fs.FileType.Directory

    def read_text(self) -> str:
        with self._fs.open_input_stream(self._path) as stream:
            return stream.read().decode()

    def sha256(self) -> str:
        return file_sha256(self._path, self._fs)

    def files(self) -> list[Location]:
        """The files directly in this folder, sorted; none when it does not exist."""
        import pyarrow.fs

        infos = self._fs.get_file_info(pyarrow.fs.FileSelector(self._path, allow_not_found=True))
        return sorted(self / info.base_name for info in infos if info.type == pyarrow.fs.FileType.File)

    def walk(self, skip_hidden: bool = True) -> list[LocatedFile]:
        """Every file below this folder with its size and modification time, sorted by URI; names and
        folders starting with "." are left out (and not descended into, locally) unless asked."""
        import pyarrow.fs

        if self.is_local:  # os.walk prunes hidden folders; pyarrow's recursive selector cannot
            found = []
            for folder, subfolders, names in os.walk(self._path):
                subfolders[:] = [n for n in subfolders if not (skip_hidden and n.startswith("."))]
                for name in names:
                    if skip_hidden and name.startswith("."):
                        continue
                    try:
                        stat = os.stat(os.path.join(folder, name))
                    except FileNotFoundError:
                        continue  # deleted while we listed
                    relative = os.path.relpath(os.path.join(folder, name), self._path)
                    found.append(LocatedFile(self / relative, stat.st_size, stat.st_mtime_ns))
            return sorted(found, key=lambda f: f.location.uri)
        selector = pyarrow.fs.FileSelector(self._path, recursive=True, allow_not_found=True)
        found = []
        for info in self._fs.get_file_info(selector):
            relative = info.path[len(self._path) + 1 :]
            if info.type != pyarrow.fs.FileType.File or (skip_hidden and any(p.startswith(".") for p in relative.split("/"))):
                continue
            found.append(LocatedFile(self / relative, info.size, info.mtime_ns))
        return sorted(found, key=lambda f: f.location.uri)

    # --- writing -------------------------------------------------------------------------------------

    def write_text(self, text: str) -> None:
        """The whole text or nothing, for any reader: locally a temp file renamed over the name; on
        object storage one PUT, which is atomic already."""
        data = text.encode()
        if self.is_local:
            os.makedirs(os.path.dirname(self._path), exist_ok=True)
            temp = os.path.join(os.path.dirname(self._path), f".{self.name}.tmp-{os.getpid()}")
            with open(temp, "wb") as file:
                file.write(data)
            os.replace(temp, self._path)
            return
        with self._fs.open_output_stream(self._path) as stream:
            stream.write(data)

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self._fs.delete_file(self._path)
        except FileNotFoundError:
            if not missing_ok:
                raise
