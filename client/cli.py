"""CLI for data owners (`dlheir owner ...`), query users (`dlheir user ...`), collection admin
(`dlheir collections ...`, `dlheir items ...`) and `dlheir status`.

Every command here is a thin layer over :mod:`dlheir.client.api` (the Python API): it reads
flags, calls one API method and prints its result, human-readable by default and, with
``--json``, as JSON on stdout (the API's dataclass, :func:`dlheir.client.api.to_json`).
Addresses, the model, key paths and the admin token come from flags, else the environment,
else the config file (:mod:`dlheir.config`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from dlheir import config as _config
from dlheir import paths
from dlheir.errors import UserError

HOME = f"${paths.HOME_ENV}"  # how help texts name the per-user key folder (see dlheir.paths)
DEFAULT_SERVER = _config.DEFAULTS["server"]
DEFAULT_TRITON = _config.DEFAULTS["triton"]
CONFIGURED = "flag > env > config file"
READER_TOKEN_ENV = "DLHEIR_READER_TOKEN"  # owner grant's offline reader token (never a flag: argv shows in ps)


def _server_arg(p, recorded: str = "") -> None:
    p.add_argument("--server", default=None, help=f"cloud server HOST:PORT, or several fronts of one store as "
                                                  f"HOST:PORT,HOST:PORT (calls spread over them; one that fails "
                                                  f"goes on with another) ({CONFIGURED}"
                                                  f"{' > ' + recorded if recorded else ''} > {DEFAULT_SERVER}; "
                                                  "env DLHEIR_SERVER)")
    p.add_argument("--insecure", action="store_const", const=True, default=None,
                   help="allow a cloud server that is not loopback without TLS: tokens cross the network in the "
                        "clear (flag > env DLHEIR_INSECURE > insecure in the config file > false)")


def _triton_args(p) -> None:
    p.add_argument("--triton", default=None, help=f"Triton's gRPC HOST:PORT ({CONFIGURED} > {DEFAULT_TRITON}; "
                                                  "env DLHEIR_TRITON)")
    p.add_argument("--model", default=None, help=f"the Triton model to hash with ({CONFIGURED} > "
                                                 f"{_config.DEFAULTS['model']}; env DLHEIR_MODEL)")
    p.add_argument("--triton-tls-ca", default=None, help="PEM CA of a Triton served with TLS (triton_tls_ca setting; "
                                                         "env DLHEIR_TRITON_TLS_CA); needed for a Triton that is "
                                                         "not on loopback, unless --insecure")


def _json_arg(p) -> None:
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")


def _admin_arg(p) -> None:
    p.add_argument("--admin-token-file", default=None,
                   help="the server's admin token (DATA_DIR/admin.token; else $DLHEIR_ADMIN_TOKEN, "
                        "$DLHEIR_ADMIN_TOKEN_FILE or admin_token_file in the config file)")


def _key_arg(p, note: str = "") -> None:
    p.add_argument("--key", help=f"owner key file ({note + '; ' if note else ''}default: owner_key setting, else "
                                 f"{HOME}/{paths.OWNER_KEY})")


def _tokens_arg(p) -> None:
    p.add_argument("--tokens", help=f"tokens file from create-collection (default {HOME}/COLLECTION{paths.TOKENS_SUFFIX})")


def _collection_arg(p) -> None:
    p.add_argument("--collection", default=None,
                   help="collection name (flag > env DLHEIR_COLLECTION > config file > the one recorded in the "
                        "owner key file)")


def register(sub: argparse._SubParsersAction) -> None:
    own = sub.add_parser("owner", help="data owner: keys, collection, encrypted upload, grants")
    osub = own.add_subparsers(dest="action", metavar="ACTION")
    p = osub.add_parser(
        "init", help="KeyGen: create owner.key (a master secret and a grant-signing key), mode 0600",
        description="KeyGen: create a new owner key file (format 3) holding a random 256-bit master secret, from "
                    "which every collection gets its own image key, transform secret and item-id key, and an "
                    "Ed25519 key that signs grants (its fingerprint is printed: give it to your users). The file "
                    "is created with mode 0600 and never overwritten; create-collection and rotate record each "
                    "collection's uid and key version in it. Keep it secret and keep a backup: without it the "
                    "uploaded images cannot be decrypted and new codes cannot be made comparable to the stored ones.")
    p.add_argument("--out", help=f"key file to create (default: owner_key setting, else {HOME}/{paths.OWNER_KEY}; "
                                 "must not exist)")
    p.add_argument("--collection", help="record the collection these keys are for (grant then defaults to it)")
    _json_arg(p)
    p.set_defaults(func=_owner_init)

    p = osub.add_parser(
        "migrate-keys", help="convert an owner key file of format 1 or 2 to format 3 (the old one is kept)",
        description="Convert an owner key file of format 1 or 2 (one image key and transform secret shared by every "
                    "collection, unsigned grants, item ids a server can confirm) to format 3: the old file is kept "
                    "beside it as KEYFILE.vN.bak and the key file gets a new master secret and signing key. "
                    "Collections made with the old keys are not converted (the new keys cannot open what the old "
                    "ones sealed): re-create each one, upload its images again and send new grants.")
    _key_arg(p)
    _json_arg(p)
    p.set_defaults(func=_owner_migrate_keys)

    p = osub.add_parser(
        "fingerprint", help="print the fingerprint of your grant-signing key, for your users to trust",
        description="Print the fingerprint of the owner key file's Ed25519 grant-signing key. Give it to each user "
                    "out of band (in person, a signed mail, a call): 'dlheir user trust-owner FINGERPRINT' makes "
                    "their client accept grants signed by this key and refuse others'.")
    _key_arg(p)
    _json_arg(p)
    p.set_defaults(func=_owner_fingerprint)

    p = osub.add_parser(
        "create-collection", help="create a collection on the cloud server (needs the admin token)",
        description="Create a collection for the Triton model (--triton, --model): it records the model's code "
                    "length, image size and fingerprint, and the server refuses uploads and searches whose codes "
                    "come from another model. --bits alone makes a raw-code collection instead, tied to no model "
                    "(nothing is checked; Triton is not contacted).")
    p.add_argument("name")
    p.add_argument("--bits", type=int, default=None,
                   help="a raw-code collection of this code length, tied to no model (default: the Triton model's)")
    _triton_args(p)
    _server_arg(p)
    _admin_arg(p)
    p.add_argument("--out", help=f"where to keep the owner/reader tokens (default {HOME}/NAME{paths.TOKENS_SUFFIX}, "
                                 "mode 0600)")
    p.add_argument("--mode", choices=("server-ranked", "private"), default="server-ranked",
                   help="server-ranked (default): the server keeps transformed codes and ranks; private: the server "
                        "keeps no code, only sealed code pages, and users rank on their own machine (fixed at creation)")
    p.add_argument("--private", dest="mode", action="store_const", const="private", help="same as --mode private")
    _key_arg(p, "the collection's uid, mode and keys are recorded in it")
    _json_arg(p)
    p.set_defaults(func=_owner_create)

    p = osub.add_parser(
        "upload", help="hash (Triton), encrypt and upload every image of a folder; resumable",
        description="Hash every image under IMAGES_DIR with Triton, encrypt it and upload it with its "
                    "(transformed) code. Item ids come from the file's content (default: the same image is one "
                    "item wherever it sits; an edited file is a new item) or, with --id-from path, from its path "
                    "relative to IMAGES_DIR. Ids the server already holds are not sent again unless --replace; "
                    "files repeating an id (the same content twice) are reported as duplicates, not uploaded.")
    p.add_argument("images_dir", metavar="IMAGES_DIR",
                   help="a folder of images (sub-folders included), or one image file")
    _key_arg(p)
    _collection_arg(p)
    _tokens_arg(p)
    _server_arg(p, "the tokens file")
    _triton_args(p)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--id-from", choices=("content", "path"), default="content",
                   help="item ids from the file's bytes (default) or its path relative to IMAGES_DIR")
    p.add_argument("--replace", action="store_true", help="upload files whose id is already stored too, overwriting")
    _json_arg(p)
    p.set_defaults(func=_owner_upload)

    p = osub.add_parser(
        "grant", help="issue one user a reader token and seal it with the collection's keys for their RSA public key",
        description="Key delivery: the cloud server issues a reader token for this user (owner token from the tokens "
                    "file; the server keeps only its hash, under the user's label); the grant file holds the "
                    "collection name, that token, the image keys and the transform secret, encrypted with a fresh "
                    "AES-256-GCM key wrapped with RSA-OAEP (SHA-256) for the user's public key. Only that user's "
                    "private key opens it; the file can travel over any channel. The public key is kept in "
                    f"{HOME}/{paths.READERS_DIR}/COLLECTION/ so that 'owner rotate' can re-grant the user. "
                    "Granting a user again issues a new token (the old grant stops working). With "
                    f"--reader-token-file (or ${READER_TOKEN_ENV}) no server is contacted and the grant carries "
                    "that token (e.g. the shared one).")
    _key_arg(p)
    p.add_argument("--user-pub", default=None,
                   help="the user's public key (user.pub.pem from 'dlheir user keygen'; a private key is refused). "
                        f"Default: the one next to the user_key setting, else {HOME}/{paths.USER_KEY[:-4]}.pub.pem "
                        "(a user on this machine)")
    _collection_arg(p)
    p.add_argument("--user", help="the user's label on the server (default: the public key's file name, "
                                  "alice.pub.pem -> alice)")
    p.add_argument("--replace", action="store_true",
                   help="hand an active label to this public key (its previous token stops working)")
    p.add_argument("--reader-token-file", metavar="FILE",
                   help="seal the reader token this file holds (mode 0600) instead of asking the server for the "
                        f"user's own (offline; e.g. the collection's shared token, which rotation revokes); else "
                        f"${READER_TOKEN_ENV} if set. Never on the command line: argv is visible in ps")
    p.add_argument("--reader-token", help=argparse.SUPPRESS)  # refused: see _reader_token
    _tokens_arg(p)
    _server_arg(p, "the tokens file")
    p.add_argument("--bits", type=int, default=None, help="code length recorded in the grant (checked at search)")
    p.add_argument("--out", help=f"grant file to create (must not exist; default: the grant setting, else for this "
                                 f"machine's own user key installed as {HOME}/{paths.USER_GRANTS_DIR}/COLLECTION.grant, "
                                 f"else {HOME}/{paths.GRANTS_DIR}/COLLECTION/USER.grant to send)")
    _json_arg(p)
    p.set_defaults(func=_owner_grant)

    def access_args(p, note: str = ""):
        _collection_arg(p)
        _key_arg(p, note)
        _tokens_arg(p)
        _server_arg(p, "the tokens file")
        _json_arg(p)

    p = osub.add_parser("grants", help="list the collection's readers: user, issued, revoked",
                        description="List every user label the collection's server knows a reader token for, when it "
                                    "was issued and when it was revoked, whether the shared reader token (version-1 "
                                    "grants) still works, and the key version of the stored codes.")
    access_args(p)
    p.set_defaults(func=_owner_grants)

    p = osub.add_parser("revoke", help="revoke one user's reader token at once (others unaffected)",
                        description="Revoke USER's reader token: from the next call on, the server answers it "
                                    "UNAUTHENTICATED (also after a restart); other users keep working. The user "
                                    "still holds the keys in the grant: run 'owner rotate' so that what is uploaded "
                                    "from now on is under keys they do not have.")
    p.add_argument("user", metavar="USER", nargs="?")
    p.add_argument("--shared-token", action="store_true",
                   help="revoke the collection's shared reader token instead (the one version-1 grants carry)")
    access_args(p)
    p.set_defaults(func=_owner_revoke)

    p = osub.add_parser(
        "rotate", help="new image key and transform secret; stored codes re-keyed on the server; grants re-issued",
        description="Key rotation: add a new key version (image key + transform secret) to the owner key file, have "
                    "the server re-transform every stored code to it in one transaction (it is sent the composed map "
                    "T_new o T_old^-1, a bit permutation + XOR mask) and revoke every reader token of the collection; "
                    "then issue new grants to the users who were active (less --drop) from their kept public keys. "
                    "Old grants stop working; stored images are not re-encrypted and keep decrypting with the older "
                    "image keys, which new grants carry; new uploads use the new key. The rotation is recorded in "
                    f"{HOME}/{paths.ROTATIONS_DIR}/COLLECTION.json until every grant is written: if it was "
                    "interrupted, running 'owner rotate' again finishes it (re-keying to the version already in the "
                    "key file if the server had not, then re-granting the users not yet done) instead of starting a "
                    "new one.")
    access_args(p)
    p.add_argument("--drop", action="append", default=[], metavar="USER",
                   help="do not re-grant this user (repeatable)")
    p.add_argument("--resume", action="store_true",
                   help="only finish an interrupted rotation of the collection (an error if none is pending)")
    p.add_argument("--out-dir", help=f"folder for the new grants, USER.grant (default {HOME}/{paths.GRANTS_DIR}/"
                                     "COLLECTION/)")
    p.set_defaults(func=_owner_rotate)

    p = osub.add_parser(
        "reindex", help="re-hash a collection with the model Triton serves now (after a new export)",
        description="A collection holds the codes of the model it was made with; after 'dlheir export onnx' and a "
                    "Triton restart, its searches are refused until it is re-hashed. This fetches every stored image, "
                    "decrypts it with your keys, hashes it with the served model and stages its new code on the "
                    "server; then the server switches every code and the collection's model in one transaction. "
                    "Searches keep using the old codes until the switch. Interrupted, run it again: it stages only "
                    "what is left. Server-ranked collections only (a private one: re-create it).")
    access_args(p)
    _triton_args(p)
    p.add_argument("--batch-size", type=int, default=64, help="images per fetch and per hash request (default 64)")
    p.set_defaults(func=_owner_reindex)

    usr = sub.add_parser("user", help="query user: RSA key pair, encrypted search")
    usub = usr.add_subparsers(dest="action", metavar="ACTION")
    p = usub.add_parser(
        "keygen", help="create an RSA-3072 key pair: user.pem (0600) and user.pub.pem",
        description="Create an RSA-3072 key pair: the private key (PKCS#8 PEM, mode 0600, optionally encrypted "
                    "with a passphrase) and the public key next to it (NAME.pub.pem). Send the public key to the "
                    "data owner, who answers with a grant file only this private key can open. Existing files "
                    "are never overwritten.")
    p.add_argument("--out", help=f"private key file to create (default: user_key setting, else {HOME}/"
                                 f"{paths.USER_KEY}; the public key goes next to it as NAME.pub.pem)")
    p.add_argument("--passphrase-env", metavar="VAR",
                   help="name of an environment variable holding a passphrase to encrypt the private key with")
    _json_arg(p)
    p.set_defaults(func=_user_keygen)

    p = usub.add_parser(
        "trust-owner", help="trust grants signed by the owner key with this fingerprint",
        description="Record FINGERPRINT (as the owner's 'dlheir owner fingerprint' prints it, given to you out of "
                    f"band) in {HOME}/trusted-owners.json. Grants are signed by their owner; your client accepts "
                    "grants only from owner keys you trust. With none trusted yet, the first grant you open is "
                    "trusted on first use (said in one line with its fingerprint, to compare).")
    p.add_argument("fingerprint", metavar="FINGERPRINT")
    _json_arg(p)
    p.set_defaults(func=_user_trust_owner)

    p = usub.add_parser(
        "add-grant", help="install a grant file an owner sent you, as your grant for its collection",
        description=f"Open GRANT_FILE with your private key (checking the owner's signing key is trusted) and keep "
                    f"it as {HOME}/{paths.USER_GRANTS_DIR}/COLLECTION.grant (0600), replacing an older grant for "
                    "that collection (after an owner's rotation, install the new one). 'dlheir user search "
                    "--collection COLLECTION' then uses it; with one grant held, --collection is not needed.")
    p.add_argument("grant_file", metavar="GRANT_FILE")
    p.add_argument("--user-key", help=f"your private key (default: user_key setting, else {HOME}/{paths.USER_KEY})")
    p.add_argument("--passphrase-env", help="environment variable holding the private key's passphrase")
    _json_arg(p)
    p.set_defaults(func=_user_add_grant)

    p = usub.add_parser("grants", help="the grants you hold: collection, server, mode, owner key",
                        description=f"Every grant in {HOME}/{paths.USER_GRANTS_DIR}/ (and a legacy {HOME}/"
                                    f"{paths.GRANT}), opened with your private key.")
    p.add_argument("--user-key", help=f"your private key (default: user_key setting, else {HOME}/{paths.USER_KEY})")
    p.add_argument("--passphrase-env", help="environment variable holding the private key's passphrase")
    _json_arg(p)
    p.set_defaults(func=_user_grants)

    p = usub.add_parser("search", help="TrapGen via Triton, search, fetch and decrypt the top k")
    p.add_argument("query", metavar="QUERY_IMAGE")
    p.add_argument("--collection", help="search this collection: the grant you hold for it (default: the "
                                        "collection setting's grant, else the only grant you hold)")
    p.add_argument("--grant", help=f"grant file from the owner (default: the one held for --collection in {HOME}/"
                                   f"{paths.USER_GRANTS_DIR}/, else {HOME}/{paths.GRANT}, else the only one held)")
    p.add_argument("--user-key", help=f"your private key (default: user_key setting, else {HOME}/{paths.USER_KEY}; "
                                      "must be mode 0600)")
    p.add_argument("--passphrase-env", help="environment variable holding the private key's passphrase")
    p.add_argument("-k", type=int, default=20)
    p.add_argument("--out", default=None, help="folder for the decrypted images, created 0700; each image is written "
                                               "0600 (default: a new folder per search, results/search/"
                                               "YYYYmmdd-HHMMSS-QUERY/)")
    _server_arg(p, "the grant")
    _triton_args(p)
    _json_arg(p)
    p.set_defaults(func=_user_search)

    col = sub.add_parser("collections", help="list, describe and delete the cloud server's collections")
    csub = col.add_subparsers(dest="action", metavar="ACTION")
    def admin_command(name: str, func, help: str, description: str | None = None, named: bool = False):
        p = csub.add_parser(name, help=help, description=description)
        if named:
            p.add_argument("name", metavar="NAME")
        _server_arg(p, "the tokens file" if named else "")
        _admin_arg(p)
        _json_arg(p)
        p.set_defaults(func=func)
        return p

    admin_command("list", _collections_list, "every collection (admin token), else those whose tokens files you hold",
                  "With the admin token (--admin-token-file, $DLHEIR_ADMIN_TOKEN, or admin_token_file in the config "
                  f"file): every collection on the server. Without it: the collections whose tokens files are in {HOME}.")
    admin_command("describe", _collections_describe, "one collection: bits, mode, items, bytes, key version, model",
                  named=True)
    p = admin_command("delete", _collections_delete,
                      "delete a collection and everything it holds (admin token; asks for --yes)",
                      "Delete NAME on the server with all its items, blobs, code pages and reader tokens, in one "
                      "transaction; its tokens stop working at once and its tokens file in "
                      f"{HOME} is removed. This cannot be undone: --yes is required.", named=True)
    p.add_argument("--yes", action="store_true", help="really delete it")

    it = sub.add_parser("items", help="manage a collection's items (owner token)")
    isub = it.add_subparsers(dest="action", metavar="ACTION")
    p = isub.add_parser("delete", help="delete items by id, or by the image files they were uploaded from",
                        description="Delete items of a collection (owner token from its tokens file). Give ids "
                                    "(as 'dlheir user search' prints them) and/or --file IMAGE: the id that "
                                    "'owner upload' gave that file (its content; with --id-from path, its path "
                                    "relative to --root). In a private-ranking collection the owner key seals "
                                    "tombstone pages first.")
    p.add_argument("ids", metavar="ID", nargs="*", type=int)
    p.add_argument("--file", action="append", default=[], metavar="IMAGE", help="an uploaded image (repeatable)")
    p.add_argument("--id-from", choices=("content", "path"), default="content")
    p.add_argument("--root", help="with --id-from path: the folder the files were uploaded from")
    access_args(p, "private collections")
    p.set_defaults(func=_items_delete)

    p = sub.add_parser("status", help="which services answer, where, with which model, and the collections",
                       description="Ask the cloud server (gRPC health) and Triton (model ready, bits, image size) "
                                   "at the configured addresses and list the collections (all with the admin "
                                   "token, else those whose tokens files you hold). Exit code 0 when both answer, "
                                   "1 otherwise.")
    _server_arg(p)
    _triton_args(p)
    _admin_arg(p)
    _json_arg(p)
    p.set_defaults(func=_status)


# --- helpers --------------------------------------------------------------------------------
def _cfg(args) -> "_config.Config":
    cfg = _config.load(getattr(args, "config", None))
    import dataclasses

    flags = {"insecure": "true" if getattr(args, "insecure", None) else None,  # every command reaching a server has it
             "triton_tls_ca": getattr(args, "triton_tls_ca", None)}
    for key, value in flags.items():
        if value is not None:
            if key == "triton_tls_ca":
                _config.read_tls_ca(value, "--triton-tls-ca")
            cfg = dataclasses.replace(cfg, values={**cfg.values, key: value},
                                      sources={**cfg.sources, key: f"flag --{key.replace('_', '-')}"})
    return cfg


def _owner(args):
    from dlheir.client.api import Owner

    return Owner(server=getattr(args, "server", None), triton=getattr(args, "triton", None),
                 model=getattr(args, "model", None), key=getattr(args, "key", None), config=_cfg(args))


def _emit(args, obj) -> bool:
    """With --json: print ``obj`` (an API result) as JSON and return True."""
    if not getattr(args, "json", False):
        return False
    from dlheir.client.api import to_json

    print(json.dumps(to_json(obj), indent=2))
    return True


def _passphrase(var: str | None) -> str | None:
    if not var:
        return None
    if var not in os.environ:
        raise UserError(f"environment variable {var} is not set")
    if not os.environ[var]:
        raise UserError(f"environment variable {var} is empty; a passphrase cannot be empty")
    return os.environ[var]


def _when(seconds: float | None) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds)) if seconds else "-"


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} KB"


def _collection_lines(cols) -> list[str]:
    served = any(getattr(c, "served", None) is not None for c in cols)  # dlheir status, with Triton up
    lines = [f"{'name':<24} {'mode':<13} {'bits':>4} {'items':>9} {'blobs':>10} {'key':>3}  {'model':<16}"
             + ("  served by Triton" if served else "")]
    stale = []
    for c in cols:
        line = (f"{c.name:<24} {c.mode:<13} {c.bits:>4} {c.items:>9} {_size(c.blob_bytes):>10} {c.key_id:>3}  "
                f"{(c.model_fingerprint or '-')[:16]:<16}")
        if served:
            line += "  " + {True: "yes", False: "NO", None: "-"}[getattr(c, "served", None)]
            stale += [c.name] if getattr(c, "served", None) is False else []
        lines.append(line.rstrip())
    if stale:
        lines.append(f"Triton serves another model than the one {', '.join(map(repr, stale))} "
                     f"{'was' if len(stale) == 1 else 'were'} hashed with: searches there are refused until "
                     "'dlheir owner reindex NAME' re-hashes it with the served model")
    return lines


# --- owner ----------------------------------------------------------------------------------
def _owner_init(args):
    from dlheir.client.crypto import OwnerKeys

    path = _owner(args).init_keys(args.collection, args.out)
    fp = OwnerKeys.load(path).fingerprint
    if not _emit(args, {"owner_key": str(path), "fingerprint": fp}):
        print(f"owner key written to {path} (mode 0600): keep it secret, keep a backup")
        print(f"grant-signing key fingerprint: {fp} (give it to your users: 'dlheir user trust-owner {fp}')")


def _owner_migrate_keys(args):
    key, backup, names = _owner(args).migrate_keys()
    if _emit(args, {"owner_key": str(key), "backup": str(backup), "collections_to_recreate": names}):
        return 0
    print(f"{key} converted to key format 3 (new master secret and grant-signing key); the old file is kept as "
          f"{backup} (mode 0600)")
    if names:
        print(f"collections made with the old keys (re-create each, upload its images again, send new grants): "
              f"{', '.join(names)}")
    return 0


def _owner_fingerprint(args):
    fp = _owner(args).fingerprint()
    if not _emit(args, {"fingerprint": fp}):
        print(fp)
    return 0


def _owner_create(args):
    owner = _owner(args)
    info = owner.create_collection(args.name, args.bits, private=args.mode == "private",
                                   admin_token_file=args.admin_token_file, tokens_out=args.out)
    if not _emit(args, {"collection": info, "tokens_file": str(owner.last_tokens_file)}):
        print(f"collection {info.name!r} ({info.bits} bits, {info.mode}) created on {owner.server_for()}; tokens in "
              f"{owner.last_tokens_file} (mode 0600)")


def _owner_upload(args):
    s = _owner(args).upload(args.images_dir, args.collection, id_from=args.id_from, replace=args.replace,
                            batch_size=args.batch_size)
    code = 1 if s.skipped else 0  # 1: some files were not stored (listed below); the rest were
    if _emit(args, s):
        return code
    print(f"uploaded {s.uploaded} images ({s.bytes_uploaded / 1e6:.2f} MB) in {s.seconds:.1f}s: "
          f"{s.images_per_s:.1f} images/s, {s.mb_per_s:.2f} MB/s; {len(s.already_present)} already present"
          f"{f', {s.replaced} replaced' if args.replace else ''}; {len(s.duplicates)} duplicates; "
          f"{len(s.skipped)} skipped (ids from {s.id_from})")
    for name, same in s.duplicates:
        print(f"duplicate {name}: same {'content' if s.id_from == 'content' else 'id'} as {same}, not uploaded")
    if s.already_present:
        print(f"already stored, not sent (--replace to overwrite): {', '.join(s.already_present[:5])}"
              f"{' ...' if len(s.already_present) > 5 else ''}")
    for name, why in s.skipped:
        print(f"skipped {name}: {why}")
    return code


def _reader_token(args) -> str | None:
    """The token ``owner grant`` seals offline: --reader-token-file, else $DLHEIR_READER_TOKEN, else
    None (the server issues the user's own). --reader-token (argv, visible in ps) is refused."""
    if args.reader_token is not None:
        raise UserError(f"--reader-token puts the token on the command line, where ps shows it: write it to a file "
                        f"(chmod 600) and give --reader-token-file FILE, or set ${READER_TOKEN_ENV}")
    if args.reader_token_file:
        from dlheir.client.crypto import read_secret

        token = read_secret(args.reader_token_file, "reader token file").decode("utf-8", "replace").strip()
        if not token:
            raise UserError(f"--reader-token-file {args.reader_token_file} is empty")
        return token
    return os.environ.get(READER_TOKEN_ENV, "").strip() or None


def _owner_grant(args):
    reader_token = _reader_token(args)  # first: a token given in argv is refused before anything else
    owner = _owner(args)
    out = owner.grant(args.user_pub, args.collection, user=args.user, out=args.out, replace=args.replace,
                      reader_token=reader_token, bits=args.bits, tokens=args.tokens)
    user = owner.last_grant_user
    if _emit(args, {"grant": str(out), "user": user, "own_reader_token": reader_token is None}):
        return 0
    who = f" (user {user!r}, own reader token)" if reader_token is None else ""
    print(f"grant{who} written to {out}; only the holder of the private key matching {owner.last_grant_user_pub} "
          "can open it")
    if owner.last_grant_installed:
        print("it is installed for this machine's user: dlheir user search QUERY (--collection NAME when you hold "
              "several grants)")
    else:
        print(f"send it to {user or 'the user'}, who installs it with: dlheir user add-grant FILE")
    return 0


def _owner_grants(args):
    r = _owner(args).grants(args.collection, tokens=args.tokens)
    if _emit(args, r):
        return 0
    print(f"collection {r.collection!r}: codes under key version {r.key_id}; shared reader token "
          f"{'active' if r.shared_token_active else 'revoked'}")
    print(f"{'user':<24} {'issued':<19}  {'revoked':<19}")
    for x in r.readers:
        print(f"{x.user:<24} {_when(x.created):<19}  {_when(x.revoked):<19}")
    if paths.rotation_record(r.collection).is_file():
        print(f"a rotation of {r.collection!r} was interrupted ({paths.rotation_record(r.collection)}): finish it "
              "with 'dlheir owner rotate --resume'")
    return 0


def _owner_revoke(args):
    owner = _owner(args)
    revoked = owner.revoke(args.user, args.collection, shared_token=args.shared_token, tokens=args.tokens)
    if _emit(args, {"user": args.user, "shared_token": args.shared_token, "revoked": revoked}):
        return 0
    what = f"user {args.user!r}" if args.user else "the shared reader token"
    print(f"{what} {'revoked: its token is refused from now on' if revoked else 'was already revoked'}")
    return 0


def _owner_reindex(args):
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    r = _owner(args).reindex(args.collection, batch_size=args.batch_size, tokens=args.tokens)
    if _emit(args, r):
        return 0
    if r.already:
        print(f"collection {r.collection!r} already holds codes of the served model {r.model}: nothing to do")
        return 0
    print(f"collection {r.collection!r}: {r.items} codes switched from model {r.previous_model or '-'} to {r.model} "
          f"({r.image_size} px) in {r.seconds:.1f} s; {r.staged_now} images re-hashed by this run"
          f"{f', in {r.rounds} rounds (items were uploaded meanwhile)' if r.rounds > 1 else ''}")
    return 0


def _owner_rotate(args):
    owner = _owner(args)
    report = owner.rotate(args.collection, drop=args.drop, out_dir=args.out_dir, tokens=args.tokens,
                          resume=args.resume)
    if _emit(args, report):
        return 0
    if report.resumed:
        state = (f"the server had not re-keyed: {report.items} stored codes re-keyed now, {len(report.revoked)} "
                 "reader token(s) revoked" if report.rekeyed_now else
                 "the server had re-keyed its codes and revoked every reader token")
        print(f"resumed the interrupted rotation of collection {report.collection!r} from key version "
              f"{report.from_key} to {report.to_key} (in {owner.key_path}): re-granted "
              f"{', '.join(map(repr, sorted(report.granted))) or 'nobody'}; {state}")
    else:
        print(f"collection {report.collection!r}: key version {report.from_key} -> {report.to_key} (added to "
              f"{owner.key_path}); {report.items} stored codes re-keyed on the server; {len(report.revoked)} reader "
              "token(s) revoked")
    for user, path in sorted(report.granted_before.items()):
        print(f"new grant for {user!r}: {path} (written before the interruption)")
    for user, path in sorted(report.granted.items()):
        print(f"new grant for {user!r}: {path}")
    for user in report.dropped:
        print(f"not re-granted (--drop): {user!r}")
    for user in report.no_public_key:
        print(f"not re-granted, no kept public key: {user!r} (grant again with 'dlheir owner grant --user {user}')")
    regranted = sorted({**report.granted_before, **report.granted})
    if regranted:
        print(f"send each of these users their new grant file (their old grant no longer works): "
              f"{', '.join(map(repr, regranted))}; each installs it with: dlheir user add-grant FILE")
    return 0


# --- user -----------------------------------------------------------------------------------
def _user_keygen(args):
    from dlheir.client.api import User

    passphrase = _passphrase(args.passphrase_env)
    private, public = User.keygen(args.out, passphrase, config=_cfg(args))
    if _emit(args, {"private_key": str(private), "public_key": str(public)}):
        return 0
    print(f"private key: {private} (mode 0600{', passphrase-protected' if passphrase else ''}; keep it secret)")
    print(f"public key:  {public} (send this one to the data owner)")


def _user_trust_owner(args):
    from dlheir.client.trust import trust_fingerprint, trust_path

    fp = trust_fingerprint(args.fingerprint)
    if not _emit(args, {"trusted": fp, "file": str(trust_path())}):
        print(f"grants signed by owner key {fp} are trusted (recorded in {trust_path()})")
    return 0


def _user_add_grant(args):
    from dlheir.client.api import User

    user = User(user_key=args.user_key, passphrase=_passphrase(args.passphrase_env), config=_cfg(args))
    path, grant, replaced = user.add_grant(args.grant_file)
    if user.trust_note:
        print(user.trust_note, file=sys.stderr)
    if _emit(args, {"grant": str(path), "collection": grant.collection, "replaced": replaced}):
        return 0
    print(f"grant for collection {grant.collection!r} installed as {path}"
          f"{' (replacing the older one)' if replaced else ''}; search it with: dlheir user search QUERY "
          f"--collection {grant.collection}")
    return 0


def _user_grants(args):
    from dlheir.client.api import User

    rows = User(user_key=args.user_key, passphrase=_passphrase(args.passphrase_env), config=_cfg(args)).held_grants()
    if _emit(args, rows):
        return 0
    if not rows:
        print("no grants held (install one with 'dlheir user add-grant FILE')")
        return 0
    print(f"{'collection':<24} {'mode':<14} {'server':<24} file")
    for r in rows:
        print(f"{r['collection']:<24} {r['mode']:<14} {r['server'] or '-':<24} {r['file']}"
              f"{'' if r['opens'] else '  (does not open: ' + r['error'] + ')'}")
    return 0


def _user_search(args):
    from dlheir.client.api import User

    user = User(args.grant, args.user_key, _passphrase(args.passphrase_env), server=args.server, triton=args.triton,
                model=args.model, config=_cfg(args), collection=args.collection)
    user.grant  # opened (and its owner's key checked) before anything else
    if user.trust_note:
        print(user.trust_note, file=sys.stderr)
    r = user.search(args.query, args.k, out=args.out, write=True)  # the CLI writes (default: a new folder)
    if _emit(args, r):
        return 0
    print(f"{'rank':>4} {'dist':>4}  {'id':>20}  file")
    for h in r.results:
        print(f"{h.rank:>4} {h.distance:>4}  {h.id:>20}  {h.file or '-'}")
    if r.sync is not None:
        s = r.sync
        print(f"private mode: {s['codes']} codes ranked on this machine from {s['pages']} sealed page(s) "
              f"({s['pages_cached']} cached, {s['pages_fetched']} fetched, {s['bytes_fetched'] / 1e3:.1f} KB, "
              f"{s['seconds'] * 1e3:.1f} ms)")
    t = r.seconds
    print(f"trapdoor {t['trapdoor'] * 1e3:.1f} ms, search {t['search'] * 1e3:.1f} ms, "
          f"fetch+decrypt {t['fetch_decrypt'] * 1e3:.1f} ms; {sum(1 for h in r.results if h.file)} images in "
          f"{r.out_dir}")


# --- collections, items, status ---------------------------------------------------------------
def _collections_list(args):
    owner = _owner(args)
    cols = owner.collections(args.admin_token_file)
    if _emit(args, cols):
        return 0
    if cols:
        print("\n".join(_collection_lines(cols)))
    elif owner.config.has_admin_token(args.admin_token_file):
        print("no collections")
    else:  # say where we looked: without the admin token only the tokens files held here count
        print(f"no collections: no admin token given, and no tokens files in {paths.dlheir_home()} (give "
              "--admin-token-file, or admin_token_file in the config file, to list the server's)")
    return 0


def _collections_describe(args):
    c = _owner(args).describe(args.name, args.admin_token_file)
    if _emit(args, c):
        return 0
    print(f"collection {c.name!r}: {c.mode}, {c.bits}-bit codes, {c.items} items, {_size(c.blob_bytes)} of "
          f"encrypted images, codes under key version {c.key_id}")
    if c.mode == "private":
        print(f"sealed code pages: {c.code_pages} ({_size(c.code_page_bytes)})")
    print(f"model: {c.model_fingerprint} ({c.image_size} px)" if c.model_fingerprint else
          "model: none recorded (a raw-code collection: codes are not checked against a model)")
    return 0


def _collections_delete(args):
    if not args.yes:
        raise UserError(f"deleting collection {args.name!r} removes every item it holds and cannot be undone: "
                        "add --yes")
    c = _owner(args).delete_collection(args.name, args.admin_token_file)
    if not _emit(args, {"deleted": c}):
        print(f"collection {c.name!r} deleted with its {c.items} items ({_size(c.blob_bytes)})")
    return 0


def _items_delete(args):
    owner = _owner(args)
    ids = list(args.ids) + (owner.item_ids(args.file, args.id_from, args.root, args.collection) if args.file else [])
    if not ids:
        raise UserError("give the ids to delete, or --file IMAGE")
    n = owner.delete_items(ids, args.collection, tokens=args.tokens)
    if not _emit(args, {"requested": ids, "deleted": n}):
        print(f"deleted {n} of {len(ids)} items" + ("" if n == len(ids) else " (the others were not stored)"))
    return 0


def _status(args):
    from dlheir.client.api import status

    st = status(args.server, args.triton, args.model, admin_token_file=args.admin_token_file, config=_cfg(args))
    code = 0 if st.server.up and st.triton.up else 1
    if _emit(args, st):
        return code
    print(f"config file: {st.config_file or '- (none; ' + str(_config.default_path()) + ' not found)'}")
    for key, setting in st.settings.items():
        if setting["from"] != "default":
            print(f"  {key} = {setting['value']}  ({setting['from']})")
    for s in (st.server, st.triton):
        print(f"{s.name:<13} {s.address:<22} {'up' if s.up else 'DOWN':<5} {s.detail}")
    for f in st.server.info.get("store_fronts") or []:  # several fronts over one store (admin token)
        stale = f["seen_s_ago"] > 5
        print(f"  front {f['address']:<21} {f['host']} pid {f['pid']}: applied change {f['applied']}, "
              f"{f['behind']} behind, {'GONE? ' if stale else ''}seen {f['seen_s_ago']:g} s ago")
    if st.collections is None:
        why = st.server.info.get("collections_error")
        print(f"collections: {'-' if not st.server.up else why or 'unknown'}")
    elif st.collections:
        print("\n".join(_collection_lines(st.collections)))
    else:
        print("collections: none" if st.server.info.get("admin") else
              "collections: none known (give the admin token to list all)")
    return code
