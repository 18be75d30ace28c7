"""Everything durable in one place: the database (SQLite or PostgreSQL) and the file bytes
(a directory or object storage), shared by every replica that points at the same ones."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .database import Database
from .files import FileBytes
from .legacy import import_state_dir

if TYPE_CHECKING:
    from ..config import Settings

__all__ = ["Database", "FileBytes", "Storage"]


@dataclass
class Storage:
    db: Database
    files: FileBytes
    state_dir: Path

    @classmethod
    def local(cls, state_dir: Path) -> Storage:
        """The embedded default: SQLite and a files directory in ``state_dir``."""
        state_dir = Path(state_dir)
        return cls(Database.embedded(state_dir), FileBytes(str(state_dir / "files")), state_dir)

    @classmethod
    def from_settings(cls, settings: Settings) -> Storage:
        state_dir = Path(settings.state_dir)
        db = (
            Database(settings.database_url)
            if settings.database_url
            else Database.embedded(state_dir)
        )
        files = FileBytes(
            settings.files_uri or str(state_dir / "files"), settings.fsspec_storage_options
        )
        return cls(db, files, state_dir)

    def prepare(self) -> None:
        """Migrate the schema and bring in a state directory of an older release (blocking)."""
        _ = self.db.engine
        import_state_dir(self.db, self.files, self.state_dir)

    def close(self) -> None:
        self.db.close()
