"""An interrupted `dlheir owner rotate` is finished by the next one, not lost (issue 20, item 4).

A real cloud server subprocess and the real `dlheir owner rotate` CLI as a subprocess, killed with
SIGKILL at a chosen point through the test hook ``$DLHEIR_FAULT_POINT`` (client/access.py):

* ``rotate-after-rekey``: the server committed the re-key (and revoked every reader token), no
  grant was written: the next `owner rotate` re-grants every user who had access, to the same
  key version;
* ``rotate-before-rekey``: the record and the key file were written, RekeyCodes was not sent:
  the next `owner rotate --resume` re-keys to the version already in the key file;
* ``rotate-after-grant``: one grant was written: only the others are re-granted.

The owner's world (server, key file, tokens, 40 uploaded items, stand-in hasher: no Triton) and
the helpers are tests/test_access.py's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import grpc

from dlheir.client.access import FAULT_ENV, PendingRotation
from dlheir.client.cloud import CloudClient, CloudError
from dlheir.client.crypto import CodeTransform, OwnerKeys, decrypt_image, open_grant
from dlheir.server.testing import CloudServerProcess

import test_access
from test_access import (
    BITS, COLLECTION, assert_same, brute_force, cli, collection_keys, grant_for, item_bytes, owner_client, queries, raw_db,
    reader, served, status_of,
)

people, world = test_access.people, test_access.world  # test_access.py's fixtures: the owner's world


def dlheir(*argv, fault: str | None = None) -> subprocess.CompletedProcess:
    """The real CLI in a child process (its $DLHEIR_HOME is the world's), killed at ``fault`` if given."""
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    if fault:
        env[FAULT_ENV] = fault
    return subprocess.run([sys.executable, "-m", "dlheir", *map(str, argv)], env=env, capture_output=True, text=True,
                          timeout=120)


def record_path(w):
    return w["home"] / "rotations" / f"{COLLECTION}.json"


def grant_path(w, user: str):
    return w["home"] / "grants" / COLLECTION / f"{user}.grant"


def key_ids(w) -> list[int]:
    return OwnerKeys.load(w["home"] / "owner.key").key_ids


def server_key(w) -> int:
    with owner_client(w) as owner:
        return owner.stats(COLLECTION).key_id or 1


def opened(w, user: str):
    return open_grant(grant_path(w, user).read_bytes(), w["people"][user][0].read_bytes())


def assert_refused(w, *grants) -> None:
    for g in grants:
        with reader(w, g) as c:
            assert status_of(lambda: c.stats(COLLECTION)) == grpc.StatusCode.UNAUTHENTICATED


def assert_works(w, g, key_id: int) -> None:
    """``g`` (an opened grant) is at ``key_id``, searches exactly, fetches and decrypts its hits."""
    assert g.key_id == key_id and sorted(g.image_keys) == list(range(1, key_id + 1))
    assert g.image_keys == collection_keys(w).at(key_id).image_keys()  # the key file's keys of that version
    q = queries(w)
    expected = brute_force(raw_db(w, w["files"][:40]), q, 10)
    by_id = item_bytes(w)
    with reader(w, g) as c:
        assert_same(served(c, CodeTransform(g.transform_secret, BITS), q, 10), expected)
        blobs = list(c.fetch(COLLECTION, expected[0][0][:3]))
    assert len(blobs) == 3
    for i, blob, _ in blobs:
        assert decrypt_image(g.image_keys, blob, g.binding, i).data == by_id[i]


def killed(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == -signal.SIGKILL, (result.returncode, result.stdout, result.stderr)


def test_rotation_killed_after_the_server_rekeyed_is_finished_by_the_next_rotate(world, capsys):
    w = world
    alice, _ = grant_for(w, capsys, "alice")
    bob, _ = grant_for(w, capsys, "bob")
    carol, _ = grant_for(w, capsys, "carol")
    assert cli(capsys, "owner", "revoke", "carol")[0] == 0  # revoked before: not re-granted, now or on resume

    killed(dlheir("owner", "rotate", fault="rotate-after-rekey"))
    # the server committed: codes under key version 2, every old token refused, and no grant written
    assert server_key(w) == 2 and key_ids(w) == [1, 2]
    assert_refused(w, alice, bob, carol)
    assert not grant_path(w, "alice").exists() and not grant_path(w, "bob").exists()
    record = record_path(w)
    assert (record.stat().st_mode & 0o777) == 0o600
    doc = json.loads(record.read_text())
    assert (doc["collection"], doc["from_key"], doc["to_key"]) == (COLLECTION, 1, 2)
    assert (doc["users"], doc["done"], doc["dropped"]) == (["alice", "bob"], {}, [])
    code, out, _ = cli(capsys, "owner", "grants")  # the listing says a rotation is pending
    assert code == 0 and "interrupted" in out and "--resume" in out

    result = dlheir("owner", "rotate")  # a plain rotate: finishes the pending one, starts none
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "resumed the interrupted rotation of collection 'photos' from key version 1 to 2" in out, out
    assert "re-granted 'alice', 'bob'" in out and "had re-keyed" in out
    assert f"new grant for 'alice': {grant_path(w, 'alice')}" in out and f"new grant for 'bob': {grant_path(w, 'bob')}" in out
    assert "send each of these users their new grant file" in out and "'alice', 'bob'; each installs it with: dlheir user add-grant FILE" in out
    assert key_ids(w) == [1, 2] and server_key(w) == 2  # no third version, no second re-key
    assert not record.exists()
    for user in ("alice", "bob"):
        assert (grant_path(w, user).stat().st_mode & 0o777) == 0o600
        g = opened(w, user)
        assert g.user == user
        assert_works(w, g, 2)
    assert not grant_path(w, "carol").exists()
    assert_refused(w, alice, bob, carol)
    listing = json.loads(cli(capsys, "owner", "grants", "--json")[1])
    assert listing["key_id"] == 2
    assert [(r["user"], r["revoked"] is None) for r in listing["readers"]] == [("alice", True), ("bob", True),
                                                                                ("carol", False)]

    # finished: the next rotate is a new one again
    code, out, err = cli(capsys, "owner", "rotate")
    assert code == 0 and "key version 2 -> 3" in out and "resumed" not in out, err
    assert key_ids(w) == [1, 2, 3] and not record.exists()
    assert_works(w, opened(w, "alice"), 3)


def test_rotation_killed_before_the_rekey_resumes_to_the_same_key_version(world, capsys):
    w = world
    alice, _ = grant_for(w, capsys, "alice")
    bob, _ = grant_for(w, capsys, "bob")

    killed(dlheir("owner", "rotate", "--drop", "bob", fault="rotate-before-rekey"))
    # the key file and the record were written; the server did not move, so the old grants still work
    assert key_ids(w) == [1, 2] and server_key(w) == 1
    doc = json.loads(record_path(w).read_text())
    assert (doc["from_key"], doc["to_key"], doc["users"], doc["dropped"]) == (1, 2, ["alice"], ["bob"])
    assert_works(w, alice, 1)
    assert_works(w, bob, 1)

    result = dlheir("owner", "rotate", "--resume")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "resumed the interrupted rotation of collection 'photos' from key version 1 to 2" in out, out
    assert "re-granted 'alice'" in out and "40 stored codes re-keyed now" in out and "(--drop): 'bob'" in out
    assert key_ids(w) == [1, 2] and server_key(w) == 2  # re-keyed to the version already in the key file
    assert not record_path(w).exists() and not grant_path(w, "bob").exists()
    assert_works(w, opened(w, "alice"), 2)
    assert_refused(w, alice, bob)


def test_rotation_killed_between_grants_re_grants_only_the_users_not_done(world, capsys):
    w = world
    grant_for(w, capsys, "alice")
    grant_for(w, capsys, "bob")

    killed(dlheir("owner", "rotate", fault="rotate-after-grant"))
    doc = json.loads(record_path(w).read_text())
    first, second = doc["users"]
    assert doc["done"] == {first: str(grant_path(w, first))} and not grant_path(w, second).exists()
    done_grant = opened(w, first)
    assert_works(w, done_grant, 2)

    result = dlheir("owner", "rotate")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"re-granted {second!r};" in out and f"new grant for {first!r}: {grant_path(w, first)} (written before" in out
    assert f"their old grant no longer works): {', '.join(map(repr, sorted((first, second))))}" in out
    assert key_ids(w) == [1, 2] and not record_path(w).exists()
    assert_works(w, done_grant, 2)  # the grant written before the kill was not re-issued: it still works
    assert_works(w, opened(w, second), 2)


def test_resume_without_a_pending_rotation_and_records_that_cannot_be_finished(world, capsys, monkeypatch):
    w = world
    grant_for(w, capsys, "alice")
    result = dlheir("owner", "rotate", "--resume")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and "no interrupted rotation of collection 'photos' to resume" in result.stderr
    assert key_ids(w) == [1] and server_key(w) == 1 and not record_path(w).exists()

    # a record the server's key version matches neither end of: one line, nothing changed
    key_file = w["home"] / "owner.key"
    original = key_file.read_bytes()
    OwnerKeys.load(key_file).rotated(COLLECTION).rotated(COLLECTION).replace_file(key_file)
    PendingRotation(COLLECTION, 2, 3, ["alice"], [], [], None, str(key_file)).save()
    code, out, err = cli(capsys, "owner", "rotate")
    assert code == 2 and err.count("\n") == 1 and "cannot finish the interrupted rotation" in err
    assert "under key version 1" in err and "dlheir owner grant" in err and record_path(w).exists()
    PendingRotation(COLLECTION, 3, 9, ["alice"], [], [], None, "/elsewhere/owner.key").save()
    code, out, err = cli(capsys, "owner", "rotate", "--resume")
    assert code == 2 and err.count("\n") == 1 and "has no key version 9" in err and "--key /elsewhere/owner.key" in err
    record_path(w).unlink()
    key_file.write_bytes(original)
    assert server_key(w) == 1

    # RekeyCodes refused and the server still at the old version: no record left, the command is run again
    def refused(*_a, **_kw):
        raise CloudError(grpc.StatusCode.UNAVAILABLE, "connection lost")

    with monkeypatch.context() as patch:
        patch.setattr(CloudClient, "rekey_codes", refused)
        code, _, err = cli(capsys, "owner", "rotate")
    assert code == 2 and "UNAVAILABLE" in err and not record_path(w).exists()

    # no answer and the server gone: the re-key may have committed, so the record stays for --resume
    def lost(*_a, **_kw):
        w["server"].kill()
        raise CloudError(grpc.StatusCode.UNAVAILABLE, "connection lost")

    with monkeypatch.context() as patch:
        patch.setattr(CloudClient, "rekey_codes", lost)
        code, _, err = cli(capsys, "owner", "rotate")
    assert code == 2 and err.count("\n") == 1 and "--resume" in err and record_path(w).exists()
    w["server"] = CloudServerProcess(w["server"].data_dir, port=w["server"].port).start()
    code, out, err = cli(capsys, "owner", "rotate")
    assert code == 0 and "resumed the interrupted rotation of collection 'photos' from key version 1 to 3" in out, err
    assert key_ids(w) == [1, 2, 3] and server_key(w) == 3 and not record_path(w).exists()
    assert_works(w, opened(w, "alice"), 3)


def test_drop_of_a_user_already_re_granted_by_the_interrupted_run_is_refused(world, capsys):
    w = world
    grant_for(w, capsys, "alice")
    grant_for(w, capsys, "bob")
    killed(dlheir("owner", "rotate", fault="rotate-after-grant"))
    first = json.loads(record_path(w).read_text())["users"][0]
    code, _, err = cli(capsys, "owner", "rotate", "--drop", first)
    assert code == 2 and err.count("\n") == 1 and "already re-granted" in err and record_path(w).exists()
    code, out, err = cli(capsys, "owner", "rotate")
    assert code == 0 and "resumed" in out and not record_path(w).exists(), err
