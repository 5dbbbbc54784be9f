"""Key hygiene: where keys, tokens and grants live by default, which files are refused, the
modes of what is written, and that the repository ignores key files (issue 10, section 3)."""

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from Crypto.PublicKey import RSA

from dlheir import paths
from dlheir.cli import main
from dlheir.client import crypto
from dlheir.client.crypto import (
    GrantError, OwnerKeys, generate_user_keypair, make_grant, open_grant,
)
from dlheir.client.user import Hit, write_results
from dlheir.errors import UserError

REPO_ROOT = Path(__file__).resolve().parent.parent


def mode_of(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(private key path, public key path) of one RSA-3072 user key pair, outside any home."""
    return generate_user_keypair(tmp_path_factory.mktemp("pair") / "alice.pem")


@pytest.fixture
def home(tmp_path, monkeypatch):
    """DLHEIR_HOME set to a folder that does not exist yet; the working folder empty."""
    monkeypatch.setenv("DLHEIR_HOME", str(tmp_path / "home"))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return tmp_path / "home"


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def one_line_error(code, err, *needles):
    assert code == 2, err
    assert err.startswith("dlheir: error:") and err.count("\n") == 1, err
    for needle in needles:
        assert str(needle) in err, (needle, err)


def reader_token_file(folder, token="t"):
    """A 0600 file holding ``token``, for ``owner grant --reader-token-file`` (argv never holds it)."""
    path = folder / "reader.token"
    path.write_text(token)
    os.chmod(path, 0o600)
    return path


def loose_copy(src, dst, mode):
    shutil.copyfile(src, dst)
    os.chmod(dst, mode)
    return dst


# --- the default place ------------------------------------------------------------------------
def test_home_is_dlheir_home_then_xdg_then_dot_config(tmp_path, monkeypatch):
    monkeypatch.setenv("DLHEIR_HOME", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert paths.dlheir_home() == tmp_path / "explicit"
    monkeypatch.delenv("DLHEIR_HOME")
    assert paths.dlheir_home() == tmp_path / "xdg" / "dlheir"
    monkeypatch.setenv("XDG_CONFIG_HOME", "relative/is/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert paths.dlheir_home() == tmp_path / "user" / ".config" / "dlheir"
    monkeypatch.delenv("XDG_CONFIG_HOME")
    assert paths.dlheir_home() == tmp_path / "user" / ".config" / "dlheir"
    assert not (tmp_path / "user").exists()  # asking where it is creates nothing


def test_keys_tokens_and_grants_go_to_the_home_folder_without_path_flags(home, capsys, cloud_server):
    cwd = Path.cwd()
    old = os.umask(0)  # even with a wide-open umask
    try:
        code, out, _ = run_cli(capsys, "owner", "init", "--collection", "photos")
    finally:
        os.umask(old)
    assert code == 0 and str(home / "owner.key") in out
    assert mode_of(home) == 0o700 and mode_of(home / "owner.key") == 0o600

    code, out, _ = run_cli(capsys, "user", "keygen")
    assert code == 0 and str(home / "user.pem") in out and str(home / "user.pub.pem") in out
    assert mode_of(home / "user.pem") == 0o600

    code, _, _ = run_cli(capsys, "owner", "create-collection", "photos", "--bits", 48, "--server", cloud_server.address,
                         "--admin-token-file", cloud_server.data_dir / "admin.token")
    assert code == 0 and mode_of(home / "photos.tokens.json") == 0o600
    (cwd / "q.png").write_bytes(b"query")
    code, _, err = run_cli(capsys, "user", "search", "q.png")  # the default grant is looked for in the home
    one_line_error(code, err, "grant not found", home / "grant.bin")

    code, out, _ = run_cli(capsys, "owner", "grant", "--user-pub", home / "user.pub.pem")
    held = home / "user-grants" / "photos.grant"  # this machine's own user: installed for user search
    assert code == 0 and str(held) in out and mode_of(held) == 0o600 and mode_of(held.parent) == 0o700
    grant = open_grant(held.read_bytes(), (home / "user.pem").read_bytes())
    tokens = json.loads((home / "photos.tokens.json").read_text())
    assert (grant.collection, grant.user, grant.server, grant.bits) == ("photos", "user", cloud_server.address, 48)
    assert grant.reader_token not in (tokens["reader_token"], tokens["owner_token"])  # the user's own token
    # create-collection registered the collection (uid, mode) in the home's key file; the grant carries its keys
    keys = OwnerKeys.load(home / "owner.key").for_collection("photos")
    assert (grant.image_key, grant.transform_secret, grant.uid, grant.mode) == \
        (keys.image_key, keys.transform_secret, keys.uid, "server-ranked")
    # the user's public key is kept (for 'owner rotate') in a 0700 folder of the home
    kept = home / "readers" / "photos" / "user.pub.pem"
    assert kept.read_bytes() == (home / "user.pub.pem").read_bytes()
    assert mode_of(home / "readers") == 0o700 and mode_of(home / "readers" / "photos") == 0o700

    assert sorted(os.listdir(cwd)) == ["q.png"]  # nothing secret in the working folder
    assert sorted(os.listdir(home)) == ["owner.key", "photos.tokens.json", "readers", "user-grants", "user.pem",
                                        "user.pub.pem"]


def test_explicit_paths_still_win_over_the_home(home, tmp_path, capsys):
    code, _, _ = run_cli(capsys, "owner", "init", "--out", "mine.key")
    assert code == 0 and mode_of("mine.key") == 0o600 and not home.exists()
    code, _, err = run_cli(capsys, "owner", "grant", "--user-pub", "x.pub.pem", "--key", "mine.key")
    one_line_error(code, err, "user public key not found", "x.pub.pem")


def test_a_bad_collection_name_never_becomes_a_path(home, capsys):
    code, _, err = run_cli(capsys, "owner", "create-collection", "../evil", "--admin-token-file", "nowhere")
    one_line_error(code, err, "invalid collection name")
    with pytest.raises(UserError, match="invalid collection name"):
        paths.tokens_name("../evil")
    assert paths.tokens_name("photos-2.v1") == "photos-2.v1.tokens.json"


# --- secret files others can read or write are refused ---------------------------------------
@pytest.mark.parametrize("mode", [0o644, 0o640, 0o660, 0o604, 0o620, 0o602], ids=lambda m: f"{m:04o}")
def test_user_private_key_others_can_access_is_refused_with_one_line(home, pair, tmp_path, capsys, mode):
    private, public = pair
    grant = tmp_path / "g.bin"
    grant.write_bytes(make_grant(OwnerKeys.generate().register("c"), public.read_bytes(), "c", "t"))
    (tmp_path / "q.png").write_bytes(b"query")
    loose = loose_copy(private, tmp_path / "user.pem", mode)
    code, _, err = run_cli(capsys, "user", "search", tmp_path / "q.png", "--grant", grant, "--user-key", loose,
                           "--triton", "127.0.0.1:1", "--server", "127.0.0.1:1")
    one_line_error(code, err, loose, f"chmod 600 {loose}", "group or others")
    os.chmod(loose, 0o600)
    assert open_grant(grant.read_bytes(), crypto.read_private_key_file(loose)).collection == "c"


def test_tokens_admin_token_and_owner_key_others_can_read_are_refused(home, pair, tmp_path, capsys):
    _, public = pair
    key = tmp_path / "o.key"
    OwnerKeys.generate("photos").register("photos").save(key)  # a key file that could grant photos
    tokens = tmp_path / "photos.tokens.json"
    tokens.write_text(json.dumps({"owner_token": "own", "reader_token": "rd"}))
    os.chmod(tokens, 0o644)
    code, _, err = run_cli(capsys, "owner", "grant", "--key", key, "--user-pub", public, "--tokens", tokens,
                           "--out", tmp_path / "g.bin")
    one_line_error(code, err, tokens, f"chmod 600 {tokens}")
    assert not (tmp_path / "g.bin").exists()

    admin = tmp_path / "admin.token"
    admin.write_text("x" * 40)
    os.chmod(admin, 0o604)
    code, _, err = run_cli(capsys, "owner", "create-collection", "photos", "--admin-token-file", admin,
                           "--server", "127.0.0.1:1")
    one_line_error(code, err, admin, f"chmod 600 {admin}")

    os.chmod(key, 0o640)
    code, _, err = run_cli(capsys, "owner", "grant", "--key", key, "--user-pub", public,
                           "--reader-token-file", reader_token_file(tmp_path), "--out", tmp_path / "g.bin")
    one_line_error(code, err, key, f"chmod 600 {key}")


# --- the wrong half of a key pair is refused ----------------------------------------------------
def _private_forms(private_pem):
    rsa = RSA.import_key(private_pem)
    return {
        "pkcs8": private_pem,
        "pkcs1": rsa.export_key("PEM", pkcs=1),
        "encrypted pkcs8": rsa.export_key("PEM", pkcs=8, passphrase="pw", protection=crypto.PRIVATE_KEY_PROTECTION),
        "der": rsa.export_key("DER"),
    }


def test_private_key_given_as_user_pub_is_refused_and_never_sealed(home, pair, tmp_path, capsys, monkeypatch):
    private, _ = pair
    key = tmp_path / "o.key"
    OwnerKeys.generate("photos").register("photos").save(key)  # a key file that could grant photos
    sealed = []
    real_make_grant = crypto.make_grant
    monkeypatch.setattr(crypto, "make_grant", lambda *a, **kw: sealed.append(a) or real_make_grant(*a, **kw))
    for form, pem in _private_forms(private.read_bytes()).items():
        wrong = tmp_path / f"{form.replace(' ', '_')}.pem"
        wrong.write_bytes(pem)
        os.chmod(wrong, 0o600)
        out = tmp_path / f"grant-{form.replace(' ', '_')}.bin"
        code, _, err = run_cli(capsys, "owner", "grant", "--key", key, "--user-pub", wrong,
                               "--reader-token-file", reader_token_file(tmp_path), "--out", out)
        one_line_error(code, err, wrong, "is a private key")
        assert not out.exists() and not (home / "grant.bin").exists() and not sealed
    # the library refuses it too, whatever reaches it
    # (with the collection registered, so that it is the key, not a missing collection, that stops it)
    keys = OwnerKeys.generate().register("c")
    for form, pem in _private_forms(private.read_bytes()).items():
        with pytest.raises(UserError, match="private key, not a public one|not an RSA public key"):
            real_make_grant(keys, pem, "c", "t")
            pytest.fail(f"{form} was sealed")
    with pytest.raises(UserError, match="private key, not a public one"):
        crypto.read_public_key_file(private)


def test_public_key_given_as_user_key_is_refused(home, pair, tmp_path, capsys):
    private, public = pair
    grant = tmp_path / "g.bin"
    grant.write_bytes(make_grant(OwnerKeys.generate().register("c"), public.read_bytes(), "c", "t"))
    (tmp_path / "q.png").write_bytes(b"query")
    code, _, err = run_cli(capsys, "user", "search", tmp_path / "q.png", "--grant", grant, "--user-key", public,
                           "--triton", "127.0.0.1:1", "--server", "127.0.0.1:1")
    one_line_error(code, err, public, "is a public key")
    with pytest.raises(GrantError, match="public key"):
        open_grant(grant.read_bytes(), public.read_bytes())


# --- decrypted images -------------------------------------------------------------------------
def test_decrypted_images_are_0600_in_a_0700_folder(tmp_path):
    hits = [Hit(1, 11, 0, "a.png", b"image a"), Hit(2, 22, 3, "../../b.png", b"image b"), Hit(3, 33, 5, "c.png", b"")]
    out = tmp_path / "results" / "query1"
    old = os.umask(0)
    try:
        written = write_results(hits, out)
    finally:
        os.umask(old)
    assert [p.name for p in written] == ["001_d00_a.png", "002_d03_b.png"]  # an image not fetched is not written
    assert all(p.parent == out for p in written)
    assert mode_of(out) == 0o700 and [mode_of(p) for p in written] == [0o600, 0o600]
    assert written[1].read_bytes() == b"image b"

    os.chmod(written[0], 0o644)  # a re-run into the same folder replaces the file, 0600 again
    again = write_results([Hit(1, 11, 0, "a.png", b"new bytes")], out)
    assert again == written[:1] and written[0].read_bytes() == b"new bytes" and mode_of(written[0]) == 0o600
    assert sorted(os.listdir(out)) == ["001_d00_a.png", "002_d03_b.png"]  # no temporary file left behind


# --- the repository ignores key files -----------------------------------------------------------
@pytest.mark.parametrize("name", ["owner.key", "user.pem", "user.pub.pem", "grant.bin", "grant-alice.bin",
                                  "photos.grant.bin", "photos.grant", "photos.tokens.json", "admin.token"])
def test_gitignore_covers_key_token_and_grant_files(name):
    if shutil.which("git") is None or not (REPO_ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    for path in (name, f"some/sub/folder/{name}"):
        r = subprocess.run(["git", "-C", str(REPO_ROOT), "check-ignore", "-q", "--no-index", path])
        assert r.returncode == 0, f"{path} is not ignored by .gitignore"
