"""The owner and user flows against real Triton and cloud-server processes."""

import json
import shutil

import grpc
import numpy as np
import pytest

from dlheir.cli import main
from dlheir.client.cloud import CloudClient, CloudError
from dlheir.client.crypto import (
    BlobAuthenticationError, CodeTransform, GrantError, OwnerKeys, decrypt_image, generate_user_keypair,
    make_grant, open_grant,
)
from dlheir.client.owner import upload_images
from dlheir.client.triton import TritonHasher
from dlheir.client.user import search_image
from dlheir.export import metrics
from dlheir.export.data import split_dataset
from dlheir.export.train import evaluate
from dlheir.ids import keyed_content_id, keyed_path_id


@pytest.fixture
def world(tmp_path, triton_server, cloud_server, digits_small):
    keys = OwnerKeys.generate().register("e2e")  # the collection's uid, mode and keys in the key file
    with CloudClient(cloud_server.address) as admin:
        owner_token, reader_token = admin.create_collection("e2e", 48, cloud_server.admin_token)
    alice = generate_user_keypair(tmp_path / "alice.pem")
    bob = generate_user_keypair(tmp_path / "bob.pem")
    grant = make_grant(keys, alice[1].read_bytes(), "e2e", reader_token, cloud_server.address, 48)
    database, queries, _ = split_dataset(digits_small)
    # uploads name items by their path keyed with the collection's id key (the server cannot compute it)
    id_key = keys.for_collection("e2e").id_key
    by_id = {keyed_path_id(id_key, r.relpath): r for r in database}
    assert len(by_id) == len(database) and not set(by_id) & {r.id for r in database}  # not the unkeyed ids
    hasher = TritonHasher(triton_server.grpc_url, batch_size=8)
    owner = CloudClient(cloud_server.address, owner_token)
    report = upload_images([(r.relpath, r.path) for r in database], keys, "e2e", owner, hasher, progress=False)
    assert report.uploaded == len(database) and not report.skipped
    yield dict(keys=keys, grant=grant, alice=alice, bob=bob, database=database, queries=queries, hasher=hasher,
               by_id=by_id, ids={r.relpath: i for i, r in by_id.items()},
               owner=owner, reader=CloudClient(cloud_server.address, reader_token), cloud=cloud_server)
    hasher.close()


def test_results_decrypt_to_the_original_bytes(world):
    grant = open_grant(world["grant"], world["alice"][0].read_bytes())
    by_id = world["by_id"]
    for query in world["queries"][:3]:
        hits, timings = search_image(query.path, grant, world["reader"], world["hasher"], k=10)
        assert len(hits) == 10 and [h.rank for h in hits] == list(range(1, 11))
        assert [h.distance for h in hits] == sorted(h.distance for h in hits)
        for h in hits:
            assert h.image == by_id[h.id].path.read_bytes() and h.name == by_id[h.id].path.name
        assert timings.total_s > 0


def test_served_precision_equals_offline(world, served_model, digits_small):
    """Served (Triton codes, transformed, ranked by the server) equals offline (the PyTorch
    checkpoint's codes), equal distances ordered by the ids the collection holds (keyed: the
    offline evaluation is given them, ``id_of``): the same metrics, and the same ranking id for id."""
    from dlheir.export.checkpoint import load_checkpoint
    from dlheir.export.train import compute_codes

    offline = evaluate(served_model["checkpoint"], str(digits_small), id_of=world["ids"].__getitem__)
    grant = open_grant(world["grant"], world["alice"][0].read_bytes())
    transform = CodeTransform(grant.transform_secret, 48)
    queries, database = world["queries"], world["database"]
    _, q_codes = world["hasher"].hash_images([r.path for r in queries])
    results = world["reader"].search("e2e", transform.apply(q_codes), k=len(database))
    labels = {i: r.label for i, r in world["by_id"].items()}
    ranked = np.array([[labels[int(i)] for i in ids] for ids, _ in results])
    served = metrics.summarize(metrics.relevance(ranked, np.array([r.label for r in queries])))
    for key in ("P@20", "P@40", "P@60", "P@80", "P@100", "mAP"):
        assert served[key] == pytest.approx(offline[key], abs=1e-12), key
    # the server's ranking is the offline one, id for id and distance for distance
    model, meta = load_checkpoint(served_model["checkpoint"])
    _, db_offline = compute_codes(model, database, meta["image_size"])
    _, q_offline = compute_codes(model, queries, meta["image_size"])
    keyed = np.array([world["ids"][r.relpath] for r in database])
    order, dist = metrics.rankings(q_offline, db_offline, keyed)
    for (got_ids, got_d), want, want_d in zip(results, keyed[order], dist):
        np.testing.assert_array_equal(got_ids, want)
        np.testing.assert_array_equal(got_d, want_d)


def test_no_grant_no_images(world):
    with pytest.raises(GrantError):
        open_grant(world["grant"], world["bob"][0].read_bytes())  # another user's grant
    item = world["database"][0]
    item_id = world["ids"][item.relpath]
    (_, blob, _), = world["reader"].fetch("e2e", [item_id])
    binding = world["keys"].for_collection("e2e").binding
    stranger = OwnerKeys.generate().register("e2e").for_collection("e2e")  # another owner's "e2e"
    with pytest.raises(BlobAuthenticationError):
        decrypt_image(stranger.image_key, blob, binding, item_id)  # no key from a grant
    with pytest.raises(BlobAuthenticationError):
        decrypt_image(stranger.image_key, blob, stranger.binding, item_id)
    grant = open_grant(world["grant"], world["alice"][0].read_bytes())
    with pytest.raises(BlobAuthenticationError):  # the blob is bound to the name and the uid, not the name alone
        decrypt_image(grant.image_keys, blob, "e2e", item_id)
    assert decrypt_image(grant.image_keys, blob, grant.binding, item_id).data == item.path.read_bytes()


