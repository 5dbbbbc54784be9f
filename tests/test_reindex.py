"""A new model does not strand a collection: ``dlheir owner reindex`` re-hashes it with the served
model (fetch, decrypt with the owner's keys, hash, stage each code on the server, then one switch),
resumably, with searches exact on the old codes until the switch and on the new ones after it,
across a restart; ``dlheir status`` says which collections the served model can search.

Two real Triton servers: the session's (model A) and one serving another network (model B, another
seed and image size); a real cloud server (the store backend of the run: SQLite, or PostgreSQL + S3
under make test-engines)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import dlheir
from dlheir.client.cloud import CloudClient
from dlheir.client.crypto import CodeTransform, OwnerKeys
from dlheir.client.owner import reindex_collection
from dlheir.client.triton import TritonHasher
from dlheir.codes import hamming
from dlheir.errors import UserError
from helpers import BITS, margined_model

pytestmark = pytest.mark.slow
SIZE_B = 40  # model B hashes 40 px images (A: 32): the switch records the new size too


@pytest.fixture(scope="module")
def onnx_b(tmp_path_factory):
    """Another network's export (model B: another seed, 40 px)."""
    from dlheir.export.onnx_export import export_onnx

    return export_onnx(margined_model(seed=1), tmp_path_factory.mktemp("model_b") / "model.onnx", SIZE_B)


@pytest.fixture(scope="module")
def triton_b(onnx_b):
    """A second real tritonserver serving model B."""
    from dlheir.procs import free_port
    from dlheir.triton.launcher import TritonServer
    from dlheir.triton.repository import prepare_repository

    work = onnx_b.parent
    served = prepare_repository(work / "model_repository", onnx_b, "onnx-cpu")
    server = TritonServer(served.path, grpc_port=free_port(), http_port=free_port(), metrics_port=free_port(),
                          state_dir=work / "triton")
    with server:
        yield server


class StopAfter:
    """A hasher that hashes ``calls`` batches and then is interrupted (as a Ctrl-C would)."""

    def __init__(self, hasher: TritonHasher, calls: int) -> None:
        self.hasher, self.calls = hasher, calls

    def __getattr__(self, name):
        return getattr(self.hasher, name)

    def hash_images(self, images):
        if self.calls == 0:
            raise KeyboardInterrupt
        self.calls -= 1
        return self.hasher.hash_images(images)


def _brute_force(owner: dlheir.Owner, hasher: TritonHasher, files: list, ids: list[int], query, k: int):
    """The top k by (distance, id) over the codes ``hasher`` gives the files, transformed as stored."""
    keys = owner.keys().for_collection("c")
    transform = CodeTransform(keys.transform_secret, BITS)
    stored = transform.apply(hasher.hash_images(files)[1])
    q = transform.apply(hasher.hash_images([query])[1])
    d = hamming(q, stored)[0]
    order = sorted(range(len(ids)), key=lambda j: (int(d[j]), ids[j]))[:k]
    return [(ids[j], int(d[j])) for j in order]


def test_reindex_switches_a_collection_to_the_served_model(client_setup, triton_server, triton_b):
    s = client_setup
    owner = dlheir.Owner()
    owner.init_keys()
    owner.create_collection("c")
    owner.upload(s["images"], "c", progress=False)
    dlheir.User.keygen()
    owner.grant(collection="c", user="me")
    files = sorted(s["images"].rglob("*.png"))
    ids = owner.item_ids(files, collection="c")
    query = files[5]
    fp_a = TritonHasher(triton_server.grpc_url).fingerprint
    b = TritonHasher(triton_b.grpc_url, batch_size=8)
    assert b.fingerprint != fp_a

    user_b = dlheir.User(triton=triton_b.grpc_url)
    with pytest.raises(UserError, match="model"):  # the collection holds model A's codes
        user_b.search(query, k=3)
    st = dlheir.status(triton=triton_b.grpc_url)
    assert [c.served for c in st.collections if c.name == "c"] == [False]

    # an interrupted reindex: 2 batches of 8 staged, nothing switched, searches on the old codes
    tokens = owner.tokens("c")
    with CloudClient(s["cloud"].address, tokens["owner_token"]) as cloud:
        with pytest.raises(KeyboardInterrupt):
            reindex_collection(owner.keys(), "c", cloud, StopAfter(b, 2), batch_size=8, progress=False)
        page = cloud.unstaged_ids("c", b.fingerprint, -1, 1000)
        assert (page.items, page.staged, len(page.ids)) == (len(files), 16, len(files) - 16)
        assert cloud.stats("c").model_fingerprint == fp_a
        user_a = dlheir.User()
        hits = user_a.search(query, k=len(files)).results
        with TritonHasher(triton_server.grpc_url) as a:
            assert [(h.id, h.distance) for h in hits] == _brute_force(owner, a, files, ids, query, len(files))
        # an image uploaded meanwhile (model A) has no staged code: the switch is refused
        extra = s["images"] / "extra"
        extra.mkdir()
        (extra / "x.png").write_bytes(files[0].read_bytes() + b"\0")  # other bytes, same pixels: a new id
        owner.upload(extra, "c", progress=False)
        with pytest.raises(UserError, match="have no staged code"):
            cloud.switch_codes("c", b.fingerprint, SIZE_B, 1)
        assert cloud.stats("c").model_fingerprint == fp_a

    # run again: only the rest is re-hashed, then the switch
    report = dlheir.Owner(triton=triton_b.grpc_url).reindex("c", batch_size=8, progress=False)
    assert (report.staged_now, report.items, report.rounds) == (len(files) + 1 - 16, len(files) + 1, 1)
    assert (report.previous_model, report.model, report.image_size) == (fp_a, b.fingerprint, SIZE_B)
    info = owner.describe("c")
    assert (info.model_fingerprint, info.image_size, info.items) == (b.fingerprint, SIZE_B, len(files) + 1)
    files.append(extra / "x.png")
    ids = owner.item_ids(files, collection="c")

    def exact_on_b() -> None:
        hits = dlheir.User(triton=triton_b.grpc_url).search(query, k=len(files)).results
        assert [(h.id, h.distance) for h in hits] == _brute_force(owner, b, files, ids, query, len(files))
        assert hits[0].distance == 0 and hits[0].image in {f.read_bytes() for f in files}

    exact_on_b()
    with pytest.raises(UserError, match="model"):  # model A's queries are refused now
        dlheir.User().search(query, k=3)
    st = dlheir.status(triton=triton_b.grpc_url)
    assert [c.served for c in st.collections if c.name == "c"] == [True]
    assert dlheir.Owner(triton=triton_b.grpc_url).reindex("c", progress=False).already

    s["cloud"].stop()  # the switch is durable: the same after a restart
    s["cloud"].start()
    exact_on_b()
    b.close()


