"""The Python API (dlheir.Owner, dlheir.User, dlheir.status), the collection admin commands and
the upload id rules, against real Triton and cloud-server processes; the CLI and the API give
the same results."""

from __future__ import annotations

import json
import os
import shutil

import pytest

import dlheir
from dlheir import config
from dlheir.cli import main
from dlheir.client.api import to_json
from dlheir.errors import UserError
from dlheir.ids import content_id, keyed_content_id

ENV_VARS = [*config.ENV.values(), config.CONFIG_ENV]


@pytest.fixture
def setup(client_setup):
    return client_setup  # tests/conftest.py


def cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def cli_json(capsys, *argv):
    code, out, err = cli(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def test_import_is_light_and_exports_the_api():
    import subprocess
    import sys

    code = ("import sys, dlheir; assert 'grpc' not in sys.modules and 'numpy' not in sys.modules; "
            "print(dlheir.Owner.__module__, dlheir.User.__module__, dlheir.status.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["dlheir.client.api"] * 3


def test_collections_items_and_status_commands(setup, capsys):
    s = setup
    assert cli(capsys, "owner", "init")[0] == 0
    created = cli_json(capsys, "owner", "create-collection", "photos")
    assert created["collection"]["name"] == "photos" and created["collection"]["items"] == 0
    assert cli(capsys, "owner", "create-collection", "sealed", "--private")[0] == 0

    up = cli_json(capsys, "owner", "upload", s["images"], "--collection", "photos")
    n = len(list(s["images"].rglob("*.png")))
    assert up["uploaded"] == n and up["duplicates"] == [] and up["already_present"] == []

    listing = cli_json(capsys, "collections", "list")  # admin token from the config file: every collection
    assert [(c["name"], c["mode"], c["items"]) for c in listing] == [("photos", "server-ranked", n),
                                                                      ("sealed", "private", 0)]
    code, out, _ = cli(capsys, "collections", "list")
    assert code == 0 and "photos" in out and "server-ranked" in out and "sealed" in out and "private" in out
    described = cli_json(capsys, "collections", "describe", "photos")
    assert described == listing[0]

    st = cli_json(capsys, "status")
    assert st["server"]["up"] and st["server"]["address"] == s["cloud"].address
    assert st["triton"]["up"] and st["triton"]["info"]["bits"] == 48
    assert [c["name"] for c in st["collections"]] == ["photos", "sealed"]
    assert st["config_file"] == str(s["home"] / "config.toml")
    assert st["settings"]["server"] == {"value": s["cloud"].address, "from": f"file {s['home'] / 'config.toml'}"}
    assert st["settings"]["model"] == {"value": "dlheir", "from": "default"}
    code, out, _ = cli(capsys, "status")
    assert code == 0 and "cloud server" in out and "up" in out and f"{s['triton'].grpc_url}" in out

    # items delete: by id and by file (the content rule gives the same id the upload gave)
    one, two = sorted(s["images"].rglob("*.png"))[:2]
    owner = dlheir.Owner()
    [id_one] = owner.item_ids([one], collection="photos")
    id_key = owner.keys().for_collection("photos").id_key  # ids are keyed with the collection's id key
    assert id_one == keyed_content_id(id_key, one.read_bytes()) != content_id(one.read_bytes())
    deleted = cli_json(capsys, "items", "delete", id_one, "--file", two, "--collection", "photos")
    assert deleted["deleted"] == 2
    assert cli_json(capsys, "collections", "describe", "photos")["items"] == n - 2
    code, out, _ = cli(capsys, "items", "delete", id_one, "--collection", "photos")
    assert code == 0 and "deleted 0 of 1" in out

    # delete a collection: refused without --yes; then gone, its tokens file too, its token refused
    code, _, err = cli(capsys, "collections", "delete", "photos")
    assert code == 2 and "--yes" in err
    gone = cli_json(capsys, "collections", "delete", "photos", "--yes")
    assert gone["deleted"]["name"] == "photos" and gone["deleted"]["items"] == n - 2
    assert not (s["home"] / "photos.tokens.json").exists()
    assert [c["name"] for c in cli_json(capsys, "collections", "list")] == ["sealed"]
    code, _, err = cli(capsys, "collections", "delete", "photos", "--yes")
    assert code == 2 and "NOT_FOUND" in err


def test_status_names_what_is_down(setup, capsys):
    from dlheir.procs import free_port

    nowhere = f"127.0.0.1:{free_port()}"
    code, out, _ = cli(capsys, "status", "--server", nowhere, "--triton", nowhere)
    assert code == 1 and "DOWN" in out and "connection refused" in out
    st = dlheir.status(server=nowhere)
    assert not st.server.up and st.triton.up and st.collections is None


def test_cli_and_api_give_the_same_results(setup, capsys):
    s = setup
    owner = dlheir.Owner()
    owner.init_keys()
    info = owner.create_collection("same", bits=48)
    summary = owner.upload(s["images"], "same", progress=False)
    assert summary.uploaded == len(list(s["images"].rglob("*.png"))) and not summary.skipped

    assert cli(capsys, "user", "keygen")[0] == 0
    owner.grant(s["home"] / "user.pub.pem", "same", user="alice")
    user = dlheir.User()
    query = next(s["images"].glob("1/*.png"))
    api = user.search(query, k=6, out="api-found")
    got = cli_json(capsys, "user", "search", query, "-k", 6, "--out", "cli-found")
    assert [(h.rank, h.id, h.distance, h.name) for h in api.results] == \
           [(h["rank"], h["id"], h["distance"], h["name"]) for h in got["results"]]
    assert len(api.results) == 6 and api.results[0].distance == 0
    originals = {p.name: p.read_bytes() for p in s["images"].rglob("*.png")}  # names are unique here
    for h, c in zip(api.results, got["results"]):  # both wrote the decrypted originals
        assert h.image == h.file.read_bytes() == originals[h.name] == (s["home"].parent / c["file"]).read_bytes()

    assert to_json(owner.collections()) == cli_json(capsys, "collections", "list")
    assert to_json(owner.describe("same")) == cli_json(capsys, "collections", "describe", "same")
    assert to_json(owner.grants("same")) == cli_json(capsys, "owner", "grants", "--collection", "same")
    assert info.name == "same" and info.bits == 48


def test_upload_ids_duplicates_and_replace(setup, capsys):
    s = setup
    images = s["images"]
    first = sorted(images.rglob("*.png"))[0]
    shutil.copy(first, images / "0" / "copy_of_first.png")  # the same content twice in one upload
    n = len(list(images.rglob("*.png")))
    owner = dlheir.Owner()
    owner.init_keys()
    owner.create_collection("ids", bits=48)
    code, out, _ = cli(capsys, "owner", "upload", images, "--collection", "ids")
    assert code == 0 and f"uploaded {n - 1} images" in out and "1 duplicates" in out
    assert f"duplicate 0/copy_of_first.png: same content as {first.relative_to(images).as_posix()}" in out

    # a subfolder on its own: every image is already stored (content ids), nothing is added
    sub = owner.upload(images / "1", "ids", progress=False)
    assert sub.uploaded == 0 and len(sub.already_present) == len(list((images / "1").glob("*.png")))
    assert owner.describe("ids").items == n - 1

    # an edited file is a new item under the content rule; --replace re-sends what is stored
    first.write_bytes(first.read_bytes() + b"\0")  # still a PNG (trailing bytes are ignored)
    assert owner.upload(images / "0", "ids", progress=False).uploaded == 1
    again = cli_json(capsys, "owner", "upload", images / "1", "--collection", "ids", "--replace")
    assert again["uploaded"] == len(list((images / "1").glob("*.png"))) and again["replaced"] == again["uploaded"]
    assert owner.describe("ids").items == n

    # --id-from path: ids from relative paths, so the same files are new items here
    by_path = owner.upload(images / "2", "ids", id_from="path", progress=False)
    assert by_path.uploaded == len(list((images / "2").glob("*.png"))) and by_path.id_from == "path"
    with pytest.raises(UserError, match="unknown id rule"):
        owner.upload(images, "ids", id_from="name")


def test_search_writes_into_its_own_folder(setup, capsys):
    s = setup
    owner = dlheir.Owner()
    owner.init_keys()
    owner.create_collection("own", bits=48)
    owner.upload(s["images"], "own", progress=False)
    dlheir.User.keygen()
    owner.grant(s["home"] / "user.pub.pem", "own")
    query = next(s["images"].glob("2/*.png"))
    a = cli_json(capsys, "user", "search", query, "-k", 3)
    b = cli_json(capsys, "user", "search", query, "-k", 3)
    assert a["out_dir"] != b["out_dir"]
    for r in (a, b):
        folder = s["home"].parent / r["out_dir"]
        assert folder.parent == s["home"].parent / "results" / "search" and query.stem in folder.name
        assert sorted(p.name for p in folder.iterdir()) == sorted(h["file"].rsplit("/", 1)[1] for h in r["results"])


def test_config_precedence_and_errors(tmp_path, monkeypatch):
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("DLHEIR_HOME", str(tmp_path / "home"))
    assert config.load().path is None and config.load().get("server") == "127.0.0.1:50051"  # no file: defaults
    f = tmp_path / "cfg" / "dlheir.toml"
    f.parent.mkdir()
    f.write_text('server = "file:1"\ntriton = "file:2"\nowner_key = "keys/owner.key"\n')
    c = config.load(f)
    assert (c.get("server"), c.get("triton"), c.get("model")) == ("file:1", "file:2", "dlheir")
    assert c.get("owner_key") == str(f.parent / "keys" / "owner.key")  # relative to the file's folder
    assert c.sources["server"] == f"file {f}" and c.sources["model"] == "default"
    monkeypatch.setenv("DLHEIR_SERVER", "env:1")
    monkeypatch.setenv("DLHEIR_CONFIG", str(f))
    c = config.load()  # the file named by $DLHEIR_CONFIG; env over file; flag over env
    assert (c.get("server"), c.get("triton"), c.get("server", "flag:1")) == ("env:1", "file:2", "flag:1")
    assert c.source("server") == "env DLHEIR_SERVER" and c.source("server", "x") == "flag"

    monkeypatch.setenv("DLHEIR_ADMIN_TOKEN", "from-env")
    assert config.load().admin_token() == "from-env"
    f.write_text('serverr = "x"\n')
    with pytest.raises(UserError, match="unknown key 'serverr'"):
        config.load(f)
    f.write_text('server = 50051\n')
    with pytest.raises(UserError, match="server must be a non-empty string"):
        config.load(f)
    f.write_text('server = "\n')
    with pytest.raises(UserError, match="not valid TOML"):
        config.load(f)
    with pytest.raises(UserError, match="config file not found"):
        config.load(tmp_path / "missing.toml")


def test_global_flags_on_every_command(tmp_path, monkeypatch, capsys):
    from dlheir.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["owner", "upload", "x", "-q", "--config", "c.toml"])
    assert args.quiet == 1 and args.config == "c.toml"
    args = parser.parse_args(["-v", "status"])
    assert args.verbose == 1 and args.config is None
    monkeypatch.setenv("DLHEIR_HOME", str(tmp_path))
    code = main(["collections", "list", "--config", str(tmp_path / "nope.toml")])
    assert code == 2 and "config file not found" in capsys.readouterr().err


def test_without_the_admin_token_the_tokens_files_are_listed(setup, capsys):
    s = setup
    admin = s["cloud"].data_dir / "admin.token"
    (s["home"] / "config.toml").write_text(f'server = "{s["cloud"].address}"\ntriton = "{s["triton"].grpc_url}"\n')
    owner = dlheir.Owner()
    owner.init_keys()  # creating a collection records its keys in the owner key file
    owner.create_collection("mine", bits=48, admin_token_file=admin)  # a raw-code collection, no Triton asked
    owner.create_collection("other", bits=48, admin_token_file=admin, tokens_out=s["home"].parent / "other.json")
    assert [c["name"] for c in cli_json(capsys, "collections", "list")] == ["mine"]  # the tokens file held here
    assert [c["name"] for c in cli_json(capsys, "collections", "list", "--admin-token-file", admin)] == ["mine",
                                                                                                       "other"]
    code, out, _ = cli(capsys, "status")
    assert code == 0 and "mine" in out and "other" not in out
    code, _, err = cli(capsys, "collections", "delete", "mine", "--yes")
    assert code == 2 and "admin token" in err and "--admin-token-file" in err


def test_quiet_or_no_terminal_turns_progress_bars_off(monkeypatch):
    monkeypatch.setattr(config, "_verbosity", 0)
    monkeypatch.setenv("TQDM_DISABLE", "")  # restored (removed) after the test

    class Terminal:
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr("sys.stderr", Terminal())
    assert config.show_progress()
    config.set_verbosity(-1)  # -q
    assert not config.show_progress() and __import__("os").environ["TQDM_DISABLE"] == "1"
    monkeypatch.setattr(config, "_verbosity", 0)
    monkeypatch.setattr("sys.stderr", type("Pipe", (), {"isatty": lambda self: False})())
    assert not config.show_progress()


def test_collections_list_says_where_it_looked_and_never_swallows_a_bad_admin_token(tmp_path, monkeypatch, capsys):
    """Without an admin token only the tokens files held here count, and the empty answer says so;
    an admin token that is given but unusable is an error, not an empty list."""
    for var in [*ENV_VARS, config.ADMIN_TOKEN_ENV]:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("DLHEIR_HOME", str(tmp_path / "home"))
    assert main(["collections", "list"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("no collections: no admin token given") and str(tmp_path / "home") in out
    token = tmp_path / "admin.token"
    token.write_text("secret")
    token.chmod(0o644)
    assert main(["collections", "list", "--admin-token-file", str(token)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "chmod 600" in err[0]


def test_items_delete_by_path_outside_root_is_one_line(tmp_path, monkeypatch, capsys):
    """--id-from path with a file outside --root: a one-line error, no traceback (no server needed)."""
    monkeypatch.setenv("DLHEIR_HOME", str(tmp_path / "home"))
    (tmp_path / "root").mkdir()
    outside = tmp_path / "elsewhere.png"
    outside.write_bytes(b"x")
    owner = dlheir.Owner()
    owner.init_keys()
    owner.keys().register("photos").replace_file(owner.key_path)  # path ids are keyed with the collection's id key
    with pytest.raises(UserError, match="is not inside --root") as info:
        owner.item_ids([outside], id_from="path", root=tmp_path / "root", collection="photos")
    assert "\n" not in str(info.value)


def test_a_revoked_user_and_a_second_grant_are_told_what_to_do(setup, capsys):
    s = setup
    owner = dlheir.Owner()
    owner.init_keys()
    owner.create_collection("own", bits=48)
    owner.upload(s["images"], "own", progress=False)
    dlheir.User.keygen()
    owner.grant(s["home"] / "user.pub.pem", "own", user="me")
    taken = s["home"] / "taken.grant"
    taken.write_bytes(b"x")
    code, _, err = cli(capsys, "owner", "grant", "--user-pub", s["home"] / "user.pub.pem", "--collection", "own",
                       "--user", "me2", "--out", taken)  # an --out that exists is never overwritten
    assert code != 0 and "already exists" in err and "own" in err and len(err.strip().splitlines()) == 1
    query = next(s["images"].glob("2/*.png"))
    assert cli(capsys, "user", "search", query, "-k", 1)[0] == 0
    owner.revoke("me", "own")
    code, out, err = cli(capsys, "user", "search", query, "-k", 1)
    assert code != 0 and "Traceback" not in out + err and len(err.strip().splitlines()) == 1
    assert "refused this grant's reader token" in err and "ask the owner for a new grant" in err


def test_several_collections_per_user_grant_files_by_collection(setup, capsys):
    """A grant per collection: 'owner grant' installs this machine's user's grant as
    user-grants/COLLECTION.grant and writes another user's as grants/COLLECTION/USER.grant, to send;
    'user add-grant' installs a received one; 'user search --collection' picks; without it, several
    held grants are named in one line; a grant re-issued after a rotation replaces the older."""
    s = setup
    home = s["home"]
    owner = dlheir.Owner()
    owner.init_keys()
    query = next(s["images"].glob("2/*.png"))
    for name in ("cats", "dogs"):
        owner.create_collection(name, bits=48)
        owner.upload(s["images"], name, progress=False)
    dlheir.User.keygen()
    code, out, _ = cli(capsys, "owner", "grant", "--collection", "cats", "--user", "me")
    assert code == 0 and str(home / "user-grants" / "cats.grant") in out and "installed" in out, out
    assert cli(capsys, "user", "search", query, "-k", 1)[0] == 0  # one grant held: no --collection needed
    # a grant for another user's key (here a second key pair standing for them): written to send, then installed
    other = home / "other" / "friend.pem"
    other.parent.mkdir(mode=0o700)
    dlheir.User.keygen(other)
    code, out, _ = cli(capsys, "owner", "grant", "--collection", "dogs", "--user", "friend",
                       "--user-pub", other.with_name("friend.pub.pem"))
    sent = home / "grants" / "dogs" / "friend.grant"
    assert code == 0 and str(sent) in out and "send it to friend" in out and "user add-grant" in out, out
    assert not (home / "user-grants" / "dogs.grant").exists()
    code, out, err = cli(capsys, "user", "add-grant", sent, "--user-key", other)
    assert code == 0 and "'dogs'" in out and str(home / "user-grants" / "dogs.grant") in out, err
    # two grants held now: search names them unless told which
    code, out, err = cli(capsys, "user", "search", query, "-k", 1, "--user-key", other)
    assert code != 0 and "'cats', 'dogs'" in err and "--collection" in err and len(err.strip().splitlines()) == 1
    found = cli_json(capsys, "user", "search", query, "-k", 1, "--collection", "dogs", "--user-key", other)
    assert found["results"][0]["distance"] == 0
    code, out, err = cli(capsys, "user", "search", query, "--collection", "birds")
    assert code != 0 and "no grant for collection 'birds'" in err and "add-grant" in err, err
    listed = cli_json(capsys, "user", "grants", "--user-key", other)
    assert {r["collection"]: r["opens"] for r in listed} == {"cats": False, "dogs": True}  # cats is sealed for 'me'
    # the owner rotates dogs: the new grant to send, installed over the old one; the old one stops working
    code, out, _ = cli(capsys, "owner", "rotate", "--collection", "dogs")
    assert code == 0 and f"new grant for 'friend': {sent}" in out and "user add-grant" in out, out
    code, out, _ = cli(capsys, "user", "add-grant", sent, "--user-key", other)
    assert code == 0 and "replacing the older one" in out
    assert cli(capsys, "user", "search", query, "-k", 1, "--collection", "dogs", "--user-key", other)[0] == 0


def test_grant_without_user_pub_takes_this_machines_key_or_says_what_to_give(tmp_path, monkeypatch, capsys):
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    monkeypatch.setenv("DLHEIR_HOME", str(home))
    code, out, err = cli(capsys, "owner", "grant", "--user", "me", "--collection", "c")
    assert code != 0 and "--user-pub" in err and str(home / "user.pub.pem") in err and len(err.strip().splitlines()) == 1
    assert cli(capsys, "user", "keygen")[0] == 0
    from dlheir.client.crypto import OwnerKeys

    OwnerKeys.generate().register("c").save(home / "owner.key")
    monkeypatch.setenv("DLHEIR_READER_TOKEN", "offline-token")  # offline: no server needed
    code, out, err = cli(capsys, "owner", "grant", "--user", "me", "--collection", "c")
    assert code == 0, err
    assert str(home / "user.pub.pem") in out and (home / "user-grants" / "c.grant").is_file()


def test_verbose_flags_add_log_records_on_upload_grant_and_search(setup):
    """-v adds INFO records (what was connected, sent, found, with timings), -vv DEBUG ones (ids),
    on upload, grant and search; no secret (token, key) appears in them."""
    import subprocess
    import sys

    s = setup
    home = s["home"]

    def run(*argv: str) -> str:
        out = subprocess.run([sys.executable, "-m", "dlheir", *argv], capture_output=True, text=True, timeout=300,
                             env={**os.environ, "DLHEIR_HOME": str(home)})
        assert out.returncode == 0, out.stderr
        return out.stderr

    assert "INFO" not in run("owner", "init") + run("owner", "create-collection", "v", "--bits", "48")
    quiet = run("owner", "upload", str(s["images"]), "--collection", "v")
    assert "INFO" not in quiet and "DEBUG" not in quiet
    run("user", "keygen")
    err = run("-v", "owner", "grant", "--collection", "v", "--user", "me")
    assert "INFO dlheir.client.access: grant for user 'me'" in err and "DEBUG" not in err, err
    query = next(s["images"].glob("1/*.png"))
    err = run("-v", "user", "search", str(query), "-k", "3", "--out", str(home.parent / "found"))
    assert "INFO dlheir.client.triton: Triton" in err and "INFO dlheir.client.cloud: cloud server" in err, err
    assert "INFO dlheir.client.user: search 'v': trapdoor" in err and "DEBUG" not in err, err
    err = run("-vv", "user", "search", str(query), "-k", "3", "--out", str(home.parent / "found2"))
    assert "DEBUG dlheir.client.user: hits (rank, id, distance)" in err, err
    extra = s["images"] / "new"
    extra.mkdir()
    (extra / "x.png").write_bytes(next(s["images"].glob("2/*.png")).read_bytes()[:-1] + b"\0")  # new content id
    err = run("-vv", "owner", "upload", str(extra), "--collection", "v")
    assert "INFO dlheir.client.owner: upload to 'v'" in err and "DEBUG dlheir.client.owner: batch of" in err, err
    tokens = json.loads((home / "v.tokens.json").read_text())
    for secret in (tokens["owner_token"], tokens["reader_token"]):
        assert secret not in err
