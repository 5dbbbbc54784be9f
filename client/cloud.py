"""Client of the cloud server (CloudStore gRPC service).

Errors from the server surface as ``CloudError`` (a ``UserError`` carrying the gRPC
status ``code`` and the server's message), so the CLI prints them as one line.
"""

from __future__ import annotations

import logging

import time
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import grpc
import numpy as np

from dlheir.contract import ContractError, model_mismatch
from dlheir.errors import UserError
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

    def __init__(self, code: grpc.StatusCode, details: str, address: str | None = None) -> None:
        message = f"cloud server: {code.name}: {details}"
        reason = unreachable_reason(details) if code == grpc.StatusCode.UNAVAILABLE else None
        if address and reason:
            message = f"cannot reach the dlheir cloud server at {address} ({reason}): {START_HINT}"
        elif address and code == grpc.StatusCode.UNIMPLEMENTED:
            message = (f"{address} answers gRPC but is not a dlheir cloud server (is it Triton's port? "
                       f"the cloud server's default is {DEFAULT_PORT})")
        super().__init__(message)
        self.code, self.details, self.address = code, details, address


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


class CloudClient:
    def __init__(self, address: str, token: str | None = None, tls_ca: str | None = None,
                 insecure: bool = False) -> None:
        """``insecure``: allow a channel without TLS (no ``tls_ca``) to an address that is not
        loopback; without it that is a UserError here, before any connection."""
        check_cleartext(address, tls_ca, insecure)
        options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
        if tls_ca:
            self.channel = grpc.secure_channel(address, tls_credentials(tls_ca), options)
        else:
            self.channel = grpc.insecure_channel(address, options)
        self.stub = pb_grpc.CloudStoreStub(self.channel)
        self.address, self.token = address, token
        log.info("cloud server %s over %s%s", address, "TLS" if tls_ca else "cleartext (loopback or --insecure)",
                 "" if token else ", no token")

    def _md(self, token: str | None = None) -> tuple:
        token = token or self.token
        return (("authorization", f"Bearer {token}"),) if token else ()

    def _call(self, method, request, token=None):
        try:
            return method(request, metadata=self._md(token))
        except grpc.RpcError as exc:
            raise _wrap(exc, self.address) from None

    def create_collection(self, name: str, bits: int, admin_token: str, private: bool = False,
                          model_fingerprint: str = "", image_size: int = 0) -> tuple[str, str]:
        """(owner token, reader token); ``private`` creates it in private-ranking mode (no codes on
        the server: see ``dlheir.client.private``). ``model_fingerprint`` (and ``image_size``) tie
        the collection to the model that makes its codes: uploads and searches naming another
        model are refused. Without one, a raw-code collection that nothing checks."""
        mode = pb.PRIVATE_RANKING if private else pb.SERVER_RANKED
        request = pb.CreateCollectionRequest(name=name, bits=bits, mode=mode, model_fingerprint=model_fingerprint,
                                             image_size=image_size)
        r = self._call(self.stub.CreateCollection, request, admin_token)
        return r.owner_token, r.reader_token

    def list_collections(self, token: str | None = None) -> list[pb.CollectionInfo]:
        return list(self._call(self.stub.ListCollections, pb.ListCollectionsRequest(), token).collections)

    def stats(self, name: str) -> pb.CollectionInfo:
        return self._call(self.stub.CollectionStats, pb.CollectionRequest(collection=name)).info

    def delete_collection(self, name: str, admin_token: str) -> pb.CollectionInfo:
        """Delete a collection and all it holds (admin token); returns what it held."""
        return self._call(self.stub.DeleteCollection, pb.CollectionRequest(collection=name), admin_token).info

    def upload(self, name: str, items: Iterable[tuple[int, bytes, bytes, dict]], batch_size: int = 64,
               replace: bool = False, model_fingerprint: str = "", key_id: int = 0) -> Iterator[pb.UploadAck]:
        """Stream (id, code, blob, metadata) items; yields one ack per durable batch.
        ``model_fingerprint``: the model that made the codes (a collection made with one needs it);
        ``key_id``: the owner's key version they were made with (0 = 1): the server refuses every
        batch once the collection is under another version (a rotation ran during the upload)."""

        def requests():
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

        try:
            yield from self.stub.Upload(requests(), metadata=self._md())
        except grpc.RpcError as exc:
            raise _wrap(exc, self.address) from None

    def search(self, name: str, codes: np.ndarray, k: int, max_distance: int | None = None,
               model_fingerprint: str = "") -> list[tuple[np.ndarray, np.ndarray]]:
        """Per query code: (ids, distances) of the top k. ``model_fingerprint``: the model that made
        the query codes (a collection made with one needs it)."""
        codes = np.atleast_2d(np.asarray(codes, dtype=np.uint8))
        req = pb.SearchRequest(collection=name, codes=[codes.tobytes()] if len(codes) == 1 else
                               [c.tobytes() for c in codes], k=k, model_fingerprint=model_fingerprint, packed=True)
        if max_distance is not None:
            req.max_distance = max_distance
        return search_results(self._call(self.stub.Search, req))

    # a server whose stream slots are all taken refuses a new stream at once ("retry shortly"):
    # a Fetch refused before its first item is tried again for up to this long
    STREAM_SLOT_WAIT_S = 10.0

    def fetch(self, name: str, ids: Iterable[int]) -> Iterator[tuple[int, bytes, dict]]:
        request = pb.FetchRequest(collection=name, ids=[int(i) for i in ids])
        give_up, pause = time.monotonic() + self.STREAM_SLOT_WAIT_S, 0.05
        while True:
            started = False
            try:
                for item in self.stub.Fetch(request, metadata=self._md()):
                    started = True
                    yield item.id, item.blob, dict(item.metadata)
                return
            except grpc.RpcError as exc:
                busy = (exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "streams" in (exc.details() or "")
                        and not started)
                if not busy or time.monotonic() + pause > give_up:
                    raise _wrap(exc, self.address) from None
            time.sleep(pause)
            pause = min(pause * 2, 1.0)

    def delete(self, name: str, ids: Iterable[int]) -> int:
        return self._call(self.stub.Delete, pb.DeleteRequest(collection=name, ids=[int(i) for i in ids])).deleted

    def contains(self, name: str, ids: Iterable[int]) -> set[int]:
        return set(self._call(self.stub.Contains, pb.ContainsRequest(collection=name, ids=[int(i) for i in ids])).present)

    # --- per-user access and key rotation (owner token) ----------------------------------
    def add_reader(self, name: str, user: str, replace: bool = False) -> str:
        """A new reader token for ``user`` (returned once; the server keeps its hash)."""
        return self._call(self.stub.AddReader, pb.AddReaderRequest(collection=name, user=user, replace=replace)).token

    def list_readers(self, name: str) -> pb.ListReadersResponse:
        """Readers (user, created, revoked: 0 = active), whether the shared reader token is active, the key id."""
        return self._call(self.stub.ListReaders, pb.CollectionRequest(collection=name))

    def revoke_reader(self, name: str, user: str | None = None, shared_token: bool = False) -> bool:
        """Revoke ``user``'s token (or the shared reader token); False if it was already revoked."""
        req = pb.RevokeReaderRequest(collection=name, user=user or "", shared_token=shared_token)
        return self._call(self.stub.RevokeReader, req).revoked

    def rekey_codes(self, name: str, from_key_id: int, to_key_id: int, perm, mask: bytes) -> pb.RekeyCodesResponse:
        """Apply new bit j = old bit perm[j] XOR mask bit j to every stored code (one transaction)."""
        req = pb.RekeyCodesRequest(collection=name, from_key_id=from_key_id, to_key_id=to_key_id,
                                   perm=[int(p) for p in perm], mask=bytes(mask))
        return self._call(self.stub.RekeyCodes, req)

    # --- re-hashing with another model (owner token) ----------------------------------------
    def stage_codes(self, name: str, fingerprint: str, key_id: int, ids: Sequence[int], codes: np.ndarray) -> int:
        """Stage the new code of each id (uint8 [n, L]); returns the codes staged for that model so far."""
        req = pb.StageCodesRequest(collection=name, model_fingerprint=fingerprint, key_id=key_id,
                                   ids=[int(i) for i in ids], codes=np.ascontiguousarray(codes, np.uint8).tobytes())
        return self._call(self.stub.StageCodes, req).staged

    def unstaged_ids(self, name: str, fingerprint: str, after: int = -1, limit: int = 10_000) -> pb.UnstagedIdsResponse:
        """Stored ids greater than ``after`` without a staged code of that model (ascending), with the
        collection's item count and how many are staged."""
        req = pb.UnstagedIdsRequest(collection=name, model_fingerprint=fingerprint, after_id=after, limit=limit)
        return self._call(self.stub.UnstagedIds, req)

    def switch_codes(self, name: str, fingerprint: str, image_size: int, key_id: int) -> pb.SwitchCodesResponse:
        """Replace every code by its staged one and the collection's model, in one transaction."""
        req = pb.SwitchCodesRequest(collection=name, model_fingerprint=fingerprint, image_size=image_size, key_id=key_id)
        return self._call(self.stub.SwitchCodes, req)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "CloudClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
