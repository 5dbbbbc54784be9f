"""The batch-first, in-memory Python API (issue 21 item 4), against a real Triton and a real cloud
server: every image kind a search or an upload takes, one result per query, nothing written
unless asked, connections kept open and closed, and codes in-process (ONNX Runtime) equal to
Triton's."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import dlheir
from dlheir import config
from dlheir.client.api import SearchResult, hash_images
from dlheir.errors import UserError

ENV_VARS = [*config.ENV.values(), config.CONFIG_ENV]


@pytest.fixture(scope="module")
def world(tmp_path_factory, triton_server, digits_small):
    """A cloud server, a key folder naming both servers, collection 'py' holding the digits, a user's grant."""
    from dlheir.server.testing import run_cloud_server

    root = tmp_path_factory.mktemp("python_api")
    with pytest.MonkeyPatch.context() as mp, run_cloud_server(root / "cloud") as cloud:
        for var in ENV_VARS:
            mp.delenv(var, raising=False)
        home = root / "home"
        home.mkdir(mode=0o700)
        mp.setenv("DLHEIR_HOME", str(home))
        (home / "config.toml").write_text(
            f'server = "{cloud.address}"\ntriton = "{triton_server.grpc_url}"\n'
            f'admin_token_file = "{cloud.data_dir / "admin.token"}"\n')
        images = shutil.copytree(digits_small, root / "images")
        with dlheir.Owner() as owner:
            owner.init_keys()
            owner.create_collection("py")
            assert owner.upload(images, "py", progress=False).uploaded == len(list(images.rglob("*.png")))
            dlheir.User.keygen()
            owner.grant(home / "user.pub.pem", "py", user="me")
        yield {"home": home, "images": images, "cloud": cloud, "triton": triton_server}


@pytest.fixture
def cwd(tmp_path, monkeypatch):
    """An empty working folder: what a call writes by default shows up here."""
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


def queries(world, n: int = 3):
    return [sorted(world["images"].glob(f"{c}/*.png"))[0] for c in range(n)]


def own_hit(result, item_id: int):
    """The hit of ``item_id`` among the distance-0 hits (ties at 0 are ordered by id)."""
    return next(h for h in result.results if h.id == item_id and h.distance == 0)


def test_each_image_kind_finds_itself_at_distance_0(world, cwd):
    q = queries(world, 1)[0]
    [item] = dlheir.Owner().item_ids([q], collection="py")
    pil = Image.open(q)
    kinds = {"str path": str(q), "Path": q, "bytes": q.read_bytes(), "bytearray": bytearray(q.read_bytes()),
             "RGB array": np.asarray(pil.convert("RGB")), "grey HxW array": np.asarray(pil.convert("L")),
             "PIL image": pil, "PIL grey image": pil.convert("L")}
    with dlheir.User() as user:
        for kind, image in kinds.items():
            result = user.search(image, k=36)
            assert isinstance(result, SearchResult), kind
            hit = own_hit(result, item)
            assert hit.image == q.read_bytes() and hit.name == q.name and hit.file is None, kind
            assert np.array_equal(np.asarray(hit.to_pil()), np.asarray(pil)), kind
    assert list(cwd.iterdir()) == []


def test_a_list_returns_one_result_per_query_in_order(world, cwd):
    qs = queries(world, 3)
    ids = dlheir.Owner().item_ids(qs, collection="py")
    mixed = [qs[0], qs[1].read_bytes(), np.asarray(Image.open(qs[2]).convert("RGB"))]
    with dlheir.User() as user:
        results = user.search(mixed, k=36)
        assert isinstance(results, list) and len(results) == 3
        for result, item, q in zip(results, ids, qs):
            assert own_hit(result, item).image == q.read_bytes()
        assert results[0].query == str(qs[0]) and "bytes" in results[1].query and "array" in results[2].query
        # the same queries one by one give the same rankings; a list of one is still a list
        for result, q in zip(results, mixed):
            alone = user.search(q, k=36)
            assert [(h.id, h.distance) for h in alone.results] == [(h.id, h.distance) for h in result.results]
        one = user.search([qs[0]], k=2)
        assert isinstance(one, list) and len(one) == 1 and len(one[0].results) == 2
        # a 4-D array is a batch of images
        stack = np.stack([np.asarray(Image.open(q).convert("RGB")) for q in qs])
        assert [r.results[0].distance for r in user.search(stack, k=1)] == [0, 0, 0]
    assert list(cwd.iterdir()) == []


