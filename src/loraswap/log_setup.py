"""loraswap's log lines and the filters that keep the log one line per event: repeats counted,
a client's mistake without a traceback, the same server failure's traceback once."""

from __future__ import annotations

import logging
import time


class RepeatFilter(logging.Filter):
    """Lets a loraswap log line through once per ``window_s`` for the same message; the next
    one after the window says how many were held back. A failure that repeats on every request
    then costs a line per window, not a line (or a traceback) per request."""

    def __init__(self, window_s: float = 10.0) -> None:
        super().__init__()
        self.window_s = window_s
        self.seen: dict[tuple[str, str], tuple[float, int]] = {}

    def key_of(self, record: logging.LogRecord) -> tuple[str, str] | None:
        """What makes two records "the same"; None lets the record through uncounted."""
        if not record.name.startswith("loraswap") or record.levelno < logging.WARNING:
            return None
        return record.name, record.getMessage()

    def filter(self, record: logging.LogRecord) -> bool:
        key = self.key_of(record)
        if key is None:
            return True
        now = time.monotonic()
        first, held = self.seen.get(key, (0.0, 0))
        if now - first < self.window_s:
            self.seen[key] = (first, held + 1)
            return False
        if len(self.seen) > 1000:
            self.seen.clear()
        self.seen[key] = (now, 0)
        if held:
            record.msg = f"{record.msg} ({held} more like this in the last {self.window_s:.0f} s)"
        return True


class ClientErrorsInOneLine(logging.Filter):
    """For vLLM's own log: a client's mistake (vLLM's ``VLLMClientError``, such as a prompt over
    the limit, or a 4xx ``ErrorInfo``) is the client's answer, not a server fault: no traceback,
    and the per-request 4xx echo is dropped (the access log already has the request's line)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and any(c.__name__ == "VLLMClientError" for c in type(exc).__mro__):
            record.msg = f"{record.msg}: {exc}"
            record.exc_info = record.exc_text = None
            return True
        message = record.getMessage()
        return not ("ErrorInfo(" in message and "code=4" in message)


class RepeatedTracebacks(RepeatFilter):
    """For the ASGI server's "Exception in ASGI application": the first traceback of each
    distinct failure is kept (it is a bug to fix), the same failure again within ``window_s`` is
    dropped and counted, so a client retrying a failing request cannot flood the log."""

    def __init__(self, window_s: float = 60.0) -> None:
        super().__init__(window_s)

    def key_of(self, record: logging.LogRecord) -> tuple[str, str] | None:
        exc = record.exc_info[1] if record.exc_info else None
        return None if exc is None else (type(exc).__name__, str(exc)[:200])


def quiet_vllm_client_errors() -> None:
    """Install :class:`ClientErrorsInOneLine` on vLLM's handlers (once vLLM configured them)
    and :class:`RepeatedTracebacks` on the ASGI server's error log."""
    for handler in logging.getLogger("vllm").handlers:
        if not any(isinstance(f, ClientErrorsInOneLine) for f in handler.filters):
            handler.addFilter(ClientErrorsInOneLine())
    server_errors = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, RepeatedTracebacks) for f in server_errors.filters):
        server_errors.addFilter(RepeatedTracebacks())


class _WhenRootIsSilent(logging.Filter):
    """Our handler prints only where nothing else would (under BentoML, its root handler
    prints loraswap's lines in BentoML's format, with request ids): one line per event."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not logging.getLogger().handlers


def configure_logging(level: int = logging.INFO) -> None:
    """loraswap's log lines: through BentoML's handlers when serving, else our own."""
    logger = logging.getLogger("loraswap")
    if not logger.handlers:
        repeats = RepeatFilter()
        handler = logging.StreamHandler()
        handler.setFormatter(
            logging.Formatter("%(asctime)s [%(levelname)s] [loraswap] %(message)s")
        )
        handler.addFilter(_WhenRootIsSilent())
        handler.addFilter(repeats)
        logger.addHandler(handler)
        for root_handler in logging.getLogger().handlers:
            root_handler.addFilter(repeats)
    logger.setLevel(level)
