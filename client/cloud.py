"""Client of the cloud server (CloudStore gRPC service).

Errors from the server surface as ``CloudError`` (a ``UserError`` carrying the gRPC
status ``code`` and the server's message), so the CLI prints them as one line.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import grpc
import numpy as np

from dlheir.contract import ContractError, model_mismatch
from dlheir.errors import UserError
from dlheir.netaddr import parse_addresses
from dlheir.proto import dlheir_cloud_pb2 as pb
from dlheir.proto import dlheir_cloud_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024


DEFAULT_PORT = 50051
START_HINT = "start it with 'dlheir server start --data-dir DIR', or give --server HOST:PORT"


def unreachable_reason(details: str) -> str | None:
    """gRPC's UNAVAILABLE text -> a short cause when the connection itself failed (refused, name
    not resolved, TLS handshake); None when it came from a server that answered (e.g. its store)."""
    text = (details or "").lower()
    if text.startswith(("postgresql at ", "object store ")):  # the server answered: its storage engine is down
        return None
    if "refused" in text:
        return "connection refused"
    if "resolv" in text or "dns" in text or "domain name not found" in text:
        return "name not resolved"
    if "ssl" in text or "handshake" in text or "tls" in text:
        return "TLS handshake failed"
    if any(s in text for s in ("failed to connect", "socket closed", "connection reset", "end of tcp stream")):
        return "connection failed"
    return None


# a connection that broke during a call (the server was killed, the network dropped it): the call
# may or may not have been applied, so only idempotent calls are retried elsewhere
_BROKEN = ("socket closed", "stream removed", "connection reset", "end of tcp stream", "broken pipe", "goaway",
           "connection aborted")


def lost_reason(details: str) -> str | None:
    """Like :func:`unreachable_reason`, and also "connection lost" for a connection that broke during
    the call; None when a server answered (its store down: shared by every front, so no failover)."""
    reason = unreachable_reason(details)
    if reason or (details or "").lower().startswith(("postgresql at ", "object store ")):
        return reason
    return "connection lost" if any(s in (details or "").lower() for s in _BROKEN) else None


def never_sent(details: str) -> bool:
    """Whether an UNAVAILABLE failure certainly happened before the request reached a server: no
    connection was made (refused, name not resolved, TLS handshake)."""
    text = (details or "").lower()
    if any(s in text for s in _BROKEN) and "failed to connect" not in text:
        return False
    return ("failed to connect" in text or "handshake" in text
            or unreachable_reason(details) in ("connection refused", "name not resolved"))


def tls_credentials(tls_ca: str | Path) -> grpc.ChannelCredentials:
    """gRPC channel credentials trusting the CA certificate in the file ``tls_ca``, checked first
    (a missing file or one that is not a PEM certificate is a one-line UserError, not gRPC C-core
    log lines and a server reported unreachable)."""
    from dlheir.config import read_tls_ca

    return grpc.ssl_channel_credentials(read_tls_ca(tls_ca, "tls_ca"))


CLEARTEXT_FIX = ("give the server's CA certificate as tls_ca in the config file or $DLHEIR_TLS_CA, or --insecure "
                 "(or $DLHEIR_INSECURE=1) to send tokens in the clear")


def check_cleartext(address: str, tls_ca: str | Path | None, insecure: bool = False,
                    what: str = "the cloud server", fix: str | None = None) -> None:
    """Refuse (UserError naming ``address`` and the fix), before any connection, a channel
    without TLS to an address that is not loopback, unless ``insecure``: its bearer tokens (or,
    for Triton, plaintext images) would cross the network in the clear, and anyone on the path
    could answer as the server."""
    from dlheir.netaddr import is_loopback_target

    if not tls_ca and not insecure and not is_loopback_target(address):
        raise UserError(f"refusing to connect to {what} at {address} without TLS (not a loopback "
                        f"address): {fix or CLEARTEXT_FIX}")


class CloudError(UserError):
    """A failed call: ``code`` and ``details`` are gRPC's; with ``address``, a connection that could
    not be made (UNAVAILABLE) or a gRPC server that is not this one (UNIMPLEMENTED) reads as such."""

    def __init__(self, code: grpc.StatusCode, details: str, address: str | None = None,
                 tried: Sequence[tuple[str, str]] = ()) -> None:
        """``tried``: (address, reason) of every address that failed, when a call was tried on several."""
        message = f"cloud server: {code.name}: {details}"
        reason = unreachable_reason(details) if code == grpc.StatusCode.UNAVAILABLE else None
        if len(tried) > 1:
            message = (f"cannot reach any dlheir cloud server ({', '.join(f'{a} {r}' for a, r in tried)}): "
                       f"{START_HINT}")
        elif address and reason:
            message = f"cannot reach the dlheir cloud server at {address} ({reason}): {START_HINT}"
        elif address and code == grpc.StatusCode.UNIMPLEMENTED:
            message = (f"{address} answers gRPC but is not a dlheir cloud server (is it Triton's port? "
                       f"the cloud server's default is {DEFAULT_PORT})")
        super().__init__(message)
        self.code, self.details, self.address = code, details, address
        self.tried = list(tried)


def _wrap(exc: grpc.RpcError, address: str | None = None) -> CloudError:
    return CloudError(exc.code(), exc.details(), address)


def check_model(collection: str, info: pb.CollectionInfo | pb.SyncHeader, fingerprint: str | None) -> None:
    """Refuse, with one line naming both fingerprints (ContractError), to use codes of the model
    ``fingerprint`` with a collection (``info``: its CollectionInfo or SyncHeader) made with
    another. The server checks server-ranked collections itself; a private-ranking collection,
    whose codes it never sees, is checked only here."""
    reason = model_mismatch(collection, info.model_fingerprint, info.image_size, info.bits, fingerprint or "")
    if reason:
        raise ContractError(reason)


def search_results(reply: pb.SearchResponse) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per query: (ids int64, distances int32), from a packed reply (or, from a server that
    predates it, the per-query ``results``)."""
    if len(reply.results) or not len(reply.counts):
        return [(np.array(x.ids, dtype=np.int64), np.array(x.distances, dtype=np.int32)) for x in reply.results]
    ids = np.frombuffer(reply.ids, "<i8").astype(np.int64)
    dist = np.frombuffer(reply.distances, "<u2").astype(np.int32)
    counts = reply.counts
    total = counts[0] if len(counts) == 1 else sum(counts)
    if len(ids) != total or len(dist) != len(ids):
        raise CloudError(grpc.StatusCode.DATA_LOSS, f"malformed search reply: {total} results counted, "
                                                     f"{len(ids)} ids and {len(dist)} distances sent")
    if len(counts) == 1:  # one query (the common case): no splitting
        return [(ids, dist)]
    out, start = [], 0
    for n in counts:  # slices of the two arrays (views: they share one buffer each)
        out.append((ids[start:start + n], dist[start:start + n]))
        start += n
    return out