def test_reindex_cli_and_its_refusals(client_setup, triton_b, capsys):
    from dlheir.cli import main

    s = client_setup
    owner = dlheir.Owner()
    owner.init_keys()
    owner.create_collection("p", private=True)
    owner.create_collection("c")
    owner.upload(s["images"], "c", progress=False)
    capsys.readouterr()
    code = main(["owner", "reindex", "--collection", "p", "--triton", triton_b.grpc_url])
    err = capsys.readouterr().err
    assert code == 2 and "private-ranking mode" in err and len(err.strip().splitlines()) == 1, err
    code = main(["owner", "reindex", "--collection", "c", "--triton", triton_b.grpc_url, "--batch-size", "0"])
    assert code == 2 and "--batch-size" in capsys.readouterr().err
    code = main(["status", "--triton", triton_b.grpc_url])
    out = capsys.readouterr().out
    assert "served by Triton" in out and "dlheir owner reindex NAME" in out, out
    code = main(["owner", "reindex", "--collection", "c", "--triton", triton_b.grpc_url, "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["items"] == report["staged_now"] == len(list(s["images"].rglob("*.png")))
    code = main(["owner", "reindex", "--collection", "c", "--triton", triton_b.grpc_url])
    assert code == 0 and "nothing to do" in capsys.readouterr().out
    # the server refuses a malformed stage: one line, nothing staged
    with CloudClient(s["cloud"].address, owner.tokens("c")["owner_token"]) as cloud:
        with pytest.raises(UserError, match="bytes of codes"):
            cloud.stage_codes("c", "ab" * 8, 1, [1, 2], np.zeros((1, BITS // 8), np.uint8))
        with pytest.raises(UserError, match="already holds codes"):
            cloud.stage_codes("c", owner.describe("c").model_fingerprint, 1, [1], np.zeros((1, BITS // 8), np.uint8))
    assert OwnerKeys.load(s["home"] / "owner.key").for_collection("c").key_id == 1


def test_triton_keeps_serving_an_earlier_version_for_its_collections(tmp_path, monkeypatch, served_model, onnx_b,
                                                                    triton_server, digits_small, capsys):
    """`dlheir triton start --keep-version 1` after a new export: the ensemble serves model B (version 2) and
    dlheir_onnx_cpu_v1 still hashes with model A, the same codes as a Triton serving A (the client
    preprocesses for it), so a collection of A stays searchable during its reindex."""
    from dlheir.cli import main
    from dlheir.procs import free_port

    monkeypatch.setenv("DLHEIR_STATE", str(tmp_path / "state"))
    grpc = free_port()
    assert main(["triton", "prepare", "--onnx", str(served_model["onnx"])]) == 0  # version 1: model A
    capsys.readouterr()
    code = main(["triton", "start", "--onnx", str(onnx_b), "--keep-version", "1", "--grpc-port", str(grpc),
                 "--http-port", str(free_port()), "--metrics-port", str(free_port())])
    out = capsys.readouterr().out
    try:
        assert code == 0 and "--model dlheir_onnx_cpu_v1" in out, out
        files = sorted(digits_small.rglob("*.png"))[:6]
        with TritonHasher(f"127.0.0.1:{grpc}") as new, TritonHasher(f"127.0.0.1:{grpc}", model="dlheir_onnx_cpu_v1") as old, \
                TritonHasher(triton_server.grpc_url) as a:
            assert (new.image_size, old.image_size) == (SIZE_B, a.image_size)
            assert old.fingerprint == a.fingerprint != new.fingerprint
            np.testing.assert_array_equal(old.hash_images(files)[1], a.hash_images(files)[1])
    finally:
        main(["triton", "stop"])
    code = main(["triton", "start", "--onnx", str(onnx_b), "--keep-version", "7", "--grpc-port", str(free_port())])
    err = capsys.readouterr().err
    assert code == 2 and "has no version 7 to keep (versions: 1, 2)" in err, err
