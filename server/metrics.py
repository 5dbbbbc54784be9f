"""The server's Prometheus metrics (``--metrics-port``) and its JSON log lines (``--log-format json``).

* **Calls.** ``dlheir_requests_total{method,code}`` counts every gRPC call by its method's
  short name (``Search``, ``Upload``, ``Check``, ...) and final status code, the guard's own
  refusals (UNAUTHENTICATED, RESOURCE_EXHAUSTED for a stream over the limit) included;
  ``dlheir_request_seconds{method}`` is its duration (a stream's: from its start to its end).
  Both are recorded at the call boundary (``dlheir.server.guard``).
* **Store errors.** ``dlheir_store_errors_total{kind}``: the store's errors that reached a
  call's boundary, by kind (full, corrupt, gone, unavailable).
* **State, read at scrape time** from the service's memory, never from the store (a scrape
  never waits on it): ``dlheir_collection_items{collection}``, ``dlheir_index_info{collection,kind}``,
  ``dlheir_index_bytes{collection}`` (codes and ids held in memory, approximate),
  ``dlheir_streams_active``. A private-ranking collection has no index (its codes are not
  on the server): its index kind is ``private`` and its item count, a store query, is not exported.
* **Process**: prometheus-client's ``process_*`` metrics (CPU, RSS, open files, ...).

Everything lives in the server's own ``CollectorRegistry``, not prometheus-client's global one.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

log = logging.getLogger("dlheir.server")

# seconds: a cached search answers in well under a millisecond, a large upload stream in seconds
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
STORE_ERROR_KINDS = ("full", "corrupt", "gone", "unavailable")
UNKNOWN_METHOD = "(unknown)"  # calls to a method the server does not have: one label, whatever the client sent


def method_label(method: str) -> str:
    """``/dlheir.CloudStore/Search`` -> ``Search`` (the short names of the server's three services
    (CloudStore, health, reflection) do not collide)."""
    return method.rsplit("/", 1)[-1] or method


def store_error_kind(exc: BaseException) -> str:
    from dlheir.server.store import CollectionGoneError, StoreCorruptError, StoreFullError

    if isinstance(exc, StoreFullError):
        return "full"
    if isinstance(exc, StoreCorruptError):
        return "corrupt"
    if isinstance(exc, CollectionGoneError):
        return "gone"
    return "unavailable"


def index_bytes(index) -> int:
    """Memory an index holds for its codes and ids (approximate, from sizes it keeps in memory:
    the flat shards' rows times (padded code + id) plus the sealed multi-index hash's arrays)."""
    total = sum(shard.n * (shard.nbytes + 8) for shard in list(index.shards))
    sealed = index.sealed
    if sealed is not None:
        total += sealed.nbytes
    return total


class CallMetrics:
    """What the guard records per call. Children of the labelled metrics are cached per label
    values (a dict lookup per call instead of prometheus-client's labels() each time)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter("dlheir_requests", "gRPC calls by method and final status code",
                                ("method", "code"), registry=registry)
        self.seconds = Histogram("dlheir_request_seconds", "gRPC call duration (a stream's: start to end)",
                                 ("method",), buckets=BUCKETS, registry=registry)
        self.store_errors = Counter("dlheir_store_errors", "store errors that reached a call's boundary, by kind",
                                    ("kind",), registry=registry)
        for kind in STORE_ERROR_KINDS:  # exported at 0 from the start: rate() and alerts need the series
            self.store_errors.labels(kind)
        self._counts: dict[tuple[str, str], object] = {}
        self._times: dict[str, object] = {}

    def call(self, method: str, code: str, seconds: float | None) -> None:
        key = (method, code)
        child = self._counts.get(key)
        if child is None:
            child = self._counts[key] = self.requests.labels(method, code)
        child.inc()
        if seconds is not None:
            timer = self._times.get(method)
            if timer is None:
                timer = self._times[method] = self.seconds.labels(method)
            timer.observe(seconds)

    def store_error(self, exc: BaseException) -> None:
        self.store_errors.labels(store_error_kind(exc)).inc()


