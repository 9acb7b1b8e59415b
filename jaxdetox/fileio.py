"""Paths of run directories on any filesystem: local, `gs://` and the other `etils.epath`
backends (fsspec: gcsfs, s3fs, ...).

Writes keep one guarantee everywhere — a reader sees a file entirely or not at all:
locally a temporary file in the same directory renamed into place (POSIX rename is
atomic); on an object store the object itself (an upload becomes visible only when
complete; a rename there would be a copy + delete). Appends on an object store rewrite the
whole object (objects cannot be appended to). Libraries that write only to local files
(safetensors, tokenizers, matplotlib) write into a local staging directory that is then
uploaded (`local_dir`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator

from etils import epath

PathLike = str | os.PathLike[str]


def as_path(path: PathLike) -> epath.Path:
    """`path` as an `epath.Path` (keeps `gs://bucket/...`; `pathlib` would fold the `//`)."""
    return path if isinstance(path, epath.Path) else epath.Path(path)


def is_local(path: PathLike) -> bool:
    """Whether `path` is on the local filesystem (no `scheme://` prefix)."""
    return "://" not in os.fspath(path)


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write `text` to `path` so that readers never see a partial file."""
    path = as_path(path)
    if not is_local(path):
        path.write_text(text)  # an object appears only once its upload completes
        return
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.write_text(text)
    os.replace(tmp, path)


def append_text(path: PathLike, text: str) -> None:
    """Append `text` to `path` (object stores: the whole object is rewritten)."""
    path = as_path(path)
    if is_local(path):
        with path.open("a") as f:
            f.write(text)
        return
    before = path.read_text() if path.exists() else ""
    path.write_text(before + text)


def copy_tree(src: PathLike, dst: PathLike, *, link: bool = False) -> None:
    """Copy the files under `src` to `dst` (any epath backends on either side); `link`: hard
    links where both sides are on one local filesystem (no second copy on disk)."""
    src, dst = as_path(src), as_path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for child in src.iterdir():
        target = dst / child.name
        if child.is_dir():
            copy_tree(child, target, link=link)
            continue
        if link and is_local(child) and is_local(target):
            if target.exists() and os.path.samefile(child, target):
                continue  # linked by an earlier call
            with contextlib.suppress(OSError):  # another filesystem: copied below
                os.link(child, target)
                continue
        target.write_bytes(child.read_bytes())


def local_file(path: PathLike) -> epath.Path:
    """`path` when local, else a file of the same name under ~/.cache/jaxdetox named after
    `path` (for files only a local library can write: sqlite databases)."""
    path = as_path(path)
    if is_local(path):
        return path
    key = hashlib.sha1(os.fspath(path).encode()).hexdigest()[:16]
    cache = epath.Path(os.path.expanduser("~/.cache/jaxdetox")) / f"{key}-{path.name}"
    cache.parent.mkdir(parents=True, exist_ok=True)
    return cache


@contextlib.contextmanager
def local_dir(path: PathLike) -> Iterator[epath.Path]:
    """A local directory to write `path`'s files into: `path` itself when local, else a
    temporary directory uploaded to `path` on a clean exit."""
    path = as_path(path)
    if is_local(path):
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    staging = tempfile.mkdtemp(prefix="jaxdetox-upload-")
    try:
        yield epath.Path(staging)
        copy_tree(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


class _EpathRecordWriter:
    """A TensorBoard event file on an epath backend: buffered, written whole on flush."""

    def __init__(self, path: str) -> None:
        self.path = as_path(path)
        self.chunks: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.chunks.append(data)

    def flush(self) -> None:
        self.path.write_bytes(b"".join(self.chunks))

    def close(self) -> None:
        self.flush()


class _EpathWriterFactory:
    def open(self, path: str) -> _EpathRecordWriter:
        return _EpathRecordWriter(path)

    def directory_check(self, path: str) -> None:
        as_path(path).mkdir(parents=True, exist_ok=True)


def tensorboard_dir(path: PathLike) -> str:
    """`path` as a tensorboardX log directory. A non-local scheme is written through epath
    like the rest of the run directory (tensorboardX's own writers need boto3 or
    google-cloud-storage and their credentials set up separately)."""
    text = os.fspath(path)
    if not is_local(text):
        from tensorboardX import record_writer

        scheme = text.split("://", 1)[0]
        if not isinstance(record_writer.REGISTERED_FACTORIES.get(scheme), _EpathWriterFactory):
            record_writer.register_writer_factory(scheme, _EpathWriterFactory())
    return text