def test_tampered_or_swapped_blob_is_detected(world):
    a, b = world["database"][0], world["database"][1]
    a_id, b_id = world["ids"][a.relpath], world["ids"][b.relpath]
    (_, blob_a, _), = world["owner"].fetch("e2e", [a_id])
    grant = open_grant(world["grant"], world["alice"][0].read_bytes())
    # a server that swaps blobs between ids
    code_b = world["reader"].search("e2e", np.zeros((1, 6), np.uint8), k=1)  # any call works; keep b's code
    list(world["owner"].upload("e2e", [(b_id, bytes(6), blob_a, {})], replace=True))
    (_, swapped, _), = world["reader"].fetch("e2e", [b_id])
    with pytest.raises(BlobAuthenticationError):
        decrypt_image(grant.image_key, swapped, grant.binding, b_id)
    flipped = bytearray(blob_a)
    flipped[-1] ^= 0x80
    with pytest.raises(BlobAuthenticationError):
        decrypt_image(grant.image_key, bytes(flipped), grant.binding, a_id)
    assert decrypt_image(grant.image_key, blob_a, grant.binding, a_id).data == a.path.read_bytes()  # untouched: opens
    assert code_b


def test_reader_token_cannot_upload_or_delete(world):
    with pytest.raises(CloudError) as info:
        list(world["reader"].upload("e2e", [(1, bytes(6), b"x", {})]))
    assert info.value.code == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(CloudError) as info:
        world["reader"].delete("e2e", [world["ids"][world["database"][0].relpath]])
    assert info.value.code == grpc.StatusCode.PERMISSION_DENIED


def test_cli_flow_resumes_and_skips_unreadable(tmp_path, triton_server, cloud_server, digits_small, capsys, monkeypatch):
    """The README's flow with no path flags: keys, tokens and the grant go to $DLHEIR_HOME."""
    monkeypatch.chdir(tmp_path)
    home = tmp_path / "home"
    monkeypatch.setenv("DLHEIR_HOME", str(home))
    images = shutil.copytree(digits_small, tmp_path / "images")
    (images / "0" / "zz_broken.png").write_bytes(b"garbage")
    addr, tri = cloud_server.address, triton_server.grpc_url
    assert main(["owner", "init"]) == 0
    assert main(["owner", "create-collection", "cli", "--server", addr, "--triton", tri,
                 "--admin-token-file", str(cloud_server.data_dir / "admin.token")]) == 0
    assert main(["owner", "upload", str(images), "--collection", "cli", "--triton", tri]) == 1  # a file was skipped
    out = capsys.readouterr().out
    n = len(list(images.rglob("*.png"))) - 1
    assert f"uploaded {n} images" in out and "1 skipped" in out and "skipped 0/zz_broken.png" in out
    assert "image #" not in out  # the file is named, not its place in a batch
    assert main(["owner", "upload", str(images), "--collection", "cli", "--triton", tri]) == 1
    assert "uploaded 0 images" in capsys.readouterr().out  # a re-run uploads only what is missing
    (images / "0" / "zz_broken.png").unlink()
    assert main(["owner", "upload", str(images), "--collection", "cli", "--triton", "127.0.0.1:1"]) == 0
    assert f"{n} already present" in capsys.readouterr().out  # all stored: checked without Triton
    assert main(["user", "keygen"]) == 0
    assert main(["owner", "grant", "--user-pub", str(home / "user.pub.pem"), "--collection", "cli"]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in home.iterdir()) == ["cli.tokens.json", "owner.key", "readers", "user-grants",
                                                      "user.pem", "user.pub.pem"]  # readers/: kept public keys
    assert home.stat().st_mode & 0o777 == 0o700
    query = next(images.glob("1/*.png"))
    assert main(["user", "search", str(query), "-k", "5", "--out", "found", "--triton", tri, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["results"]) == 5 and result["results"][0]["distance"] == 0
    originals = {p.name: p.read_bytes() for p in images.rglob("*.png")}
    for hit in result["results"]:
        assert (tmp_path / hit["file"]).read_bytes() == originals[hit["name"]]
        assert (tmp_path / hit["file"]).stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "found").stat().st_mode & 0o777 == 0o700
    # the first grant opened pinned its owner's signing key (trust on first use), in a 0600 file
    assert (home / "trusted-owners.json").stat().st_mode & 0o777 == 0o600
    # the query itself is in the collection, at distance 0, under its content id keyed with the collection's
    # id key (ties at 0 are ordered by id, so ask for every item)
    from dlheir import User

    id_key = OwnerKeys.load(home / "owner.key").for_collection("cli").id_key
    everything = User(triton=tri).search(query, k=100, write=False)
    assert keyed_content_id(id_key, query.read_bytes()) in [h.id for h in everything.results if h.distance == 0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cloud", "found", "home", "images"]  # no key in the cwd
