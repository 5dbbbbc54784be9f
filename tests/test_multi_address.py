"""A client given several cloud-server addresses ("fronts": servers on one PostgreSQL store):
calls spread round-robin over them; a front killed with kill -9 in the middle of searches, of a
Fetch stream or of an Upload stream costs no call, no item and no duplicate; every address down
is one line naming each; malformed address lists are one-line errors. Real servers, no mocks."""

from __future__ import annotations

import json
import logging
import os
import shutil
import urllib.request

import numpy as np
import pytest

from dlheir import config as _config
from dlheir.cli import main
from dlheir.client.cloud import START_HINT, CloudClient, CloudError, lost_reason, never_sent
from dlheir.errors import UserError
from dlheir.netaddr import parse_addresses
from dlheir.procs import free_port
from dlheir.server.app import READY_FILE
from dlheir.server.testing import CloudServerProcess
from engines import postgres_engine  # noqa: F401 (fixture)

BITS = 48


@pytest.fixture
def store(postgres_engine):  # noqa: F811
    """A fresh PostgreSQL database for one test (the fronts' shared store)."""
    return postgres_engine.new_database()[1]


@pytest.fixture
def fronts(tmp_path, store):
    """start(name): a front on the shared store, with the first front's admin token; all killed at the end."""
    started: list[CloudServerProcess] = []

    def start(name: str, metrics: bool = False) -> CloudServerProcess:
        data_dir = tmp_path / name
        if started:  # the same admin token on every front (the child's $DLHEIR_ADMIN_TOKEN is removed)
            data_dir.mkdir(mode=0o700)
            shutil.copyfile(started[0].data_dir / "admin.token", data_dir / "admin.token")
            os.chmod(data_dir / "admin.token", 0o600)
        server = CloudServerProcess(data_dir, store_url=store, extra_args=["--metrics-port", "0"] if metrics else [])
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.kill()


def searches_served(server: CloudServerProcess) -> float:
    """The front's count of Search calls answered OK (its Prometheus metrics)."""
    port = json.loads((server.data_dir / READY_FILE).read_text())["metrics_port"]
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("dlheir_requests_total{") and 'method="Search"' in line and 'code="OK"' in line)


def collection_on(server: CloudServerProcess) -> str:
    with CloudClient(server.address) as admin:
        owner_token, _ = admin.create_collection("c", BITS, server.admin_token)
    return owner_token


