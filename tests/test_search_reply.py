"""Search replies: the packed form (three arrays for the whole request, asked with
SearchRequest.packed; what CloudClient uses) carries exactly what the per-query form does."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from dlheir.client.cloud import CloudClient, CloudError, search_results
from dlheir.proto import dlheir_cloud_pb2 as pb


def test_packed_reply_equals_per_query_reply(cloud_server):
    rng = np.random.default_rng(4)
    with CloudClient(cloud_server.address) as admin:
        owner_token, _ = admin.create_collection("r", 64, cloud_server.admin_token)
    with CloudClient(cloud_server.address, owner_token) as owner:
        codes = rng.integers(0, 256, (2000, 8), dtype=np.uint8)
        ids = rng.choice(2**62, 2000, replace=False)  # ids beyond 32 bits travel intact
        list(owner.upload("r", ((int(i), c.tobytes(), b"x", {}) for i, c in zip(ids, codes)), batch_size=1000))
        queries = np.concatenate([codes[:5], 255 - codes[:3]])  # far queries: max_distance leaves some empty
        md = owner._md()
        for k, max_d in ((1, None), (40, None), (40, 10), (2000, 64)):
            req = pb.SearchRequest(collection="r", codes=[q.tobytes() for q in queries], k=k)
            if max_d is not None:
                req.max_distance = max_d
            plain = owner.stub.Search(req, metadata=md)
            req.packed = True
            packed = owner.stub.Search(req, metadata=md)
            assert len(plain.results) == len(queries) and not packed.results and len(packed.counts) == len(queries)
            a, b = search_results(plain), search_results(packed)
            for (ia, da), (ib, db) in zip(a, b):
                assert ia.tolist() == ib.tolist() and da.tolist() == db.tolist() and ib.dtype == np.int64
            if max_d == 10:
                assert any(len(i) == 0 for i, _ in b) and any(len(i) for i, _ in b)
            if max_d == 64:  # 64-bit codes: distances up to 64, every item
                assert all(len(i) == 2000 for i, _ in b) and max(int(d.max()) for _, d in b) > 32
            assert [(i.tolist(), d.tolist()) for i, d in owner.search("r", queries, k, max_d)] == \
                   [(i.tolist(), d.tolist()) for i, d in b]


def test_malformed_packed_reply_is_refused():
    reply = pb.SearchResponse(counts=[2, 1], ids=np.arange(2, dtype="<i8").tobytes(),
                              distances=np.zeros(2, "<u2").tobytes())
    with pytest.raises(CloudError, match="malformed search reply"):
        search_results(reply)


def test_each_query_code_is_checked_in_a_batch(cloud_server):
    """Search checks a batch's codes without a call per query when all are whole-byte codes of
    the right length; any bad one is still refused, named by its position (lengths that add up
    to the right total, padding bits set in a later query)."""
    with CloudClient(cloud_server.address) as admin:
        owner_48, _ = admin.create_collection("q48", 48, cloud_server.admin_token)
        owner_12, _ = admin.create_collection("q12", 12, cloud_server.admin_token)
    for name, token, codes, expected in (
            ("q48", owner_48, [bytes(6), bytes(5), bytes(7)], "query 1: code is 5 bytes"),
            ("q12", owner_12, [bytes(2), b"\x00\x00", b"\x00\x01"], "query 2: the 4 padding bits")):
        with CloudClient(cloud_server.address, token) as owner:
            req = pb.SearchRequest(collection=name, codes=codes, k=1, packed=True)
            with pytest.raises(grpc.RpcError) as err:
                owner.stub.Search(req, metadata=owner._md())
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and expected in err.value.details()
            req.codes[:] = codes[:1]  # the good one alone is answered (an empty collection: no results)
            answered = search_results(owner.stub.Search(req, metadata=owner._md()))
            assert [(i.tolist(), d.tolist()) for i, d in answered] == [([], [])]