class StateCollector:
    """Gauges computed at scrape time from the service's in-memory state (see the module docstring)."""

    def __init__(self, service, streams_active: Callable[[], int] | None = None) -> None:
        self.service = service
        self.streams_active = streams_active

    def describe(self):
        return []  # computed at collect time only (the registry does not call collect() at register)

    def collect(self):
        items = GaugeMetricFamily("dlheir_collection_items", "items in a collection's in-memory index",
                                  labels=("collection",))
        info = InfoMetricFamily("dlheir_index", "the index answering a collection's searches "
                                "(flat, mih+flat; private: none on the server)", labels=("collection",))
        nbytes = GaugeMetricFamily("dlheir_index_bytes", "memory a collection's index holds for codes and ids "
                                   "(approximate)", labels=("collection",))
        for col in self._collections():
            try:
                if col.private:
                    info.add_metric((col.name,), {"kind": "private"})
                    continue
                index = col.index
                n, kind, size = len(index), index.kind, index_bytes(index)
            except Exception:  # noqa: BLE001 - one odd collection never fails the whole scrape
                log.debug("metrics: cannot read collection %r", col.name, exc_info=True)
                continue
            items.add_metric((col.name,), n)
            info.add_metric((col.name,), {"kind": kind})
            nbytes.add_metric((col.name,), size)
        yield items
        yield info
        yield nbytes
        follower = getattr(self.service, "follower", None)
        if follower is not None:  # several fronts over one store: how far this one is behind
            yield GaugeMetricFamily("dlheir_changes_applied", "the last change of the shared store this front "
                                    "has applied", value=follower.applied)
            yield GaugeMetricFamily("dlheir_changes_behind", "changes committed to the shared store that this "
                                    "front has not applied yet (-1: the store does not answer)", value=follower.lag())
            yield CounterMetricFamily("dlheir_follow_errors", "store errors met while following the shared store's "
                                      "changes", value=follower.errors)
        if self.streams_active is not None:
            yield GaugeMetricFamily("dlheir_streams_active", "streams (Fetch, Upload, SyncCodePages) being served",
                                    value=self.streams_active())

    def _collections(self) -> list:
        for _ in range(5):  # list() of a dict's values runs under the GIL; a retry only if it changed meanwhile
            try:
                cols = list(self.service.collections.values())
                break
            except RuntimeError:
                continue
        else:
            return []
        return sorted((c for c in cols if not c.dropped), key=lambda c: c.name)


class MetricsEndpoint:
    """The registry and its HTTP endpoint (prometheus-client's own server, one daemon thread)."""

    def __init__(self) -> None:
        disable_created_metrics()  # no *_created series beside every counter (process-wide: this is the server's)
        self.registry = CollectorRegistry(auto_describe=False)
        self.calls = CallMetrics(self.registry)
        ProcessCollector(registry=self.registry)
        self.httpd = None
        self.port: int | None = None

    def watch(self, service, streams_active: Callable[[], int] | None = None) -> None:
        self.registry.register(StateCollector(service, streams_active))

    def start(self, host: str, port: int, tls_cert: str | None = None, tls_key: str | None = None) -> int:
        """Serve /metrics on host:port (0: a free port), over HTTPS with ``tls_cert``/``tls_key``;
        returns the port bound. OSError if it cannot bind."""
        from prometheus_client import start_http_server

        tls = {"certfile": tls_cert, "keyfile": tls_key} if tls_cert else {}
        self.httpd, _thread = start_http_server(port, addr=host.strip("[]"), registry=self.registry, **tls)
        self.port = self.httpd.server_port
        return self.port

    def stop(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None


# --- --log-format json ------------------------------------------------------------------------

# a LogRecord's own attributes: everything else on a record came from ``extra=`` and is logged as a field
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line: time (UTC, ISO 8601 with milliseconds), level,
    logger, message, the fields given with ``extra=``, and ``exc_info`` (the traceback) if any."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
               "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRS and key not in out:
                out[key] = value
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str, ensure_ascii=True)


def use_json_logs() -> None:
    """Give every handler of the root logger the JSON formatter, and send Python's warnings and
    uncaught exceptions (main thread and others) through logging too: else they would be
    plain-text lines among the JSON ones."""
    import sys
    import threading

    formatter = JsonFormatter()
    for handler in logging.getLogger().handlers:
        handler.setFormatter(formatter)
    logging.captureWarnings(True)
    crash = logging.getLogger("dlheir.server")

    def uncaught(kind, value, tb) -> None:
        if issubclass(kind, KeyboardInterrupt):
            sys.__excepthook__(kind, value, tb)
        else:
            crash.critical("uncaught exception", exc_info=(kind, value, tb))

    def uncaught_in_thread(args) -> None:
        if args.exc_type is not SystemExit:
            crash.critical("uncaught exception in thread %s", getattr(args.thread, "name", "?"),
                           exc_info=(args.exc_type, args.exc_value, args.exc_traceback))

    sys.excepthook = uncaught
    threading.excepthook = uncaught_in_thread