def test_nothing_is_written_unless_out_is_given(world, cwd):
    qs = queries(world, 2)
    user = dlheir.User()
    user.search(qs[0], k=3)
    user.search(qs, k=3)
    assert list(cwd.iterdir()) == []  # no ./results
    one = user.search(qs[0], k=3, out="found")
    assert one.out_dir == Path("found")
    assert sorted(p.name for p in (cwd / "found").iterdir()) == sorted(h.file.name for h in one.results)
    assert all(h.file.read_bytes() == h.image for h in one.results)
    many = user.search(qs, k=3, out="batch")
    assert [r.out_dir.name for r in many] == [f"000-{qs[0].stem}", f"001-{qs[1].stem}"]
    assert all(h.file.read_bytes() == h.image for r in many for h in r.results)
    user.close()


def test_connections_stay_open_between_calls_and_close(world, cwd):
    qs = queries(world, 2)
    with dlheir.User() as user:
        user.search(qs[0], k=1)
        first = list(user.connections)
        channel = first[0].channel
        user.search(qs, k=1)
        user.search(qs[1].read_bytes(), k=1)
        assert user.connections == first and len(first) == 2  # one cloud channel, one Triton client
        assert user.connections[0].channel is channel
    assert user.connections == []
    with pytest.raises(ValueError, match="closed channel"):  # the channel itself is closed
        first[0].stats("py")
    assert user.search(qs[0], k=1).results[0].distance == 0  # a later call opens new ones
    assert user.connections and user.connections[0] is not first[0]
    user.close()
    assert user.connections == []

    owner = dlheir.Owner()
    owner.describe("py")
    owner.describe("py")
    owner.grants("py")
    assert len(owner.connections) == 1
    kept = owner.connections[0]
    owner.close()
    assert owner.connections == []
    with pytest.raises(ValueError, match="closed channel"):
        kept.stats("py")


def test_in_memory_upload_with_ids_then_search_finds_them(world, cwd):
    qs = queries(world, 3)
    array = np.asarray(Image.open(qs[0]).convert("RGB"))
    pil = Image.open(qs[1]).convert("L")
    with dlheir.Owner() as owner:
        owner.create_collection("mem")
        up = owner.upload({101: array, 102: pil, 103: qs[2].read_bytes()}, "mem", progress=False)
        assert (up.files, up.uploaded, up.skipped, up.duplicates) == (3, 3, [], [])
        more = owner.upload([(104, qs[2]), (105, qs[2].read_bytes())], "mem", progress=False)
        assert more.uploaded == 2
        again = owner.upload({101: array}, "mem", progress=False)
        assert again.uploaded == 0 and again.already_present == ["101.png"]
        # without ids: content ids of the encoded image, so the same arrays again are found as stored
        plain = owner.upload([array, np.asarray(pil)], "mem", progress=False)
        assert plain.uploaded == 2 and owner.describe("mem").items == 7
        assert len(owner.upload([array, np.asarray(pil)], "mem", progress=False).already_present) == 2
        with pytest.raises(UserError, match="in-memory image has no path"):
            owner.upload([array], "mem", id_from="path", progress=False)
        owner.grant(world["home"] / "user.pub.pem", "mem", user="me", out=cwd / "mem.grant")
    with dlheir.User(grant=cwd / "mem.grant") as user:
        a, p, b = user.search([array, pil, qs[2]], k=7)
    assert own_hit(a, 101).name == "101.png" and np.array_equal(np.asarray(own_hit(a, 101).to_pil()), array)
    assert np.array_equal(np.asarray(own_hit(p, 102).to_pil()), np.asarray(pil.convert("RGB")))  # stored as RGB
    assert own_hit(b, 103).image == own_hit(b, 104).image == own_hit(b, 105).image == qs[2].read_bytes()
    assert own_hit(b, 104).name == qs[2].name and own_hit(b, 103).name == "103.png"
    assert sorted(p.name for p in cwd.iterdir()) == ["mem.grant"]


