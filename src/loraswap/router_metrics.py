"""What a LoRA-aware router reads from a replica's ``/metrics``, in the names requests use.

llm-d's endpoint picker (the Gateway API Inference Extension's, before it moved) matches a
request's ``model`` against the adapter names of ``vllm:lora_requests_info``. vLLM names an
adapter as loraswap registers it in the engine (``uppercase@v1``) while requests mostly say the
alias (``uppercase``), so the router would find no replica with the adapter. Here:

- :meth:`RouterView.renamed` gives vLLM's stat logger the running and waiting adapters under
  every name a request may use: the alias while it points at that version, and
  ``name@version`` (:mod:`loraswap.vllm_plugin.lora_metric_names` is given it to call);
- ``vllm:lora_adapter_loaded{adapter_name, level, pinned}`` (the residency series proposed
  upstream, vllm-project/vllm#45411) is 1 for each adapter loaded in the engine's memory, so an
  idle loaded adapter is visible too: ``level="gpu"`` for one in an engine slot (pinned, or among
  the last ``max_loras`` adapters that ran: the engine keeps those active), ``"cpu"`` for one in
  the engine's host cache only. The names are upstream's, on a CPU build too.

Residency series exist for at most ``metrics_adapter_series`` adapter versions (those in slots,
then pinned, then the most recently used), and leave with the adapter.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import copy
import glob
import logging
import os
import sys
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Protocol

from . import metrics
from .adapters.keys import AdapterKey

logger = logging.getLogger(__name__)

SLOT, HOST = "gpu", "cpu"  # upstream's level names: an engine slot, the engine's host cache
LOADED = "vllm:lora_adapter_loaded"
LOADED_HELP = (
    "1 per LoRA adapter loaded in the engine, under each name requests use (alias and "
    "name@version); level: gpu (in an engine slot) or cpu (host cache only)."
)
LOADED_LABELS = ("adapter_name", "level", "pinned")
POLL_S = 1.0  # alias and pin changes on an idle engine show within this
# Snapshot files in PROMETHEUS_MULTIPROC_DIR: "live" so the collector tolerates one vanishing
# mid-read; no "_" after the mode (the collector splits the file name on it).
FILE_PREFIX = "gauge_livemax_loraswap-{tag}-"


class Residency(Protocol):
    """What the series read of :class:`loraswap.adapters.residency.Residency` (described here,
    not imported: residency reports its changes to this module)."""

    lru: Mapping[AdapterKey, None]  # loaded in the engine, least recently used first
    pinned: Callable[[], set[AdapterKey]]


def parse_key(text: str) -> AdapterKey | None:
    try:
        return AdapterKey.parse(text)
    except ValueError:
        return None


def request_names(text: str, catalog: Any) -> list[str]:
    """The names requests use for the version vLLM calls ``text`` (``name@version``): the alias
    first while it points at that version (as ``/v1/models`` lists it), then ``text``."""
    key = parse_key(text)
    state = getattr(catalog, "state", None)
    record = state.adapters.get(key.name) if key is not None and state is not None else None
    if record is not None and record.alias.version == key.version:
        return [key.name, text]
    return [text]


def by_request_names(counts: Mapping[str, int], catalog: Any) -> dict[str, int]:
    """vLLM's per-adapter request counts under request names, adapters without requests left
    out (vLLM 0.32 lists every adapter in flight as both running and waiting)."""
    named: dict[str, int] = {}
    for text, count in counts.items():
        if count > 0:
            for name in request_names(text, catalog):
                named[name] = named.get(name, 0) + count
    return named


class SnapshotGauge:
    """A gauge published as a whole, so that a series can leave.

    prometheus_client cannot remove a series in multiprocess mode, which BentoML's ``/metrics``
    uses: there the snapshot is a file of its own in ``PROMETHEUS_MULTIPROC_DIR``, replaced at
    once (the collector reads every ``*.db`` there). Otherwise it is a collector in the default
    registry.
    """

    def __init__(
        self, name: str, documentation: str, labelnames: tuple[str, ...], tag: str = "router"
    ) -> None:
        self.name = name
        self.prefix = FILE_PREFIX.format(tag=tag.replace("_", "-"))
        self.documentation = documentation
        self.labelnames = labelnames
        self.series: dict[tuple[str, ...], float] = {}
        self.path: str | None = None

    def publish(self, series: Mapping[tuple[str, ...], float]) -> None:
        if dict(series) == self.series and (self.path is None or os.path.exists(self.path)):
            return
        self.series = dict(series)
        directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if directory:
            self._write(directory)

    def register(self) -> None:
        """Serve from the default registry when not in multiprocess mode (once)."""
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            return
        from prometheus_client import REGISTRY

        with contextlib.suppress(ValueError):  # already registered
            REGISTRY.register(self)

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        family = GaugeMetricFamily(self.name, self.documentation, labels=list(self.labelnames))
        for labels, value in sorted(self.series.items()):
            family.add_metric(list(labels), value)
        yield family

    def _write(self, directory: str) -> None:
        from prometheus_client.mmap_dict import MmapedDict, mmap_key

        if self.path is None:
            self.path = os.path.join(directory, f"{self.prefix}{os.getpid()}.db")
            remove_dead_files(directory, self.prefix)
            atexit.register(remove_file, self.path)
        temporary = f"{self.path}.tmp"  # not *.db: the collector skips it until it is whole
        remove_file(temporary)
        db = MmapedDict(temporary)
        try:
            for labels, value in self.series.items():
                key = mmap_key(self.name, self.name, list(self.labelnames), list(labels),
                               self.documentation)  # fmt: skip
                db.write_value(key, value, 0.0)
        finally:
            db.close()
        os.replace(temporary, self.path)


def remove_file(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def remove_dead_files(directory: str, prefix: str) -> None:
    """Snapshots of processes that died without cleaning up (a worker restarted)."""
    for path in glob.glob(os.path.join(directory, f"{prefix}*.db")):
        pid = path[len(os.path.join(directory, prefix)) : -len(".db")]
        try:
            os.kill(int(pid), 0)
        except (ValueError, ProcessLookupError):
            remove_file(path)
        except PermissionError:  # alive, someone else's
            pass


class RouterView:
    """Residency series and request names from this replica's adapter residency."""

    def __init__(self, gauge: SnapshotGauge) -> None:
        self.gauge = gauge
        self._residency: weakref.ref[Residency] | None = None
        # vLLM names of the adapters that ran, the most recent last (a model of vLLM's own LRU
        # of active adapters; bounded).
        self.recent: OrderedDict[str, None] = OrderedDict()
        self.max_loras = 1
        self._running: frozenset[str] = frozenset()
        self._poll: asyncio.Task[None] | None = None

    # ----- wiring ----------------------------------------------------------------------------
    @property
    def residency(self) -> Residency | None:
        return self._residency() if self._residency is not None else None

    def watch(self, residency: Residency) -> None:
        """Follow ``residency`` (the newest one: an engine restart builds another)."""
        self._residency = weakref.ref(residency)
        self.recent.clear()
        self._running = frozenset()
        self.gauge.register()
        if "vllm.v1.metrics.loggers" in sys.modules:  # vLLM's stat loggers run in this process
            from .vllm_plugin import lora_metric_names

            lora_metric_names.ensure_installed(self.renamed)
            self.start_polling()
        self.refresh()

    def start_polling(self, every_s: float = POLL_S) -> None:
        """Alias and pin changes reach the series without a load or a step (idle engine)."""
        if self._poll is not None and not self._poll.done():
            return
        try:
            self._poll = asyncio.get_running_loop().create_task(self._polling(every_s))
        except RuntimeError:  # no event loop: refreshed on the hooks only
            self._poll = None

    async def _polling(self, every_s: float) -> None:
        while self.residency is not None:
            await asyncio.sleep(every_s)
            try:
                self.refresh()
            except Exception as exc:  # a metrics failure must not end the loop for good
                logger.warning("router metrics refresh failed: %r", exc)

    @property
    def catalog(self) -> Any:
        """The registry builds residency with ``pinned=catalog.pinned_keys``: that bound method
        leads to the catalog, whose aliases name the versions."""
        residency = self.residency
        return getattr(getattr(residency, "pinned", None), "__self__", None)

    # ----- hooks -----------------------------------------------------------------------------
    def resident_changed(self, key: Any, resident: bool) -> None:
        if not resident:
            self.recent.pop(str(AdapterKey(*key)), None)  # out of vLLM's slots too
        self.refresh()

    def renamed(self, stats: Any, max_loras: int) -> Any:
        """A copy of vLLM's scheduler stats with the LoRA adapters under request names."""
        running, waiting = stats.running_lora_adapters, stats.waiting_lora_adapters
        self.observe((k for k, n in running.items() if n > 0), max_loras)
        if not running and not waiting:
            return stats
        catalog = self.catalog
        renamed = copy.copy(stats)
        renamed.running_lora_adapters = by_request_names(running, catalog)
        renamed.waiting_lora_adapters = by_request_names(waiting, catalog)
        return renamed

    def observe(self, running: Iterable[str], max_loras: int) -> None:
        """One engine step's running adapters (vLLM names)."""
        now = frozenset(running)
        if now == self._running and max_loras == self.max_loras:
            return
        self._running, self.max_loras = now, max(1, int(max_loras))
        for text in now:
            self.recent.pop(text, None)
            self.recent[text] = None
        while len(self.recent) > 4 * self.max_loras:
            self.recent.popitem(last=False)
        self.refresh()

    # ----- the series ------------------------------------------------------------------------
    def refresh(self) -> None:
        self.gauge.publish(self.snapshot())

    def snapshot(self) -> dict[tuple[str, str, str], float]:
        residency = self.residency
        if residency is None:
            return {}
        pinned = residency.pinned()
        loaded = list(residency.lru)  # least recently used first
        in_slot = [k for k in loaded if k in pinned]  # the engine pins them in a slot
        room = self.max_loras - len(in_slot)
        for text in reversed(self.recent):
            if room <= 0:
                break
            key = parse_key(text)
            if key is not None and key in residency.lru and key not in pinned:
                in_slot.append(key)
                room -= 1
        pinned_first = sorted(reversed(loaded), key=lambda k: k not in pinned)  # stable
        keys = list(dict.fromkeys(in_slot + pinned_first))[: metrics.labels_of.limit]
        slots, catalog = set(in_slot), self.catalog
        series: dict[tuple[str, str, str], float] = {}
        for key in keys:
            level = SLOT if key in slots else HOST
            pin = "true" if key in pinned else "false"
            for name in request_names(str(key), catalog):
                series[(name, level, pin)] = 1.0
        return series


VIEW = RouterView(SnapshotGauge(LOADED, LOADED_HELP, LOADED_LABELS))


def watch(residency: Residency) -> None:
    VIEW.watch(residency)


def resident_changed(key: Any, resident: bool) -> None:
    """An adapter version entered or left the engine's memory."""
    VIEW.resident_changed(key, resident)


def refresh() -> None:
    """After a change the hooks do not see (a pin)."""
    if VIEW.residency is not None:
        VIEW.refresh()