def upload_codes(server: CloudServerProcess, token: str, n: int, blob_bytes: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 256, (n, BITS // 8), dtype=np.uint8)
    blobs = [rng.bytes(blob_bytes) for _ in range(n)]
    with CloudClient(server.address, token) as owner:
        acks = list(owner.upload("c", [(i, codes[i].tobytes(), blobs[i], {}) for i in range(n)], batch_size=500))
    assert sum(len(a.ids) for a in acks) == n
    return codes, blobs


def failovers(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "trying the next address" in r.getMessage()]


def test_searches_spread_over_fronts_and_survive_a_front_killed(fronts, caplog):
    a = fronts("a", metrics=True)
    token = collection_on(a)
    codes, _ = upload_codes(a, token, 1000)
    b = fronts("b", metrics=True)  # started after the upload: its index holds every item
    queries = np.random.default_rng(1).integers(0, 256, (40, BITS // 8), dtype=np.uint8)
    with CloudClient(f"{a.address},{b.address}", token) as client:
        before = [client.search("c", q, k=10)[0] for q in queries]
        served = searches_served(a), searches_served(b)
        assert served == (20, 20)  # round-robin: half each
        caplog.set_level(logging.WARNING, logger="dlheir.client.cloud")
        after = []
        for n, q in enumerate(queries):
            if n == 10:
                a.kill()
            after.append(client.search("c", q, k=10)[0])  # none may fail
    assert failovers(caplog) and all(a.address in m for m in failovers(caplog))
    for (ids0, d0), (ids1, d1) in zip(before, after):
        assert ids0.tolist() == ids1.tolist() and d0.tolist() == d1.tolist()
    assert len(before[0][0]) == 10


def test_fetch_resumes_on_another_front_every_item_once_in_order(fronts, caplog):
    a = fronts("a")
    token = collection_on(a)
    _, blobs = upload_codes(a, token, 300, blob_bytes=50_000)
    b = fronts("b")
    asked = [int(i) for i in np.random.default_rng(2).permutation(300)] + [10_000, 10_001]  # two never stored
    caplog.set_level(logging.WARNING, logger="dlheir.client.cloud")
    got = []
    with CloudClient([a.address, b.address], token) as client:  # its first call goes to a
        for item_id, blob, _ in client.fetch("c", asked):
            got.append(item_id)
            assert blob == blobs[item_id]
            if len(got) == 50:
                a.kill()
    assert got == asked[:300]  # each stored item exactly once, in the order asked
    assert len(failovers(caplog)) == 1 and a.address in failovers(caplog)[0]  # the stream did break


def test_upload_resumes_on_another_front_every_id_acknowledged_once(fronts, caplog):
    a = fronts("a")
    token = collection_on(a)
    b = fronts("b")  # started once the collection exists
    rng = np.random.default_rng(3)
    n = 3000
    items = [(int(i), rng.bytes(BITS // 8), rng.bytes(200), {}) for i in rng.choice(2**62, n, replace=False)]
    caplog.set_level(logging.INFO, logger="dlheir.client.cloud")
    acks, pulled = [], []

    def source():
        for item in items:
            pulled.append(item[0])
            yield item

    with CloudClient(f"{a.address},{b.address}", token) as client:  # its first call goes to a
        for ack in client.upload("c", source(), batch_size=100):
            acks.append(ack)
            # bounded memory: the items read ahead of the acks fit in the window of un-acked batches
            assert len(pulled) - sum(len(x.ids) for x in acks) <= (client.UPLOAD_WINDOW + 1) * 100
            if len(acks) == 5:
                a.kill()
    acked = [i for ack in acks for i in ack.ids]
    assert sorted(acked) == sorted(i for i, *_ in items)  # every id acknowledged, none twice
    assert [ack.batch for ack in acks] == list(range(len(acks)))
    assert any("resumed on " + b.address in r.getMessage() for r in caplog.records)  # the stream did break
    with CloudClient(b.address, token) as on_b:
        assert on_b.contains("c", [i for i, *_ in items]) == {i for i, *_ in items}
        assert on_b.stats("c").items == n
        stored = {i: blob for i, blob, _ in on_b.fetch("c", [i for i, *_ in items[:50]])}
    assert stored == {i: blob for i, _, blob, _ in items[:50]}


def test_a_call_that_never_reached_a_front_goes_to_the_next(fronts):
    a = fronts("a")
    dead = f"127.0.0.1:{free_port()}"
    with CloudClient(f"{dead},{a.address}") as admin:  # CreateCollection is not idempotent: refused is safe
        owner_token, _ = admin.create_collection("c", BITS, a.admin_token)
        assert [c.name for c in admin.list_collections(a.admin_token)] == ["c"]
    with CloudClient(a.address, owner_token) as owner:
        assert owner.stats("c").bits == BITS


def test_every_address_down_is_one_line_naming_each():
    first, second = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    with CloudClient(f"{first},{second}") as client, pytest.raises(CloudError) as info:
        client.list_collections("some-token")
    assert str(info.value) == (f"cannot reach any dlheir cloud server ({first} connection refused, {second} "
                               f"connection refused): {START_HINT}")
    with CloudClient(first) as client, pytest.raises(CloudError) as info:  # one address: as before
        client.list_collections("some-token")
    assert str(info.value) == f"cannot reach the dlheir cloud server at {first} (connection refused): {START_HINT}"
    with CloudClient([first, second], "t") as client, pytest.raises(CloudError) as info:
        list(client.fetch("c", [1, 2]))
    assert str(info.value).startswith(f"cannot reach any dlheir cloud server ({first} connection refused, {second}")
    with CloudClient([first, second], "t") as client, pytest.raises(CloudError) as info:
        list(client.upload("c", [(1, bytes(6), b"x", {})]))
    assert str(info.value).startswith(f"cannot reach any dlheir cloud server ({first} connection refused, {second}")


def test_cli_with_every_front_down_prints_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DLHEIR_HOME", str(tmp_path / "home"))
    key = tmp_path / "owner.key"
    assert main(["owner", "init", "--out", str(key)]) == 0
    capsys.readouterr()
    token_file = tmp_path / "admin.token"
    token_file.write_text("admin-token\n")
    os.chmod(token_file, 0o600)
    servers = f"127.0.0.1:{free_port()},127.0.0.1:{free_port()}"
    code = main(["owner", "create-collection", "x", "--bits", "48", "--server", servers, "--admin-token-file",
                 str(token_file), "--key", str(key), "--out", str(tmp_path / "x.tokens.json")])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("dlheir: error: cannot reach any dlheir cloud server (" + servers.replace(",", " connection "
                                                                                                   "refused, "))


@pytest.mark.parametrize("servers, why", [
    ("127.0.0.1:1,,127.0.0.1:2", "element 2 is empty"),
    ("127.0.0.1:1,", "element 2 is empty"),
    (",", "element 1 is empty"),
    ("", "no cloud server address given"),
    ("127.0.0.1:1,127.0.0.1:1", "127.0.0.1:1 is given twice"),
    ("127.0.0.1:1,localhost", "'localhost' is not HOST:PORT"),
    ("127.0.0.1:1,localhost:http", "'localhost:http' is not HOST:PORT"),
    ("127.0.0.1:1,::1", "'::1' is not HOST:PORT"),
])
def test_malformed_address_lists_are_one_line_errors(servers, why, tmp_path):
    with pytest.raises(UserError) as info:
        CloudClient(servers)
    assert why in str(info.value) and "\n" not in str(info.value)
    if servers:
        with pytest.raises(UserError) as info:  # the same check on the setting (env, config file)
            (tmp_path / "config.toml").write_text("")
            _config.load(env={"DLHEIR_SERVER": servers, "DLHEIR_CONFIG": str(tmp_path / "config.toml")})
        assert str(info.value).startswith("$DLHEIR_SERVER: ") and why in str(info.value)


def test_well_formed_address_lists():
    assert parse_addresses(" 127.0.0.1:1 , [::1]:2,localhost:3 ") == ["127.0.0.1:1", "[::1]:2", "localhost:3"]
    assert parse_addresses(["127.0.0.1:1", "127.0.0.1:2"]) == ["127.0.0.1:1", "127.0.0.1:2"]
    assert parse_addresses("ipv4:127.0.0.1:1,127.0.0.1:2") == ["ipv4:127.0.0.1:1,127.0.0.1:2"]  # gRPC's own list
    assert parse_addresses("localhost") == ["localhost"]  # one address: as before (gRPC's default port)
    with pytest.raises(UserError, match="192.0.2.1:1 without TLS"):  # each address is checked for cleartext
        CloudClient("127.0.0.1:1,192.0.2.1:1")


def test_what_is_retried_elsewhere():
    """gRPC's words for a connection never made (any call may go on elsewhere) and for one that
    broke during the call (only idempotent ones), as observed against a server killed with kill -9."""
    refused = ("failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:35297: "
               "Failed to connect to remote host: Connection refused")
    broken = "Stream removed (Socket closed)"
    assert lost_reason(refused) == "connection refused" and never_sent(refused)
    assert lost_reason(broken) == "connection failed" and not never_sent(broken)
    assert lost_reason("Connection reset by peer") and not never_sent("Connection reset by peer")
    for store_down in ("PostgreSQL at 127.0.0.1:5432 is unreachable: connection refused",
                       "object store s3://b is unreachable: connection refused"):
        assert lost_reason(store_down) is None  # the server answered: its store is down for every front
