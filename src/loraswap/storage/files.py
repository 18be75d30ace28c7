"""Batch API file bytes: a local directory by default, any fsspec URL (``s3://``) for a fleet.

A file is visible once its database row exists, and the row is written after the bytes, so no
reader sees half a file; deleting a file removes its row first, then its bytes.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from ..atomic import write_atomic


class FileBytes:
    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None) -> None:
        self.uri = uri.rstrip("/")
        self.local = "://" not in uri or uri.startswith("file://")
        self.root = Path(self.uri.removeprefix("file://"))
        self.storage_options = storage_options or {}
        self._fs: Any = None

    def _remote(self) -> tuple[Any, str]:
        if self._fs is None:
            import fsspec

            self._fs, _, paths = fsspec.get_fs_token_paths(
                self.uri, storage_options=self.storage_options
            )
            self._base = paths[0].rstrip("/")
        return self._fs, self._base

    def put(self, file_id: str, data: bytes) -> None:
        if self.local:
            self.root.mkdir(parents=True, exist_ok=True)
            write_atomic(self.root / file_id, data)
            return
        fs, base = self._remote()
        fs.pipe_file(f"{base}/{file_id}", data)  # one PUT: the object appears whole

    def get(self, file_id: str) -> bytes | None:
        try:
            if self.local:
                return (self.root / file_id).read_bytes()
            fs, base = self._remote()
            return fs.cat_file(f"{base}/{file_id}")
        except FileNotFoundError:
            return None

    def delete(self, file_id: str) -> None:
        if self.local:
            (self.root / file_id).unlink(missing_ok=True)
            return
        fs, base = self._remote()
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(f"{base}/{file_id}")