def test_unsupported_types_are_named_with_what_is_accepted(world, cwd):
    q = queries(world, 1)[0]
    user = dlheir.User()
    for bad, named in ((42, "images is int 42"), ({"a": 1}, "images is dict"), ([q, 3.5], r"images\[1\] is float 3.5"),
                       (np.zeros((2, 2, 2, 2, 2), np.uint8), "numpy array of uint8")):
        with pytest.raises(TypeError, match=named) as info:
            user.search(bad, k=1)
        assert isinstance(info.value, UserError) and "PIL image" in str(info.value) and "numpy" in str(info.value)
    with pytest.raises(UserError, match="uint8"):  # a float array: what the preprocessing takes, named
        user.search(np.zeros((8, 8, 3), np.float32), k=1)
    with pytest.raises(UserError, match="query image not found"):
        user.search(cwd / "missing.png", k=1)
    owner = dlheir.Owner()
    with pytest.raises(TypeError, match="an item id is an int"):
        owner.upload({"a": q}, "py")
    with pytest.raises(TypeError, match="image of id 7 is object"):
        owner.upload({7: object()}, "py")
    with pytest.raises(TypeError, match="expected a path"):
        hash_images(None, onnx="unused.onnx")
    assert list(cwd.iterdir()) == []


def test_codes_in_process_equal_triton_codes(world, served_model, cwd):
    from dlheir.client.onnx_hasher import OnnxHasher
    from dlheir.client.triton import TritonHasher

    qs = queries(world, 3)
    onnx, url = served_model["onnx"], world["triton"].grpc_url
    pil = Image.open(qs[1])
    images = [qs[0], str(qs[1]), qs[2].read_bytes(), np.asarray(pil.convert("RGB")), np.asarray(pil.convert("L")),
              pil, Image.open(qs[2]).rotate(90)]
    local = hash_images(images, onnx=onnx)
    served = hash_images(images, triton=url)
    assert local.dtype == np.uint8 and local.shape == (len(images), 6)  # 48 bits
    assert np.array_equal(local, served)
    assert len({c.tobytes() for c in local}) > 2  # distinct images, distinct codes: not a constant
    one = hash_images(qs[0], onnx=onnx)
    assert one.shape == (6,) and np.array_equal(one, served[0])
    assert np.array_equal(hash_images(qs[0]), one)  # the configured Triton
    with OnnxHasher(onnx) as o, TritonHasher(url) as t:
        assert (o.fingerprint, o.bits, o.image_size) == (t.fingerprint, t.bits, t.image_size)
        assert np.allclose(o.hash_images(qs)[0], t.hash_images(qs)[0], atol=1e-5)

    # no Triton at all: a user hashes in-process and the server accepts the same model's codes
    from dlheir.procs import free_port

    with dlheir.User(triton=f"127.0.0.1:{free_port()}", onnx=onnx) as user:
        [item] = dlheir.Owner().item_ids([qs[0]], collection="py")
        assert own_hit(user.search(np.asarray(Image.open(qs[0])), k=36), item).image == qs[0].read_bytes()
        assert np.array_equal(user.codes([qs[0]]), served[:1])
    assert list(cwd.iterdir()) == []


def test_private_mode_batch_search_keeps_its_synced_index(world, cwd):
    qs = queries(world, 3)
    with dlheir.Owner() as owner:
        owner.create_collection("sealed", private=True)
        owner.upload({1: qs[0], 2: qs[1].read_bytes()}, "sealed", progress=False)
        owner.grant(world["home"] / "user.pub.pem", "sealed", user="me", out=cwd / "sealed.grant")
        with dlheir.User(grant=cwd / "sealed.grant") as user:
            first = user.search([qs[0], qs[1]], k=2)
            assert [r.ranking for r in first] == ["local (private mode)"] * 2
            assert [r.results[0].id for r in first] == [1, 2] and first[0].results[0].image == qs[0].read_bytes()
            assert first[0].sync["pages_fetched"] >= 1 and first[0].sync["codes"] == 2
            index = user._local
            owner.upload({3: qs[2]}, "sealed", progress=False)  # a page added after the first search
            again = user.search(qs[2], k=1)
            assert user._local is index and again.sync["codes"] == 3 and again.sync["pages_fetched"] >= 1
            assert again.results[0].id == 3 and again.results[0].distance == 0
    assert sorted(p.name for p in cwd.iterdir()) == ["sealed.grant"]
