"""Private-ranking mode on the server: sealed, append-only code pages it stores but cannot read.

A collection created with ``mode = PRIVATE_RANKING`` holds items without codes (an empty
``code``) and refuses Search. Its owner appends *code pages*, each sealed with AES-256-GCM
under a key the server never sees (format: ``dlheir.client.private``); readers sync the pages
they lack and rank on their own machine, then Fetch the top ids.

What the server checks, without any key: the caller's token (owner to append, owner or
reader to sync), that the collection is in private mode, the page's size and its clear
header (magic ``DLHS`` and format version), and that page numbers run 0, 1, 2, ... without a
gap (an append names the number it expects to get, so two writers cannot both take one).
Pages are never changed or removed: deletes and replacements are later pages. A sync
answers first with a header (mode, code length, page count), so a client learns the
collection's mode and gets its new pages in one round trip.

These handlers are mixed into :class:`dlheir.server.service.CloudStoreService`.
"""

from __future__ import annotations

import logging

import grpc

from dlheir.contract import PAGE_MAGIC, PAGE_VERSION
from dlheir.proto import dlheir_cloud_pb2 as pb
from dlheir.server.guard import clip
from dlheir.server.store import StoreCorruptError

PAGE_MIN_BYTES = len(PAGE_MAGIC) + 1 + 4 + 12 + 16  # magic, version, key id, nonce, tag: empty ciphertext
MAX_PAGE_BYTES = 32 * 1024 * 1024  # one sealed page (the client writes far smaller ones)

log = logging.getLogger("dlheir.server.sealed")


def mode_name(private: bool) -> str:
    return "private-ranking" if private else "server-ranked"


class CodePagesMixin:
    """AppendCodePage / SyncCodePages, and the mode checks the other handlers call."""

    # --- used by the service's own handlers -----------------------------------------------
    def _check_item_code(self, col, item, context) -> None:
        """An upload item's code: none at all in private mode, else a valid code."""
        if col.private:
            if item.code:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              f"item {item.id}: collection {clip(col.name)} is in private-ranking mode: items carry "
                              f"no code (the codes go in sealed code pages), got {len(item.code)} code bytes")
            return
        self._check_code(col, item.code, f"item {item.id}", context)

    @staticmethod
    def _refuse_if_private(col, context, what: str) -> None:
        if col.private:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"collection {clip(col.name)} is in private-ranking mode: the server holds no codes and "
                          f"does not {what}; sync its sealed code pages and rank locally (dlheir user search does)")

    def _page_info(self, col, info: pb.CollectionInfo) -> pb.CollectionInfo:
        """``info`` with the collection's mode and (private mode) its page count and bytes."""
        if col.private:
            info.mode = pb.PRIVATE_RANKING
            info.code_pages, info.code_page_bytes = self.store.page_stats(col.name)
        return info

    def _size(self, col) -> int:
        """Items in the collection: the index's size, or (private mode: no index) the store's count."""
        return self.store.page_item_count(col.name) if col.private else len(col.index)

    # --- the RPCs ---------------------------------------------------------------------------
    def AppendCodePage(self, request, context):
        col = self._collection(request.collection, context, write=True)
        if not col.private:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"collection {clip(col.name)} is server-ranked: its codes travel with the items, it has "
                          f"no code pages (create the collection in private-ranking mode for those)")
        data = request.data
        if len(data) > MAX_PAGE_BYTES:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"code page of {len(data)} bytes exceeds the limit of {MAX_PAGE_BYTES} bytes")
        if len(data) < PAGE_MIN_BYTES or data[:4] != PAGE_MAGIC:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"not a sealed code page (magic {PAGE_MAGIC.decode()}, at least {PAGE_MIN_BYTES} bytes)")
        if data[4] != PAGE_VERSION:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"code page format version {data[4]}; this server stores version {PAGE_VERSION}")
        count = self.store.page_append(col.name, request.page, data, uid=col.uid)  # durable when it returns
        if count is None:
            have, _ = self.store.page_stats(col.name)
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"collection {clip(col.name)} has {have} code page(s): the next page is number {have}, "
                          f"not {request.page} (re-read the count, re-seal and retry)")
        log.debug("collection %r: code page %d appended (%d bytes) by %s", col.name, request.page, len(data),
                  context.peer())
        return pb.AppendCodePageResponse(pages=count)

    def SyncCodePages(self, request, context):
        col = self._collection(request.collection, context, write=False)
        pages, size = self.store.page_stats(col.name) if col.private else (0, 0)
        mode = pb.PRIVATE_RANKING if col.private else pb.SERVER_RANKED
        # the model too: a client ranking locally checks its own against it (the server sees no code)
        yield pb.SyncCodePagesResponse(header=pb.SyncHeader(mode=mode, bits=col.bits, pages=pages, page_bytes=size,
                                                            model_fingerprint=col.fingerprint,
                                                            image_size=col.image_size))
        if request.from_page >= pages:  # nothing new, server-ranked, or a copy of something else
            return
        sent = 0
        pages_read = self.store.page_read(col.name, request.from_page, pages)
        while True:
            try:
                page, data = next(pages_read)
            except StopIteration:
                break
            except StoreCorruptError:  # a page gone: only a damaged store loses one, or a deleted collection
                self._gone(col, context)
                raise
            self._gone(col, context)  # after the read: a page read while not dropped is this collection's
            sent += len(data)
            yield pb.SyncCodePagesResponse(page=pb.CodePage(page=page, data=data))
        log.debug("collection %r: code pages %d..%d (%d bytes) synced by %s", col.name, request.from_page, pages - 1,
                  sent, context.peer())