# calls that give the same result, or leave the same state, when made twice: retried on another
# front also when the connection broke during the call (it may have been applied once already)
IDEMPOTENT = frozenset({"Search", "Contains", "CollectionStats", "ListCollections", "ListFronts", "ListReaders",
                        "UnstagedIds",
                        "StageCodes", "RevokeReader", "Delete", "Fetch", "SyncCodePages"})


class CloudClient:
    """A client of one cloud server, or of several fronts of one store: ``address`` is
    ``HOST:PORT``, ``"HOST:PORT,HOST:PORT"`` or a list. With several, calls go round-robin over
    them, and a call whose connection failed goes on with the next one (see ``IDEMPOTENT``)."""

    UPLOAD_WINDOW = 8  # un-acknowledged upload batches held for a resume on another front (several addresses)
    UPLOAD_WINDOW_BYTES = 64 * 1024 * 1024
    DOWN_S = 5.0  # an address whose connection failed is tried after the others for this long

    def __init__(self, address: str | Sequence[str], token: str | None = None, tls_ca: str | None = None,
                 insecure: bool = False) -> None:
        """``insecure``: allow a channel without TLS (no ``tls_ca``) to an address that is not
        loopback; without it that is a UserError here, before any connection."""
        self.addresses = parse_addresses(address)
        for a in self.addresses:
            check_cleartext(a, tls_ca, insecure)
        options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
        self.channels: list[grpc.Channel] = []
        for a in self.addresses:
            self.channels.append(grpc.secure_channel(a, tls_credentials(tls_ca), options) if tls_ca
                                 else grpc.insecure_channel(a, options))
        self.stubs = [pb_grpc.CloudStoreStub(c) for c in self.channels]
        self.channel, self.stub = self.channels[0], self.stubs[0]  # the first address's
        # ``address``: the addresses as one string (names caches and messages; a failed call's
        # CloudError names the address it went to)
        self.address, self.token = ",".join(self.addresses), token
        self._lock = threading.Lock()
        self._next = 0
        self._down_until = [0.0] * len(self.addresses)
        log.info("cloud server %s over %s%s", self.address, "TLS" if tls_ca else "cleartext (loopback or --insecure)",
                 "" if token else ", no token")

    def _md(self, token: str | None = None) -> tuple:
        token = token or self.token
        return (("authorization", f"Bearer {token}"),) if token else ()

    def _order(self) -> list[int]:
        """The addresses (indexes) to try for one call: round-robin, those that failed lately last."""
        n = len(self.addresses)
        with self._lock:
            start, self._next = self._next, (self._next + 1) % n
        order = [(start + i) % n for i in range(n)]
        now = time.monotonic()
        return [i for i in order if self._down_until[i] <= now] + [i for i in order if self._down_until[i] > now]

    def _failed(self, i: int, exc: grpc.RpcError, idempotent: bool) -> str | None:
        """Why the call to address ``i`` may go on with another address, or None (raise it)."""
        if len(self.addresses) == 1 or exc.code() != grpc.StatusCode.UNAVAILABLE:
            return None
        reason = lost_reason(exc.details())
        if reason is None or not (idempotent or never_sent(exc.details())):
            return None
        self._down_until[i] = time.monotonic() + self.DOWN_S
        log.warning("cloud server %s: %s (%s); trying the next address", self.addresses[i], reason,
                    exc.details())
        return reason

    def _error(self, exc: grpc.RpcError, address: str, tried: list[tuple[str, str]]) -> CloudError:
        return CloudError(exc.code(), exc.details(), address, tried)

    def _call(self, method: str | Callable, request: Any, token: str | None = None) -> Any:
        """Call the unary RPC ``method`` (its name), going on with the next address where that is safe."""
        if callable(method):  # a stub's bound method: that address only
            try:
                return method(request, metadata=self._md(token))
            except grpc.RpcError as exc:
                raise _wrap(exc, self.address) from None
        tried: list[tuple[str, str]] = []
        for i in self._order():
            try:
                return getattr(self.stubs[i], method)(request, metadata=self._md(token))
            except grpc.RpcError as exc:
                reason = self._failed(i, exc, method in IDEMPOTENT)
                if reason is None:
                    raise self._error(exc, self.addresses[i], tried) from None
                tried.append((self.addresses[i], reason))
                last = exc
        raise self._error(last, ",".join(a for a, _ in tried), tried) from None

    def _open_stream(self, method: str, request: Any) -> tuple[Any, Any, str]:
        """Open the server-streaming ``method`` (a read) and read its first message, going on with
        the next address while no connection could be made: (stream, first message or None at
        once-ended stream, the address it came from)."""
        tried: list[tuple[str, str]] = []
        for i in self._order():
            stream = getattr(self.stubs[i], method)(request, metadata=self._md())
            try:
                return stream, next(stream), self.addresses[i]
            except StopIteration:
                return stream, None, self.addresses[i]
            except grpc.RpcError as exc:
                reason = self._failed(i, exc, True)
                if reason is None:
                    raise self._error(exc, self.addresses[i], tried) from None
                tried.append((self.addresses[i], reason))
                last = exc
        raise self._error(last, ",".join(a for a, _ in tried), tried) from None

    def create_collection(self, name: str, bits: int, admin_token: str, private: bool = False,
                          model_fingerprint: str = "", image_size: int = 0) -> tuple[str, str]:
        """(owner token, reader token); ``private`` creates it in private-ranking mode (no codes on
        the server: see ``dlheir.client.private``). ``model_fingerprint`` (and ``image_size``) tie
        the collection to the model that makes its codes: uploads and searches naming another
        model are refused. Without one, a raw-code collection that nothing checks."""
        mode = pb.PRIVATE_RANKING if private else pb.SERVER_RANKED
        request = pb.CreateCollectionRequest(name=name, bits=bits, mode=mode, model_fingerprint=model_fingerprint,
                                             image_size=image_size)
        r = self._call("CreateCollection", request, admin_token)
        return r.owner_token, r.reader_token

    def list_collections(self, token: str | None = None) -> list[pb.CollectionInfo]:
        return list(self._call("ListCollections", pb.ListCollectionsRequest(), token).collections)

    def stats(self, name: str) -> pb.CollectionInfo:
        return self._call("CollectionStats", pb.CollectionRequest(collection=name)).info

    def delete_collection(self, name: str, admin_token: str) -> pb.CollectionInfo:
        """Delete a collection and all it holds (admin token); returns what it held."""
        return self._call("DeleteCollection", pb.CollectionRequest(collection=name), admin_token).info

    def upload(self, name: str, items: Iterable[tuple[int, bytes, bytes, dict]], batch_size: int = 64,
               replace: bool = False, model_fingerprint: str = "", key_id: int = 0) -> Iterator[pb.UploadAck]:
        """Stream (id, code, blob, metadata) items; yields one ack per durable batch.
        ``model_fingerprint``: the model that made the codes (a collection made with one needs it);
        ``key_id``: the owner's key version they were made with (0 = 1): the server refuses every
        batch once the collection is under another version (a rotation ran during the upload).

        With several addresses, a stream that breaks goes on with the next address: see
        :meth:`_resumable_upload` (every id is acknowledged once, by a server ack or a made-up one)."""

        def batches() -> Iterator[pb.UploadBatch]:
            items_, size = [], 0
            for item_id, code, blob, metadata in items:
                items_.append(pb.UploadItem(id=int(item_id), code=bytes(code), blob=bytes(blob),
                                            metadata={str(k): str(v) for k, v in (metadata or {}).items()}))
                size += len(blob) + len(code) + 16
                # a batch ends at batch_size items or before it nears the message limit
                if len(items_) >= batch_size or size > MAX_MESSAGE_BYTES // 2:
                    yield pb.UploadBatch(collection=name, items=items_, replace=replace,
                                         model_fingerprint=model_fingerprint, key_id=key_id)
                    items_, size = [], 0
            if items_:
                yield pb.UploadBatch(collection=name, items=items_, replace=replace, model_fingerprint=model_fingerprint,
                                     key_id=key_id)

        if len(self.addresses) > 1:
            yield from self._resumable_upload(name, batches(), replace)
            return
        try:
            yield from self.stub.Upload(batches(), metadata=self._md())
        except grpc.RpcError as exc:
            raise _wrap(exc, self.address) from None

    def _resumable_upload(self, name: str, source: Iterator[pb.UploadBatch], replace: bool) -> Iterator[pb.UploadAck]:
        """Upload ``source``'s batches, going on with the next address when a stream breaks.

        At most ``UPLOAD_WINDOW`` sent batches wait for their ack (the request side waits while
        the window is full). When a stream breaks, each of them is re-sent on the next address
        without the ids that address's store already holds (a batch the dying front committed but
        could not acknowledge); those ids get an ack made here (``total_items`` from CollectionStats),
        so every id is acknowledged exactly once. With ``replace`` whole batches are re-sent. Acks
        are numbered 0, 1, ... over the whole upload."""
        cond = threading.Condition()
        source_lock = threading.Lock()  # one request thread at a time pulls from ``source``
        st: dict[str, Any] = {"epoch": 0, "done": False, "error": None}
        pending: collections.deque[pb.UploadBatch] = collections.deque()  # to send first (re-sends)
        window: list[pb.UploadBatch] = []  # sent on the current stream, not acknowledged yet

        def full() -> bool:
            return len(window) >= self.UPLOAD_WINDOW or (
                bool(window) and sum(b.ByteSize() for b in window) >= self.UPLOAD_WINDOW_BYTES)

        def requests(epoch: int) -> Iterator[pb.UploadBatch]:
            while True:
                with cond:
                    while st["epoch"] == epoch and full():
                        cond.wait()
                    if st["epoch"] != epoch:
                        return  # that stream broke: the next one sends what is left
                    if pending:
                        batch = pending.popleft()
                        window.append(batch)
                    elif st["done"]:
                        return
                    else:
                        batch = None
                if batch is None:
                    with source_lock:
                        with cond:
                            if st["epoch"] != epoch:
                                return
                            if pending:
                                continue
                        try:
                            batch = next(source, None)
                        except Exception as exc:  # noqa: BLE001 - raised to the caller once the stream ended
                            batch, st["error"] = None, exc
                        with cond:
                            if batch is None:
                                st["done"] = True
                                cond.notify_all()
                                continue
                            if st["epoch"] != epoch:  # the stream broke meanwhile: the next one sends it
                                pending.append(batch)
                                return
                            window.append(batch)
                yield batch

        numbered = 0
        tried: list[tuple[str, str]] = []
        call = None
        try:
            for i in self._order():
                address = self.addresses[i]
                if window:  # batches the broken stream sent and had no ack for
                    try:
                        made, resend = self._resume_batches(i, name, window, replace)
                    except grpc.RpcError as exc:
                        reason = self._failed(i, exc, True)
                        if reason is None:
                            raise self._error(exc, address, tried) from None
                        tried.append((address, reason))
                        last = exc
                        continue
                    for ack in made:
                        ack.batch = numbered
                        numbered += 1
                        yield ack
                    with cond:
                        pending.extendleft(reversed(resend))
                        window.clear()
                with cond:
                    epoch = st["epoch"]
                call = self.stubs[i].Upload(requests(epoch), metadata=self._md())
                try:
                    for ack in call:
                        with cond:
                            if window:
                                window.pop(0)
                            cond.notify_all()
                        ack.batch = numbered
                        numbered += 1
                        yield ack
                except grpc.RpcError as exc:
                    with cond:  # stop that stream's request side
                        st["epoch"] += 1
                        cond.notify_all()
                    reason = self._failed(i, exc, True)
                    if reason is None:
                        raise self._error(exc, address, tried) from None
                    tried.append((address, reason))
                    last = exc
                    continue
                if st["error"] is not None:
                    raise st["error"]
                return
            raise self._error(last, ",".join(a for a, _ in tried), tried) from None
        finally:
            with cond:
                st["epoch"] += 1
                cond.notify_all()
            if call is not None:
                call.cancel()

    def _resume_batches(self, i: int, name: str, window: list[pb.UploadBatch], replace: bool,
                        ) -> tuple[list[pb.UploadAck], list[pb.UploadBatch]]:
        """For batches sent on a broken stream without an ack: (acks made here for their ids that the
        store behind address ``i`` holds already, the batches to send again without those ids)."""
        if replace:
            return [], list(window)
        acks, resend = [], []
        for batch in window:
            ids = [item.id for item in batch.items]
            present = set(self.stubs[i].Contains(pb.ContainsRequest(collection=name, ids=ids),
                                                 metadata=self._md()).present)
            if present:
                acks.append(pb.UploadAck(ids=[x for x in ids if x in present]))
                rest = [item for item in batch.items if item.id not in present]
                if not rest:
                    continue
                batch = pb.UploadBatch(collection=batch.collection, items=rest, replace=batch.replace,
                                       model_fingerprint=batch.model_fingerprint, key_id=batch.key_id)
            resend.append(batch)
        if acks:
            total = self.stubs[i].CollectionStats(pb.CollectionRequest(collection=name), metadata=self._md()).info.items
            for ack in acks:
                ack.total_items = total
        log.info("upload to %r resumed on %s: %d un-acknowledged batch(es), %d id(s) already stored, %d batch(es) "
                 "sent again", name, self.addresses[i], len(window), sum(len(a.ids) for a in acks), len(resend))
        return acks, resend

    def list_fronts(self, admin_token: str) -> pb.ListFrontsResponse:
        """The fronts serving this server's store, each with the last store change it applied (admin)."""
        return self._call("ListFronts", pb.ListFrontsRequest(), admin_token)

    def search(self, name: str, codes: np.ndarray, k: int, max_distance: int | None = None,
               model_fingerprint: str = "") -> list[tuple[np.ndarray, np.ndarray]]:
        """Per query code: (ids, distances) of the top k. ``model_fingerprint``: the model that made
        the query codes (a collection made with one needs it)."""
        codes = np.atleast_2d(np.asarray(codes, dtype=np.uint8))
        req = pb.SearchRequest(collection=name, codes=[codes.tobytes()] if len(codes) == 1 else
                               [c.tobytes() for c in codes], k=k, model_fingerprint=model_fingerprint, packed=True)
        if max_distance is not None:
            req.max_distance = max_distance
        return search_results(self._call("Search", req))

    # a server whose stream slots are all taken refuses a new stream at once ("retry shortly"):
    # a Fetch refused before its first item is tried again for up to this long
    STREAM_SLOT_WAIT_S = 10.0

    def fetch(self, name: str, ids: Iterable[int]) -> Iterator[tuple[int, bytes, dict]]:
        """(id, blob, metadata) of each stored id of ``ids``. With several addresses, a stream that
        breaks goes on with the next address, asking for the ids not received yet."""
        wanted = [int(i) for i in ids]
        received: set[int] = set()
        tried: list[tuple[str, str]] = []
        order = self._order()
        while order:
            i = order.pop(0)
            request = pb.FetchRequest(collection=name, ids=[x for x in wanted if x not in received] if received
                                      else wanted)
            give_up, pause = time.monotonic() + self.STREAM_SLOT_WAIT_S, 0.05
            while True:
                started = False
                try:
                    for item in self.stubs[i].Fetch(request, metadata=self._md()):
                        started = True
                        received.add(item.id)
                        yield item.id, item.blob, dict(item.metadata)
                    return
                except grpc.RpcError as exc:
                    busy = (exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "streams" in (exc.details() or "")
                            and not started)
                    if not busy or time.monotonic() + pause > give_up:
                        reason = None if busy else self._failed(i, exc, True)
                        if reason is None:
                            raise self._error(exc, self.addresses[i], tried) from None
                        tried.append((self.addresses[i], reason))
                        last = exc
                        break
                time.sleep(pause)
                pause = min(pause * 2, 1.0)
        raise self._error(last, ",".join(a for a, _ in tried), tried) from None

    def delete(self, name: str, ids: Iterable[int]) -> int:
        return self._call("Delete", pb.DeleteRequest(collection=name, ids=[int(i) for i in ids])).deleted

    def contains(self, name: str, ids: Iterable[int]) -> set[int]:
        return set(self._call("Contains", pb.ContainsRequest(collection=name, ids=[int(i) for i in ids])).present)

    # --- per-user access and key rotation (owner token) ----------------------------------
    def add_reader(self, name: str, user: str, replace: bool = False) -> str:
        """A new reader token for ``user`` (returned once; the server keeps its hash)."""
        return self._call("AddReader", pb.AddReaderRequest(collection=name, user=user, replace=replace)).token

    def list_readers(self, name: str) -> pb.ListReadersResponse:
        """Readers (user, created, revoked: 0 = active), whether the shared reader token is active, the key id."""
        return self._call("ListReaders", pb.CollectionRequest(collection=name))

    def revoke_reader(self, name: str, user: str | None = None, shared_token: bool = False) -> bool:
        """Revoke ``user``'s token (or the shared reader token); False if it was already revoked."""
        req = pb.RevokeReaderRequest(collection=name, user=user or "", shared_token=shared_token)
        return self._call("RevokeReader", req).revoked

    def rekey_codes(self, name: str, from_key_id: int, to_key_id: int, perm, mask: bytes) -> pb.RekeyCodesResponse:
        """Apply new bit j = old bit perm[j] XOR mask bit j to every stored code (one transaction)."""
        req = pb.RekeyCodesRequest(collection=name, from_key_id=from_key_id, to_key_id=to_key_id,
                                   perm=[int(p) for p in perm], mask=bytes(mask))
        return self._call("RekeyCodes", req)

    # --- re-hashing with another model (owner token) ----------------------------------------
    def stage_codes(self, name: str, fingerprint: str, key_id: int, ids: Sequence[int], codes: np.ndarray) -> int:
        """Stage the new code of each id (uint8 [n, L]); returns the codes staged for that model so far."""
        req = pb.StageCodesRequest(collection=name, model_fingerprint=fingerprint, key_id=key_id,
                                   ids=[int(i) for i in ids], codes=np.ascontiguousarray(codes, np.uint8).tobytes())
        return self._call("StageCodes", req).staged

    def unstaged_ids(self, name: str, fingerprint: str, after: int = -1, limit: int = 10_000) -> pb.UnstagedIdsResponse:
        """Stored ids greater than ``after`` without a staged code of that model (ascending), with the
        collection's item count and how many are staged."""
        req = pb.UnstagedIdsRequest(collection=name, model_fingerprint=fingerprint, after_id=after, limit=limit)
        return self._call("UnstagedIds", req)

    def switch_codes(self, name: str, fingerprint: str, image_size: int, key_id: int) -> pb.SwitchCodesResponse:
        """Replace every code by its staged one and the collection's model, in one transaction."""
        req = pb.SwitchCodesRequest(collection=name, model_fingerprint=fingerprint, image_size=image_size, key_id=key_id)
        return self._call("SwitchCodes", req)

    def close(self) -> None:
        for channel in self.channels:
            channel.close()

    def __enter__(self) -> "CloudClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
