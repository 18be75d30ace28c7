"""OpenAI Batch API (``/v1/files``, ``/v1/batches``) for large offline work.

``protocol`` holds the typed objects, ``store`` the durable SQLite + files state (jobs resume
after a restart), ``runner`` the jobs (each line through the request pipeline) and ``router``
the HTTP routes. The service builds ``BatchRunner(pipeline, BatchStore(state_dir), concurrency)``
and includes ``router``.
"""

from .router import router
from .runner import BatchRunner
from .store import BatchStore

__all__ = ["BatchRunner", "BatchStore", "router"]
