"""A JSON document shared by replicas, written with compare-and-swap on its ``revision``.

The adapter registry and the tenants directory are each one such document: a local path or an
fsspec URL. A write happens only if nobody wrote since the writer read (:meth:`save_if`): under
an ``flock`` when local, a conditional PUT on S3, a write checked by reading it back elsewhere.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Generic, TypeVar

from pydantic import BaseModel

from .atomic import write_atomic

Doc = TypeVar("Doc", bound=BaseModel)
REVISION_HEAD = re.compile(rb'\s*\{\s*"revision"\s*:\s*(\d+)\s*[,}]')


logger = logging.getLogger(__name__)


class DocumentStore(Generic[Doc]):
    """Reads a document of type ``schema`` (with an integer ``revision``) and writes it only
    if nobody wrote since it was read."""

    lock_timeout = 10.0  # seconds to wait for the local lock before calling it a conflict

    def __init__(
        self, uri: str, schema: type[Doc], storage_options: dict[str, Any] | None = None
    ) -> None:
        self.uri = uri
        self.schema = schema
        self.local = "://" not in uri or uri.startswith("file://")
        self.storage_options = storage_options or {}
        self.path = Path(uri.removeprefix("file://"))

    def _fs(self) -> tuple[Any, str]:
        import fsspec

        fs, _, paths = fsspec.get_fs_token_paths(self.uri, storage_options=self.storage_options)
        return fs, paths[0]

    def exists(self) -> bool:
        if self.local:
            return self.path.is_file()
        fs, path = self._fs()
        return bool(fs.exists(path))

    def load(self) -> Doc:
        try:
            if self.local:
                text = self.path.read_text()
            else:
                fs, path = self._fs()
                text = fs.cat_file(path).decode()
        except FileNotFoundError:
            return self.schema()
        return self.schema.model_validate_json(text)

    def save(self, state: Doc) -> None:
        """Unconditional write (last writer wins): for tools and tests, not for replicas."""
        data = state.model_dump_json(indent=2).encode()
        if not self.local:
            fs, path = self._fs()
            fs.pipe_file(path, data)  # one object PUT: readers see old or new
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, data)

    def stored_revision(self) -> int:
        """The stored document's revision, read from its head (``revision`` is the first field
        of every document written here), without parsing the whole document."""
        try:
            with self.path.open("rb") as f:
                head = f.read(64)
        except FileNotFoundError:
            return self.schema().revision
        match = REVISION_HEAD.match(head)
        return int(match[1]) if match else self.load().revision

    def save_if(self, state: Doc, expected_revision: int) -> bool:
        """Write ``state`` only if the stored document is still at ``expected_revision`` (the one
        ``state`` was derived from); False if another writer got there first."""
        data = state.model_dump_json(indent=2).encode()
        if self.local:
            return self._save_local_if(data, expected_revision)
        fs, path = self._fs()
        if hasattr(fs, "_call_s3"):  # s3fs: S3's native conditional PUT
            from fsspec.asyn import sync

            return sync(fs.loop, _s3_save_if, fs, path, data, expected_revision)
        return self._save_verified(fs, path, data, expected_revision)

    def _save_local_if(self, data: bytes, expected: int) -> bool:
        """Compare and rename under an exclusive ``flock`` on ``<name>.lock``, which every
        writer on this filesystem (any process, any thread) takes for the same path."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with _flocked(self.path.with_name(self.path.name + ".lock"), self.lock_timeout):
                if self.stored_revision() != expected:
                    return False
                write_atomic(self.path, data)
                return True
        except TimeoutError:
            return False

    def _save_verified(self, fs: Any, path: str, data: bytes, expected: int) -> bool:
        """Filesystems without a conditional write: compare, write, read back. This narrows the
        race but does not close it: if two writers both compare before either writes, and the
        first reads its write back before the second's lands, the first one's update is lost."""
        if self.load().revision != expected:
            return False
        fs.pipe_file(path, data)
        return fs.cat_file(path) == data


@contextlib.contextmanager
def _flocked(path: Path, timeout: float) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path``. Polled with ``LOCK_NB`` rather than blocking, so
    a worker thread (``asyncio.to_thread``) gives up after ``timeout`` (TimeoutError) instead of
    hanging on a stuck holder. Each call opens its own descriptor, so threads exclude each other."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"{path} stayed locked for {timeout}s") from None
                time.sleep(0.002)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


async def _s3_read(fs: Any, path: str) -> tuple[int, dict[str, str]]:
    """The stored revision and the PUT condition that holds only while it stays stored: the ETag
    of the very object read (one GET, so body and ETag agree), or "no object yet"."""
    bucket, key, _ = fs.split_path(path)
    try:
        got = await fs._call_s3("get_object", Bucket=bucket, Key=key)
    except FileNotFoundError:
        return 0, {"IfNoneMatch": "*"}
    try:
        body = await got["Body"].read()
    finally:
        got["Body"].close()
    return int(json.loads(body).get("revision", 0)), {"IfMatch": got["ETag"]}


async def _s3_put(fs: Any, path: str, data: bytes, condition: dict[str, str]) -> bool:
    """A conditional PUT; False when S3 refuses it because the object changed (412, or 409
    ConditionalRequestConflict while another conditional write is in flight)."""
    bucket, key, _ = fs.split_path(path)
    try:
        await fs._call_s3("put_object", Bucket=bucket, Key=key, Body=data, **condition)
    except OSError as exc:  # s3fs translates the ClientError and keeps it as the cause
        response = getattr(exc.__cause__, "response", None) or {}
        code = response.get("Error", {}).get("Code")
        if isinstance(exc, FileExistsError) or code in _S3_CONFLICTS:
            return False
        raise
    fs.invalidate_cache(path)
    return True


_S3_CONFLICTS = {"PreconditionFailed", "ConditionalRequestConflict"}


async def _s3_save_if(fs: Any, path: str, data: bytes, expected: int) -> bool:
    revision, condition = await _s3_read(fs, path)
    return revision == expected and await _s3_put(fs, path, data, condition)


def retire(document: DocumentStore[Any], imported: str) -> None:
    """After ``document`` was imported into the database: a local file is renamed
    ``*.imported`` so nothing reads it again; a remote one stays for replicas of the older
    release still reading it during a rollout. ``imported`` says what came in, for the log."""
    where = document.uri
    if document.local:
        target = document.path.with_name(document.path.name + ".imported")
        document.path.rename(target)
        where = f"{document.path} (now {target.name})"
    logger.info("imported %s from %s into the database; the document is no longer read",
                imported, where)  # fmt: skip
