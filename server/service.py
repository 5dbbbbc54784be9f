"""The CloudStore gRPC service: auth, validation, durable uploads, exact search."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import numpy as np

from dlheir.codes import pack_bits, unpack_bits
from dlheir.contract import NAME_RE, ContractError, check_code, code_bytes, model_mismatch, validate_bits
from dlheir.server.guard import bearer_token, clip
from dlheir.server import snapshot
from dlheir.server.follow import Follower
from dlheir.server.index import RESEAL_FRACTION, UPLOAD_END_RESEAL_FRACTION, BinaryIndex, default_shards
from dlheir.proto import dlheir_cloud_pb2 as pb
from dlheir.proto import dlheir_cloud_pb2_grpc as pb_grpc
from dlheir.server.sealed import CodePagesMixin, mode_name
from dlheir.server.store import Store

MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # one gRPC message (gRPC itself answers RESOURCE_EXHAUSTED above it)
MAX_BLOB_BYTES = 32 * 1024 * 1024
MAX_BATCH_ITEMS = 10_000
MAX_K = 10_000
MAX_QUERIES = 10_000
MAX_IDS = 100_000
MAX_STAGE_IDS = 50_000  # ids per StageCodes call and per UnstagedIds page
MAX_METADATA_BYTES = 64 * 1024  # per item, keys + values
# One Search answers at most this many (query, result) pairs: bounds the reply (about 12 bytes
# each, far below MAX_MESSAGE_BYTES) and the work, checked before any scanning.
MAX_RESULTS = 1_000_000
FINGERPRINT_RE = re.compile(r"[0-9a-f]{8,64}")  # dlheir.contract.model_fingerprint: lowercase hex
MAX_IMAGE_SIZE = 65535
PACKED_IDS, PACKED_DISTANCES = np.dtype("<i8"), np.dtype("<u2")  # SearchResponse's packed arrays (the proto)

log = logging.getLogger("dlheir.server")


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass
class Collection:
    name: str
    bits: int
    owner_hash: str
    reader_hash: str  # the shared reader token's hash; '' once revoked
    index: BinaryIndex
    readers: dict[str, str] = field(default_factory=dict)  # active per-user token hash -> user label
    key_id: int = 1  # the owner's key version the stored codes are under
    private: bool = False  # private-ranking mode: no codes on the server, sealed code pages (sealed.py)
    fingerprint: str = ""  # the model whose codes it holds ('': raw codes or made before fingerprints, unchecked)
    image_size: int = 0  # that model's S (reported, not checked: the fingerprint covers it)
    writes: int = 0  # uploads and deletes applied to its index (under the service's write lock)
    uid: str = ""  # the random id the store gave it at creation: one re-created under its name is another
    # set (under the write lock) once DeleteCollection removes it: calls and streams that got this
    # object before end with NOT_FOUND at their next step instead of acting on a successor of the name
    dropped: bool = False
    # held while its index is re-sealed outside the write lock: one build per collection at a time
    seal_lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)


class CloudStoreService(CodePagesMixin, pb_grpc.CloudStoreServicer):
    def __init__(self, store: Store, admin_token: str, n_shards: int | None = None,
                 mih_min: int | None = None, index_choice: str = "auto", follow_poll_s: float = 0.5,
                 consistency_wait_s: float = 5.0) -> None:
        self.mih_min = mih_min  # collection size from which search may use multi-index hashing
        self.index_choice = index_choice  # auto (timed per collection), flat or mih
        self.store = store
        self.started = time.time()
        self.data_dir = store.path.parent  # index snapshots go to its index/ folder
        self.admin_hash = token_hash(admin_token)
        self.n_shards = n_shards or default_shards()
        self.pool = ThreadPoolExecutor(self.n_shards, thread_name_prefix="shard")  # shared by all collections
        self.collections: dict[str, Collection] = {}
        self.write_lock = threading.Lock()  # uploads/deletes are applied one batch at a time
        self._known_hashes: frozenset[str] = frozenset({self.admin_hash})
        # a store other fronts write too: follow its changes (server/follow.py), from the last one
        # committed before anything is loaded here
        self.follower: Follower | None = None
        if getattr(store, "follows", False):
            self.follower = Follower(self, store.change_head(), follow_poll_s, consistency_wait_s)
        private = store.page_private_collections()
        models = store.models()
        # a snapshot is used only while nothing was written since it was taken: the store's write
        # counter says so, or, over a shared store, its last change (what this front had applied)
        generation = self._snapshot_mark()
        uids = store.uids()
        snapshot.clear_leftovers(self.data_dir)
        rebuilt = []
        for name, bits, owner_hash, reader_hash in store.collections():
            col = self._open(name, bits, owner_hash, reader_hash)
            col.uid = uids[name]
            col.private = name in private  # no codes stored: its index stays empty
            col.fingerprint, col.image_size = models.get(name, ("", 0))
            if not col.private:  # the snapshot of a clean shutdown, else rebuilt from the store
                index = snapshot.load(snapshot.snapshot_path(self.data_dir, name), generation, bits, col.uid,
                                      **self._index_kwargs())
                if index is None:
                    col.index.load(store.codes(name))  # large collections: one multi-index hash build, after loading
                    rebuilt.append(col)
                else:
                    col.index = index
        self._rebuilt = rebuilt  # snapshot_rebuilt() writes their snapshots
        self._user_hashes: frozenset[str] = frozenset()  # active per-user reader tokens, all collections
        self._load_access()
        if self.follower is not None:
            self.follower.loaded_until = store.change_head()

    def consistent(self) -> str | None:
        """Before every authenticated call: None, or why this front cannot answer it yet (it has not
        applied every change another front committed before the call: server/follow.py)."""
        return None if self.follower is None else self.follower.catch_up()

    def sync_collection(self, name: str, row: dict | None, rebuild: bool, snap) -> None:
        """Bring collection ``name`` to the store's ``row`` (ChangeSnapshot.collection; None: deleted):
        created, deleted, re-created, its tokens, readers, key version and model; with ``rebuild``
        (or when new here) its index from the snapshot's codes. Under the write lock (the follower)."""
        col = self.collections.get(name)
        if col is not None and (row is None or row["uid"] != col.uid):
            self._forget(col)
            log.info("collection %r deleted on another front", name)
            col = None
        if row is None:
            return
        if col is None:
            col = self._open(name, row["bits"], row["owner_hash"], row["reader_hash"])
            col.uid, col.private = row["uid"], bool(row["private"])
            rebuild = not col.private
            log.info("collection %r created on another front", name)
        col.owner_hash, col.reader_hash = row["owner_hash"], row["reader_hash"]
        col.fingerprint, col.image_size, col.key_id = row["fingerprint"], row["image_size"], int(row["key_id"])
        col.readers = dict(row["readers"])
        if rebuild and not col.private:
            index = BinaryIndex(col.bits, **self._index_kwargs())
            index.load(snap.codes(name))
            with col.index.lock.write():  # searches already running finish on the old index
                col.index = index
            col.writes += 1
        self._known_hashes = frozenset({self.admin_hash} | {h for c in self.collections.values()
                                                             for h in (c.owner_hash, c.reader_hash) if h})
        self._refresh_user_hashes()

    def _forget(self, col: Collection) -> None:
        """Drop a collection the store no longer holds (under the write lock): calls that hold it end
        with NOT_FOUND at their next step; its tokens open nothing more."""
        col.dropped = True
        self.collections.pop(col.name, None)
        snapshot.remove(self.data_dir, col.name)
        self._known_hashes = self._known_hashes - {col.owner_hash, col.reader_hash}
        self._refresh_user_hashes()

    def _index_kwargs(self) -> dict:
        return {"n_shards": self.n_shards, "pool": self.pool, "mih_min": self.mih_min, "choose": self.index_choice}

    def _open(self, name, bits, owner_hash, reader_hash) -> Collection:
        col = Collection(name, bits, owner_hash, reader_hash, BinaryIndex(bits, **self._index_kwargs()))
        self.collections[name] = col
        self._known_hashes = self._known_hashes | {owner_hash, reader_hash}
        return col

    # --- index snapshots (dlheir.server.snapshot) --------------------------------------------
    def _snapshot(self, col: Collection) -> None:
        """Write one collection's snapshot: its index and the store's write counter, taken
        together under the write lock (no upload or delete between them), written outside it."""
        with self.write_lock:
            if self.collections.get(col.name) is not col:  # deleted meanwhile
                return
            generation, arrays = self._snapshot_mark(), col.index.state()
        seconds = snapshot.save(snapshot.snapshot_path(self.data_dir, col.name), generation, arrays, col.uid)
        log.info("collection %r: index snapshot (%d items) written in %.2f s", col.name, len(col.index), seconds)

    def _snapshot_mark(self) -> int:
        """What a snapshot taken now records (under the write lock): the store's write counter, or,
        over a shared store, the last change this front applied (its index may hold its own later
        ones: the next start then finds the store further on and rebuilds, never the reverse)."""
        return self.store.generation() if self.follower is None else self.follower.applied

    def save_snapshots(self) -> None:
        """Snapshot every server-ranked collection (at a clean shutdown, after the last call)."""
        for col in list(self.collections.values()):
            if not col.private:
                try:
                    self._snapshot(col)
                except OSError as exc:  # no snapshot only costs a rebuild at the next start
                    log.warning("collection %r: index snapshot not written: %s", col.name, exc)

    def snapshot_rebuilt(self) -> None:
        """Snapshot, in the background, the indexes rebuilt from the store at start (a crash now
        need not rebuild again). Called once the store passed its integrity check: a snapshot is
        never taken of a store that then turns out damaged."""
        rebuilt, self._rebuilt = self._rebuilt, []
        if rebuilt:
            self._snapshot_in_background(rebuilt)

    # a re-seal overtaken by a concurrent replace is dropped by the index (uploads of new items
    # during it stay in the flat delta beside the new structure: the build is kept); after this
    # many dropped builds in a row the next one holds the write lock, so writers that keep coming
    # cannot starve it (each try costs a whole build: 1.7 s at 10M codes). Deletes do not overtake
    # a build: they wait for it (Delete)
    RESEAL_TRIES_UNLOCKED = 1

    def _reseal(self, col: Collection, fraction: float = RESEAL_FRACTION, snapshot: bool = True) -> bool:
        """Fold the flat delta into the multi-index hash when it has passed ``fraction`` of the
        sealed part (``BinaryIndex.maybe_seal``), then (with ``snapshot``) snapshot it in the
        background; returns whether it re-sealed. Called
        outside the write lock: the build blocks no other writer, unless concurrent writes
        overtook RESEAL_TRIES_UNLOCKED builds in a row. While another build of the collection
        runs, nothing is done here (that one sees this write, or is tried again)."""
        if col.private or not col.seal_lock.acquire(blocking=False):
            return False
        try:
            index = col.index
            seals = index.seals
            for attempt in range(self.RESEAL_TRIES_UNLOCKED + 1):
                writes = col.writes
                if attempt < self.RESEAL_TRIES_UNLOCKED:
                    index.maybe_seal(fraction)
                else:
                    with self.write_lock:
                        if self.collections.get(col.name) is col and col.index is index:
                            index.maybe_seal(fraction)
                if index.seals != seals or col.writes == writes:  # sealed, or not needed (not overtaken)
                    break
            if index.seals != seals and snapshot:
                self._snapshot_in_background([col])
            return index.seals != seals
        finally:
            col.seal_lock.release()

    def _snapshot_in_background(self, cols: list[Collection]) -> None:
        def run():
            for col in cols:
                try:
                    self._snapshot(col)
                except Exception as exc:  # noqa: BLE001 - the store stays the source of truth
                    log.warning("collection %r: index snapshot not written: %s", col.name, exc)

        threading.Thread(target=run, name="snapshot", daemon=True).start()

    # --- auth -------------------------------------------------------------------------
    def known_token(self, token: str) -> bool:
        """Whether ``token`` opens anything on this server (the interceptor's check, made before
        a handler runs; which collection it opens is checked by the handler)."""
        return self._known_hash(token_hash(token))

    def _known_hash(self, given: str) -> bool:
        """Whether a token hash is the admin's or an active collection token's (owner, shared
        reader, per-user reader): the sets the interceptor and ``_admin`` both consult."""
        return given in self._known_hashes or given in self._user_hashes

    @staticmethod
    def _token(context) -> str:
        token = bearer_token(context.invocation_metadata())
        if token is None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing 'authorization: Bearer <token>' metadata")
        return token

    def _collection(self, name: str, context, write: bool) -> Collection:
        """The collection ``name`` if the caller's token opens it. The token is checked before
        existence: a caller that may not know a collection cannot tell a missing one from one
        its token does not open (both UNAUTHENTICATED, the same message)."""
        given = token_hash(self._token(context))
        col = self.collections.get(name)
        if col is not None:
            if hmac.compare_digest(given, col.owner_hash):
                return col
            if hmac.compare_digest(given, col.reader_hash) or given in col.readers:
                if write:
                    context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                  f"the reader token of {clip(name)} can search and fetch, not upload or delete")
                return col
        if hmac.compare_digest(given, self.admin_hash):  # the admin may know every collection
            if col is None:
                context.abort(grpc.StatusCode.NOT_FOUND, f"no collection named {clip(name)}")
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          f"the admin token creates and lists collections; use {clip(name)}'s owner or reader token")
        context.abort(grpc.StatusCode.UNAUTHENTICATED, f"token not valid for collection {clip(name)}")

    def _admin(self, context) -> None:
        given = token_hash(self._token(context))
        if hmac.compare_digest(given, self.admin_hash):
            return None
        if self._known_hash(given):  # not the admin's (checked above): a collection token
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "this call needs the server's admin token, "
                                                             "not a collection token")
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown token: this call needs the server's admin token")

    # --- collections --------------------------------------------------------------------
    def CreateCollection(self, request, context):
        self._admin(context)
        if not NAME_RE.fullmatch(request.name):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"collection name {clip(request.name)}: 1-128 letters, digits, '_', '.', '-', "
                          f"starting with a letter or digit")
        try:
            validate_bits(request.bits)
        except ContractError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if request.mode not in (pb.SERVER_RANKED, pb.PRIVATE_RANKING):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown collection mode {request.mode}")
        fingerprint, image_size = request.model_fingerprint, request.image_size
        if fingerprint and not FINGERPRINT_RE.fullmatch(fingerprint):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"model fingerprint {clip(fingerprint)}: 8-64 lowercase hex digits (dlheir.contract)")
        if image_size > MAX_IMAGE_SIZE:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"image size must be at most {MAX_IMAGE_SIZE}, got {image_size}")
        private = request.mode == pb.PRIVATE_RANKING
        owner, reader = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        with self.write_lock:
            uid = self.store.create_collection(request.name, request.bits, token_hash(owner), token_hash(reader),
                                               private=private, fingerprint=fingerprint, image_size=image_size)
            if uid is None:
                context.abort(grpc.StatusCode.ALREADY_EXISTS, f"collection {clip(request.name)} already exists")
            col = self._open(request.name, request.bits, token_hash(owner), token_hash(reader))
            col.private, col.fingerprint, col.image_size, col.uid = private, fingerprint, image_size, uid
        log.info("collection %r created (%d bits, %s, model %s) by %s", request.name, request.bits, mode_name(private),
                 fingerprint or "unrecorded", context.peer())
        return pb.CreateCollectionResponse(owner_token=owner, reader_token=reader)

    def _info(self, col: Collection) -> pb.CollectionInfo:
        n, size = self.store.stats(col.name)
        return self._page_info(col, pb.CollectionInfo(name=col.name, bits=col.bits, items=n, blob_bytes=size,
                                                      key_id=col.key_id, model_fingerprint=col.fingerprint,
                                                      image_size=col.image_size))

    def ListCollections(self, request, context):
        given = token_hash(self._token(context))
        if hmac.compare_digest(given, self.admin_hash):
            cols = list(self.collections.values())
        else:
            cols = [c for c in self.collections.values() if hmac.compare_digest(given, c.owner_hash)
                    or hmac.compare_digest(given, c.reader_hash) or given in c.readers]
            if not cols:
                context.abort(grpc.StatusCode.UNAUTHENTICATED, "token not valid for any collection")
        return pb.ListCollectionsResponse(collections=[self._info(c) for c in cols])

    def CollectionStats(self, request, context):
        return pb.CollectionStatsResponse(info=self._info(self._collection(request.collection, context, write=False)))

    def DeleteCollection(self, request, context):
        self._admin(context)
        col = self.collections.get(request.collection)
        if col is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no collection named {clip(request.collection)}")
        info = self._info(col)
        with self.write_lock:
            # dropped before the store forgets it: a stream that reads a row and then finds its
            # collection not dropped read it before the delete (Fetch, SyncCodePages)
            col.dropped = True
            try:
                self.store.delete_collection(col.name)  # durable first; then its tokens stop opening anything
            except BaseException:
                col.dropped = False
                raise
            self._forget(col)
        log.info("collection %r deleted (%d items) by %s", col.name, info.items, context.peer())
        return pb.DeleteCollectionResponse(info=info)

    def ListFronts(self, request, context):
        self._admin(context)
        follower = self.follower
        if follower is None:  # the embedded store: this process alone
            me = pb.FrontInfo(id="", address=getattr(self, "address", ""), host=socket.gethostname(), pid=os.getpid(),
                              started=self.started)
            return pb.ListFrontsResponse(shared=False, fronts=[me])
        head = self.store.change_head()
        me = self.store.front_id  # its own row may be up to a second old: its live figure instead
        fronts = [pb.FrontInfo(id=f, address=a, host=h, pid=p, started=s, applied=follower.applied if f == me else n,
                               seen=time.time() if f == me else t) for f, a, h, p, s, n, t in self.store.fronts()]
        return pb.ListFrontsResponse(shared=True, head=head, answered_by=me, fronts=fronts)

    # --- upload -------------------------------------------------------------------------
    def _validate_item(self, col: Collection, item, seen: set, context) -> None:
        if item.id < 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"id must be >= 0, got {item.id}")
        self._check_item_code(col, item, context)  # private mode: no code at all
        if len(item.blob) > MAX_BLOB_BYTES:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"item {item.id}: blob of {len(item.blob)} bytes exceeds the limit of {MAX_BLOB_BYTES} bytes")
        meta = sum(len(k.encode()) + len(v.encode()) for k, v in item.metadata.items())
        if meta > MAX_METADATA_BYTES:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"item {item.id}: metadata of {meta} bytes exceeds the limit of {MAX_METADATA_BYTES} bytes")
        if item.id in seen:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"id {item.id} appears twice in one batch")
        seen.add(item.id)

    @staticmethod
    def _check_model(col: Collection, given: str, context) -> None:
        """Codes of another model (or of none named) do not go into, or search, a collection made
        with a model: their distances to the stored codes mean nothing. Callers test
        ``col.fingerprint and given != col.fingerprint`` first (one compare on the hot path)."""
        context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                      model_mismatch(col.name, col.fingerprint, col.image_size, col.bits,
                                     given if not given or FINGERPRINT_RE.fullmatch(given) else clip(given)))

    @staticmethod
    def _check_code(col: Collection, code: bytes, what: str, context) -> None:
        try:
            check_code(code, col.bits, what)
        except ContractError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"collection {clip(col.name)}: {exc}")

    @staticmethod
    def _gone(col: Collection, context) -> None:
        """End a call whose collection was deleted (perhaps re-created under its name) since it
        started: callers check under the write lock, before writing anything."""
        if col.dropped:
            context.abort(grpc.StatusCode.NOT_FOUND,
                          f"collection {clip(col.name)} was deleted while this call ran (a collection created since "
                          f"under its name is another one): nothing more was done")

    def _commit(self, col: Collection, batch: list, replace: bool, key_id: int, context) -> tuple[int, bool]:
        """Store one upload batch durably, then index it: (items in the collection, whether the
        index was re-sealed, not yet snapshotted: Upload snapshots once its stream ends)."""
        ids = [b[0] for b in batch]
        with self.write_lock:
            self._gone(col, context)
            if key_id != col.key_id:  # under the lock: RekeyCodes moves col.key_id under it too
                context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                              f"collection {clip(col.name)} is under key version {col.key_id}, this batch was made "
                              f"with key version {key_id} (the collection was re-keyed during the upload): nothing "
                              f"of it was stored; upload again with the current keys (owner upload resumes)")
            existing = self.store.existing_ids(col.name, ids)
            if existing and not replace:
                context.abort(grpc.StatusCode.ALREADY_EXISTS,
                              f"{len(existing)} id(s) already stored, e.g. {min(existing)}; set replace to overwrite")
            self.store.write_batch(col.name, batch, replace, uid=col.uid)  # durable from here
            if not col.private:  # private mode: nothing to index
                codes = np.frombuffer(b"".join(b[1] for b in batch), np.uint8)
                col.index.add(np.array(ids, dtype=np.int64), codes, replace_ids=sorted(existing) if existing else None,
                              seal=False)
                col.writes += 1
            total = self._size(col)
        # past 10% of a delta: re-sealed outside the write lock. Not snapshotted here: a snapshot is
        # used at start only while the store's write counter is still the one it recorded, and the
        # stream's next batch changes that, so a snapshot per re-seal during an upload (at 10M items,
        # hundreds of MB written, and its arrays held, each time) would be stale before it is read
        return total, self._reseal(col, snapshot=False)

    def Upload(self, request_iterator, context):
        col, resealed, ended = None, False, False
        try:
            for n_batch, request in enumerate(request_iterator):
                # the token and the collection are checked at every batch, not once per stream: a
                # deleted collection, or one re-created under its name, ends the stream
                current = self._collection(request.collection, context, write=True)
                if col is None:
                    col = current
                elif request.collection != col.name:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, "one upload stream goes to one collection")
                elif current is not col:
                    self._gone(col, context)
                if len(request.items) > MAX_BATCH_ITEMS:
                    context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                  f"a batch holds at most {MAX_BATCH_ITEMS} items, got {len(request.items)}")
                if col.fingerprint and request.model_fingerprint != col.fingerprint and not col.private:
                    self._check_model(col, request.model_fingerprint, context)  # private mode: its items carry no code
                seen: set = set()
                batch = []
                for item in request.items:
                    self._validate_item(col, item, seen, context)
                    batch.append((item.id, item.code, item.blob, dict(item.metadata)))
                # an empty batch is acknowledged too (nothing to make durable): one ack per batch
                if batch:
                    total, sealed = self._commit(col, batch, request.replace, request.key_id or 1, context)
                    resealed |= sealed
                else:
                    total = self._size(col)
                yield pb.UploadAck(batch=n_batch, ids=[b[0] for b in batch], total_items=total)
            if col is not None:  # the stream is over: fold a flat delta of 1% or more already (and snapshot)
                ended = self._reseal(col, UPLOAD_END_RESEAL_FRACTION)
        finally:  # however the stream ended: snapshot a re-seal made during it, unless the end's did
            if resealed and not ended:
                self._snapshot_in_background([col])

    # --- search, fetch, delete ----------------------------------------------------------
    def Search(self, request, context):
        col = self._collection(request.collection, context, write=False)
        if col.private:
            self._refuse_if_private(col, context, "answer Search")
        if col.fingerprint and request.model_fingerprint != col.fingerprint:
            self._check_model(col, request.model_fingerprint, context)
        k, codes = request.k, request.codes
        if not 1 <= k <= MAX_K:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"k must be from 1 to {MAX_K}, got {k}")
        n_queries = len(codes)
        if not 1 <= n_queries <= MAX_QUERIES:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"give 1 to {MAX_QUERIES} query codes per request, got {n_queries}")
        n_results = n_queries * min(k, len(col.index))
        if n_results > MAX_RESULTS:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"this search asks for {n_queries} queries x k={min(k, len(col.index))} = "
                          f"{n_results} results; the limit is {MAX_RESULTS} results per request "
                          f"(send fewer queries per request or a smaller k)")
        queries = self._query_codes(col, codes, context)
        max_d = request.max_distance if request.HasField("max_distance") else None
        results = col.index.search(queries, k, max_d)
        if not request.packed:
            return pb.SearchResponse(results=[pb.SearchResult(ids=i.tolist(), distances=d.tolist()) for i, d in results])
        # packed: whole arrays, no per-result objects: cheaper to build and to read
        if len(results) == 1:
            ids, dist = results[0]
            counts = [len(ids)]
        else:
            counts = [len(i) for i, _ in results]
            ids, dist = np.concatenate([i for i, _ in results]), np.concatenate([d for _, d in results])
        return pb.SearchResponse(counts=counts, ids=ids.astype(PACKED_IDS, copy=False).tobytes(),
                                 distances=dist.astype(PACKED_DISTANCES).tobytes())

    def _query_codes(self, col: Collection, codes, context) -> np.ndarray:
        """A request's query codes as one [Q, code bytes] array, each checked as a code of the
        collection (``_check_code`` refuses the first bad one, naming it). Whole-byte codes need
        only their lengths checked: that is done without a call per query."""
        want = code_bytes(col.bits)
        joined = codes[0] if len(codes) == 1 else b"".join(codes)
        if col.bits % 8 or len(joined) != len(codes) * want or (len(codes) > 1 and any(len(c) != want for c in codes)):
            for i, code in enumerate(codes):
                self._check_code(col, code, f"query {i}", context)
        return np.frombuffer(joined, np.uint8).reshape(-1, want)

    def Fetch(self, request, context):
        col = self._collection(request.collection, context, write=False)
        if len(request.ids) > MAX_IDS:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"fetch at most {MAX_IDS} ids per call, got {len(request.ids)}")
        for item_id, blob, metadata in self.store.fetch(col.name, list(request.ids)):
            self._gone(col, context)  # after the read: a row read while not dropped is this collection's
            yield pb.FetchedItem(id=item_id, blob=blob, metadata=metadata)
        self._gone(col, context)  # items it no longer found were not "unknown ids": the collection went

    def Delete(self, request, context):
        col = self._collection(request.collection, context, write=True)
        if len(request.ids) > MAX_IDS:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"delete at most {MAX_IDS} ids per call, got {len(request.ids)}")
        ids = list(request.ids)
        # remove() may re-seal (under the write lock: a quarter of the sealed part dead, or the
        # delta past 10%): it waits for a build running outside that lock instead of overtaking it
        # and building a second one beside it
        with col.seal_lock, self.write_lock:
            self._gone(col, context)
            n = self.store.delete(col.name, ids, uid=col.uid)  # durable first, then the index
            seals = col.index.seals
            col.index.remove(ids)
            col.writes += 1
            if col.index.seals != seals:  # snapshot it, as after an upload (taken once this lock is free)
                self._snapshot_in_background([col])
        log.info("collection %r: %d of %d id(s) deleted by %s", col.name, n, len(ids), context.peer())
        return pb.DeleteResponse(deleted=n)

    def Contains(self, request, context):
        col = self._collection(request.collection, context, write=False)
        if len(request.ids) > MAX_IDS:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"ask about at most {MAX_IDS} ids per call, got {len(request.ids)}")
        return pb.ContainsResponse(present=sorted(self.store.present_ids(col.name, request.ids)))

    # --- per-user readers and key rotation (owner token only) ----------------------------
    # Tokens are issued here, returned once and stored as SHA-256 only; a revocation is durable
    # (store first) and then dropped from the in-memory sets the interceptor and _collection
    # consult, so the next call with that token is UNAUTHENTICATED. Calls already past the
    # check (a running Fetch stream) finish.
    def _load_access(self) -> None:
        """Per-user credentials and key ids from the store (at start)."""
        for name, label, h, _created, revoked in self.store.readers():
            col = self.collections.get(name)
            if col is not None and revoked is None:
                col.readers[h] = label
        for name, key_id in self.store.key_ids().items():
            if name in self.collections:
                self.collections[name].key_id = int(key_id)
        self._refresh_user_hashes()

    def _refresh_user_hashes(self) -> None:
        self._user_hashes = frozenset(h for c in list(self.collections.values()) for h in c.readers)

    def _drop_shared_reader(self, col: Collection) -> None:
        if col.reader_hash:
            self._known_hashes = self._known_hashes - {col.reader_hash}
            col.reader_hash = ""

    def _user_label(self, user: str, context) -> str:
        if not NAME_RE.fullmatch(user):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"user label {clip(user)}: 1-128 letters, digits, '_', '.', '-', starting with a letter or digit")
        return user

    def AddReader(self, request, context):
        col = self._collection(request.collection, context, write=True)
        user = self._user_label(request.user, context)
        token = secrets.token_urlsafe(32)
        with self.write_lock:
            self._gone(col, context)
            done, previous, created = self.store.add_reader(col.name, user, token_hash(token), request.replace)
            if not done:
                context.abort(grpc.StatusCode.ALREADY_EXISTS,
                              f"user {clip(user)} already holds an active reader token for {clip(col.name)}; "
                              "revoke it first or set replace")
            readers = {h: u for h, u in col.readers.items() if h != previous}  # the re-issued token stops working
            readers[token_hash(token)] = user
            col.readers = readers  # copy on write: concurrent checks see the old or the new dict, never a change
            self._refresh_user_hashes()
        log.info("collection %r: reader %r %s by %s", col.name, user, "re-issued" if previous else "added",
                 context.peer())
        return pb.AddReaderResponse(token=token, created=created)

    def ListReaders(self, request, context):
        col = self._collection(request.collection, context, write=True)
        readers = [pb.ReaderInfo(user=label, created=created, revoked=revoked or 0.0)
                   for name, label, _h, created, revoked in self.store.readers() if name == col.name]
        return pb.ListReadersResponse(readers=readers, shared_token_active=bool(col.reader_hash), key_id=col.key_id)

    def RevokeReader(self, request, context):
        col = self._collection(request.collection, context, write=True)
        with self.write_lock:
            self._gone(col, context)
            if request.shared_token:
                if request.user:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, "give a user or shared_token, not both")
                revoked = self.store.disable_shared_reader(col.name)
                self._drop_shared_reader(col)
                what = "the shared reader token"
            else:
                user = self._user_label(request.user, context)
                found = self.store.revoke_reader(col.name, user)
                if found is None:
                    context.abort(grpc.StatusCode.NOT_FOUND, f"collection {clip(col.name)} has no reader {clip(user)}")
                h, revoked = found
                col.readers = {k: u for k, u in col.readers.items() if k != h}  # copy on write
                self._refresh_user_hashes()
                what = f"reader {user!r}"
        log.info("collection %r: %s %s by %s", col.name, what, "revoked" if revoked else "was already revoked",
                 context.peer())
        return pb.RevokeReaderResponse(revoked=revoked)

    def RekeyCodes(self, request, context):
        col = self._collection(request.collection, context, write=True)
        bits = col.bits
        perm = np.array(request.perm, dtype=np.int64)
        if len(perm) != bits or not np.array_equal(np.sort(perm), np.arange(bits)):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"perm must be a permutation of 0..{bits - 1} ({bits} entries), got {len(perm)} entries")
        self._check_code(col, request.mask, "mask", context)
        if request.to_key_id <= request.from_key_id:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"to_key_id ({request.to_key_id}) must be greater than from_key_id ({request.from_key_id})")
        mask = unpack_bits(np.frombuffer(request.mask, np.uint8)[None, :], bits)[0]
        width = code_bytes(bits)

        def transform(codes: list[bytes]) -> list[bytes]:
            out = list(codes)
            rows = [i for i, c in enumerate(codes) if len(c) == width]  # items stored without a code stay so
            if rows:
                old = unpack_bits(np.frombuffer(b"".join(codes[i] for i in rows), np.uint8).reshape(-1, width), bits)
                for i, row in zip(rows, pack_bits(old[:, perm] ^ mask)):
                    out[i] = row.tobytes()
            return out

        with self.write_lock:  # no upload or delete between the rewrite and the index swap
            self._gone(col, context)
            done = self.store.rekey_codes(col.name, request.from_key_id, request.to_key_id, transform)
            if done is None:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                              f"collection {clip(col.name)} is at key {col.key_id}, not {request.from_key_id}")
            n, revoked = done
            # durable from here: revoke in memory at once, then rebuild the index and swap it in
            col.key_id = request.to_key_id
            col.readers = {}
            self._refresh_user_hashes()
            self._drop_shared_reader(col)
            index = BinaryIndex(bits, **self._index_kwargs())
            index.load(self.store.codes(col.name))  # as at start (items without a code are not read)
            with col.index.lock.write():  # searches already running finish on the old index
                col.index = index
        log.info("collection %r: %d codes re-keyed from key %d to %d, %d reader(s) revoked, by %s", col.name, n,
                 request.from_key_id, request.to_key_id, len(revoked), context.peer())
        return pb.RekeyCodesResponse(items=n, revoked_users=sorted(label for label, _ in revoked))

    # --- re-hashing with another model (dlheir owner reindex) -----------------------------------
    def _reindex_target(self, request, context, write: bool) -> Collection:
        """The owner's server-ranked collection a reindex call is for, and a well-formed other model."""
        col = self._collection(request.collection, context, write=write)
        if col.private:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"collection {clip(col.name)} is in private-ranking mode: its codes live in the owner's "
                          "sealed pages, which a reindex does not rewrite; re-create it and upload its images again")
        fingerprint = request.model_fingerprint
        if not FINGERPRINT_RE.fullmatch(fingerprint):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"model_fingerprint must be 8 to 64 lowercase hex digits, got {clip(fingerprint)!r}")
        if fingerprint == col.fingerprint:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"collection {clip(col.name)} already holds codes of model {fingerprint}")
        return col

    def _reindex_key(self, col: Collection, key_id: int, context) -> None:
        if (key_id or 1) != col.key_id:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"collection {clip(col.name)} is at key version {col.key_id}, these codes are under "
                          f"{key_id or 1}: a rotation ran meanwhile; run the reindex again")

    def StageCodes(self, request, context):
        col = self._reindex_target(request, context, write=True)
        n, width = len(request.ids), code_bytes(col.bits)
        if not 0 < n <= MAX_STAGE_IDS:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"give 1 to {MAX_STAGE_IDS} ids per call, got {n}")
        if len(request.codes) != n * width:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"{n} ids need {n * width} bytes of codes ({width} per {col.bits}-bit code), "
                          f"got {len(request.codes)}")
        codes = [request.codes[i * width:(i + 1) * width] for i in range(n)]
        for i, code in zip(request.ids, codes):
            self._check_code(col, code, f"the code of id {i}", context)
        if len(set(request.ids)) != n:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "an id appears twice in one call")
        with self.write_lock:
            self._gone(col, context)
            self._reindex_key(col, request.key_id, context)
            staged = self.store.stage_codes(col.name, request.model_fingerprint, list(request.ids), codes,
                                            uid=col.uid)
        log.debug("collection %r: %d codes of model %s staged (%d in all)", col.name, n, request.model_fingerprint,
                  staged)
        return pb.StageCodesResponse(staged=staged)

    def UnstagedIds(self, request, context):
        col = self._reindex_target(request, context, write=True)
        if not 0 < request.limit <= MAX_STAGE_IDS:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"limit must be 1 to {MAX_STAGE_IDS}, got {request.limit}")
        ids, staged = self.store.unstaged_ids(col.name, request.model_fingerprint, request.after_id, request.limit)
        self._gone(col, context)
        return pb.UnstagedIdsResponse(ids=ids, items=len(col.index), staged=staged)

    def SwitchCodes(self, request, context):
        col = self._reindex_target(request, context, write=True)
        if request.image_size > MAX_IMAGE_SIZE:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"image size must be at most {MAX_IMAGE_SIZE}, got {request.image_size}")
        with self.write_lock:  # no upload or delete between the rewrite and the index swap
            self._gone(col, context)
            self._reindex_key(col, request.key_id, context)
            previous = col.fingerprint
            missing = self.store.switch_codes(col.name, request.model_fingerprint, request.image_size, uid=col.uid)
            if missing:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                              f"collection {clip(col.name)}: {missing} stored item(s) have no staged code of model "
                              f"{request.model_fingerprint} (uploaded since the reindex began?): stage them "
                              "(run the reindex again) before the switch")
            col.fingerprint, col.image_size = request.model_fingerprint, request.image_size
            index = BinaryIndex(col.bits, **self._index_kwargs())
            index.load(self.store.codes(col.name))
            with col.index.lock.write():  # searches already running finish on the old index
                col.index = index
        log.info("collection %r: codes switched from model %s to %s (%d items), by %s", col.name, previous or "-",
                 request.model_fingerprint, len(index), context.peer())
        return pb.SwitchCodesResponse(items=len(index), previous_fingerprint=previous)
