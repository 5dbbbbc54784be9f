"""CLI for data owners (`dlheir owner ...`) and query users (`dlheir user ...`)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from dlheir import paths
from dlheir.errors import UserError

HOME = f"${paths.HOME_ENV}"  # how help texts name the per-user key folder (see dlheir.paths)
DEFAULT_SERVER = "127.0.0.1:50051"
DEFAULT_TRITON = "127.0.0.1:8001"


def register(sub: argparse._SubParsersAction) -> None:
    own = sub.add_parser("owner", help="data owner: keys, collection, encrypted upload, grants")
    osub = own.add_subparsers(dest="action", metavar="ACTION")
    p = osub.add_parser(
        "init", help="KeyGen: create owner.key (AES-256 image key + separate code-transform secret), mode 0600",
        description="KeyGen: create a new owner key file holding a random 256-bit AES key for the images and a "
                    "separate random 256-bit secret for the keyed code transform. The file is created with mode "
                    "0600 and never overwritten. Keep it secret and keep a backup: without it the uploaded "
                    "images cannot be decrypted and new codes cannot be made comparable to the stored ones.")
    p.add_argument("--out", help=f"key file to create (default {HOME}/{paths.OWNER_KEY}; must not exist)")
    p.add_argument("--collection", help="record the collection these keys are for (grant then defaults to it)")
    p.set_defaults(func=_owner_init)

    p = osub.add_parser("create-collection", help="create a collection on the cloud server (needs the admin token)")
    p.add_argument("name")
    p.add_argument("--bits", type=int, default=48)
    p.add_argument("--server", default=DEFAULT_SERVER)
    p.add_argument("--admin-token-file", required=True, help="the server's admin token (e.g. DATA_DIR/admin.token)")
    p.add_argument("--out", help=f"where to keep the owner/reader tokens (default {HOME}/NAME{paths.TOKENS_SUFFIX}, "
                                 "mode 0600)")
    p.add_argument("--mode", choices=("server-ranked", "private"), default="server-ranked",
                   help="server-ranked (default): the server keeps transformed codes and ranks; private: the server "
                        "keeps no code, only sealed code pages, and users rank on their own machine (fixed at creation)")
    p.add_argument("--private", dest="mode", action="store_const", const="private", help="same as --mode private")
    p.set_defaults(func=_owner_create)

    p = osub.add_parser("upload", help="hash (Triton), encrypt and upload every image of a folder; resumable")
    p.add_argument("images_dir", metavar="IMAGES_DIR")
    p.add_argument("--key", help=f"owner key file (default {HOME}/{paths.OWNER_KEY})")
    p.add_argument("--collection", required=True)
    p.add_argument("--tokens", help=f"tokens file from create-collection (default {HOME}/COLLECTION{paths.TOKENS_SUFFIX})")
    p.add_argument("--server", default=None, help=f"cloud server (default: from the tokens file, else {DEFAULT_SERVER})")
    p.add_argument("--triton", default=DEFAULT_TRITON)
    p.add_argument("--batch-size", type=int, default=32)
    p.set_defaults(func=_owner_upload)

    p = osub.add_parser(
        "grant", help="issue one user a reader token and seal it with the collection's keys for their RSA public key",
        description="Key delivery: the cloud server issues a reader token for this user (owner token from the tokens "
                    "file; the server keeps only its hash, under the user's label); the grant file holds the "
                    "collection name, that token, the image keys and the transform secret, encrypted with a fresh "
                    "AES-256-GCM key wrapped with RSA-OAEP (SHA-256) for the user's public key. Only that user's "
                    "private key opens it; the file can travel over any channel. The public key is kept in "
                    f"{HOME}/{paths.READERS_DIR}/COLLECTION/ so that 'owner rotate' can re-grant the user. "
                    "Granting a user again issues a new token (the old grant stops working). With --reader-token "
                    "no server is contacted and the grant carries that token (e.g. the shared one).")
    p.add_argument("--key", help=f"owner key file (default {HOME}/{paths.OWNER_KEY})")
    p.add_argument("--user-pub", required=True, help="the user's public key (user.pub.pem from 'dlheir user keygen'); "
                                                     "a private key is refused")
    p.add_argument("--collection", help="collection name (default: the one recorded in the key file)")
    p.add_argument("--user", help="the user's label on the server (default: the public key's file name, "
                                  "alice.pub.pem -> alice)")
    p.add_argument("--replace", action="store_true",
                   help="hand an active label to this public key (its previous token stops working)")
    p.add_argument("--reader-token", help="seal this reader token instead of asking the server for the user's own "
                                          "(offline; e.g. the collection's shared token, which rotation revokes)")
    p.add_argument("--tokens", help=f"tokens file from create-collection (default {HOME}/COLLECTION{paths.TOKENS_SUFFIX})")
    p.add_argument("--server", default=None, help="cloud server (default: from the tokens file); also recorded in "
                                                  "the grant for the user's convenience")
    p.add_argument("--bits", type=int, default=None, help="code length recorded in the grant (checked at search)")
    p.add_argument("--out", help=f"grant file to create (default {HOME}/{paths.GRANT}; must not exist)")
    p.set_defaults(func=_owner_grant)

    def access_args(p):
        p.add_argument("--collection", help="collection name (default: the one recorded in the key file)")
        p.add_argument("--key", help=f"owner key file (default {HOME}/{paths.OWNER_KEY})")
        p.add_argument("--tokens", help=f"tokens file from create-collection (default {HOME}/COLLECTION"
                                        f"{paths.TOKENS_SUFFIX})")
        p.add_argument("--server", default=None, help=f"cloud server (default: from the tokens file, else {DEFAULT_SERVER})")

    p = osub.add_parser("grants", help="list the collection's readers: user, issued, revoked",
                        description="List every user label the collection's server knows a reader token for, when it "
                                    "was issued and when it was revoked, whether the shared reader token (version-1 "
                                    "grants) still works, and the key version of the stored codes.")
    access_args(p)
    p.add_argument("--json", action="store_true")
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
                    "image keys, which new grants carry; new uploads use the new key.")
    access_args(p)
    p.add_argument("--drop", action="append", default=[], metavar="USER",
                   help="do not re-grant this user (repeatable)")
    p.add_argument("--out-dir", help=f"folder for the new grants, USER.grant (default {HOME}/{paths.GRANTS_DIR}/"
                                     "COLLECTION/)")
    p.set_defaults(func=_owner_rotate)

    usr = sub.add_parser("user", help="query user: RSA key pair, encrypted search")
    usub = usr.add_subparsers(dest="action", metavar="ACTION")
    p = usub.add_parser(
        "keygen", help="create an RSA-3072 key pair: user.pem (0600) and user.pub.pem",
        description="Create an RSA-3072 key pair: the private key (PKCS#8 PEM, mode 0600, optionally encrypted "
                    "with a passphrase) and the public key next to it (NAME.pub.pem). Send the public key to the "
                    "data owner, who answers with a grant file only this private key can open. Existing files "
                    "are never overwritten.")
    p.add_argument("--out", help=f"private key file to create (default {HOME}/{paths.USER_KEY}; the public key "
                                 "goes next to it as NAME.pub.pem)")
    p.add_argument("--passphrase-env", metavar="VAR",
                   help="name of an environment variable holding a passphrase to encrypt the private key with")
    p.set_defaults(func=_user_keygen)

    p = usub.add_parser("search", help="TrapGen via Triton, search, fetch and decrypt the top k")
    p.add_argument("query", metavar="QUERY_IMAGE")
    p.add_argument("--grant", help=f"grant file from the owner (default {HOME}/{paths.GRANT})")
    p.add_argument("--user-key", help=f"your private key (default {HOME}/{paths.USER_KEY}; must be mode 0600)")
    p.add_argument("--passphrase-env", help="environment variable holding the private key's passphrase")
    p.add_argument("-k", type=int, default=20)
    p.add_argument("--out", default="results", help="folder for the decrypted images, created 0700; each image "
                                                    "is written 0600 (default results/)")
    p.add_argument("--server", default=None, help="cloud server (default: from the grant)")
    p.add_argument("--triton", default=DEFAULT_TRITON)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_user_search)


def _passphrase(var: str | None) -> str | None:
    if not var:
        return None
    if var not in os.environ:
        raise UserError(f"environment variable {var} is not set")
    if not os.environ[var]:
        raise UserError(f"environment variable {var} is empty; a passphrase cannot be empty")
    return os.environ[var]


def _owner_init(args):
    from dlheir.client.crypto import OwnerKeys

    path = OwnerKeys.generate(args.collection).save(paths.resolve(args.out, paths.OWNER_KEY, create=True))
    print(f"owner key written to {path} (mode 0600): keep it secret, keep a backup")


def _load_tokens(args, collection: str) -> dict:
    from dlheir.client.crypto import read_secret

    path = Path(args.tokens) if args.tokens else paths.default_path(paths.tokens_name(collection))
    raw = read_secret(path, "tokens file", " (from 'dlheir owner create-collection', or give --tokens)")
    try:
        doc = json.loads(raw)
        if not isinstance(doc, dict) or not all(isinstance(doc.get(k), str) for k in ("owner_token", "reader_token")):
            raise ValueError("owner_token or reader_token missing")
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not a tokens file from 'dlheir owner create-collection' ({exc})") from None
    return doc


def _owner_create(args):
    from dlheir.client.cloud import CloudClient
    from dlheir.client.crypto import read_secret, write_private
    from dlheir.contract import validate_bits

    validate_bits(args.bits)
    paths.tokens_name(args.name)  # a name that cannot be a file name stops here
    admin_token = read_secret(args.admin_token_file, "admin token file").decode("utf-8", "replace").strip()
    out = paths.resolve(args.out, paths.tokens_name(args.name), create=True)
    if out.exists():
        raise UserError(f"{out} already exists; refusing to overwrite")
    with CloudClient(args.server) as cloud:
        owner, reader = cloud.create_collection(args.name, args.bits, admin_token, private=args.mode == "private")
    doc = {"collection": args.name, "server": args.server, "bits": args.bits, "mode": args.mode,
           "owner_token": owner, "reader_token": reader}
    write_private(out, (json.dumps(doc, indent=2) + "\n").encode())
    print(f"collection {args.name!r} ({args.bits} bits, {args.mode}) created on {args.server}; tokens in {out} "
          f"(mode 0600)")


def _owner_upload(args):
    from dlheir.client.cloud import CloudClient
    from dlheir.client.crypto import OwnerKeys
    from dlheir.client.owner import image_files, upload_images
    from dlheir.client.triton import TritonHasher

    keys = OwnerKeys.load(paths.resolve(args.key, paths.OWNER_KEY))
    tokens = _load_tokens(args, args.collection)
    files = image_files(args.images_dir)
    if not files:
        raise UserError(f"no images found under {args.images_dir}")
    server = args.server or tokens.get("server") or DEFAULT_SERVER
    with CloudClient(server, tokens["owner_token"]) as cloud, TritonHasher(args.triton, batch_size=args.batch_size) as hasher:
        report = upload_images(files, keys, args.collection, cloud, hasher, args.batch_size)
    print(f"uploaded {report.uploaded} images ({report.bytes_uploaded / 1e6:.2f} MB) in {report.seconds:.1f}s: "
          f"{report.images_per_s:.1f} images/s, {report.mb_per_s:.2f} MB/s; {report.already_present} already present")
    for name, why in report.skipped:
        print(f"skipped {name}: {why}")
    return 1 if report.skipped and not (report.uploaded or report.already_present) else 0


def _owner_grant(args):
    from dlheir.client.access import default_label, issue_grant
    from dlheir.client.cloud import CloudClient
    from dlheir.client.crypto import OwnerKeys, make_grant, read_public_key_file, write_private

    pub = Path(args.user_pub)
    public_pem = read_public_key_file(pub)  # a private key stops here: never sealed, written or sent
    key_path = paths.resolve(args.key, paths.OWNER_KEY)
    keys = OwnerKeys.load(key_path)
    collection = args.collection or keys.collection
    if not collection:
        raise UserError(f"give --collection ({key_path} records no collection name)")
    user = paths.check_label(args.user) if args.user else None
    out = paths.resolve(args.out, paths.GRANT)
    if out.exists():
        raise UserError(f"{out} already exists; refusing to overwrite a grant")
    if args.reader_token is not None:  # offline: the caller's token (no per-user credential on the server)
        grant = make_grant(keys, public_pem, collection, args.reader_token, server=args.server, bits=args.bits,
                           user=user)
    else:
        tokens = _load_tokens(args, collection)
        server = args.server or tokens.get("server") or DEFAULT_SERVER
        user = user or paths.check_label(default_label(pub))
        with CloudClient(server, tokens["owner_token"]) as cloud:
            grant = issue_grant(keys, public_pem, collection, user, cloud, server=server,
                                bits=args.bits or tokens.get("bits"), replace=args.replace)
    out = paths.resolve(args.out, paths.GRANT, create=True)
    write_private(out, grant, "a grant")
    who = f" (user {user!r}, own reader token)" if args.reader_token is None else ""
    print(f"grant for {collection!r}{who} written to {out}; only the holder of the private key matching {pub} can "
          "open it")


def _access(args):
    """(collection, key path, owner CloudClient, server) for grants/revoke/rotate."""
    from dlheir.client.cloud import CloudClient
    from dlheir.client.crypto import OwnerKeys

    key_path = paths.resolve(args.key, paths.OWNER_KEY)
    collection = args.collection
    if not collection:
        collection = OwnerKeys.load(key_path).collection
        if not collection:
            raise UserError(f"give --collection ({key_path} records no collection name)")
    tokens = _load_tokens(args, collection)
    server = args.server or tokens.get("server") or DEFAULT_SERVER
    return collection, key_path, CloudClient(server, tokens["owner_token"]), server


def _when(seconds: float) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds)) if seconds else "-"


def _owner_grants(args):
    collection, _, cloud, _ = _access(args)
    with cloud:
        answer = cloud.list_readers(collection)
    readers = [{"user": r.user, "created": r.created, "revoked": r.revoked or None} for r in answer.readers]
    if args.json:
        print(json.dumps({"collection": collection, "key_id": answer.key_id or 1,
                          "shared_token_active": answer.shared_token_active, "readers": readers}, indent=2))
        return 0
    print(f"collection {collection!r}: codes under key version {answer.key_id or 1}; shared reader token "
          f"{'active' if answer.shared_token_active else 'revoked'}")
    print(f"{'user':<24} {'issued':<19}  {'revoked':<19}")
    for r in answer.readers:
        print(f"{r.user:<24} {_when(r.created):<19}  {_when(r.revoked):<19}")
    return 0


def _owner_revoke(args):
    if bool(args.user) == bool(args.shared_token):
        raise UserError("give a USER to revoke, or --shared-token")
    user = paths.check_label(args.user) if args.user else None
    collection, _, cloud, _ = _access(args)
    with cloud:
        revoked = cloud.revoke_reader(collection, user, shared_token=args.shared_token)
    what = f"user {user!r}" if user else "the shared reader token"
    print(f"{what} of {collection!r} {'revoked: its token is refused from now on' if revoked else 'was already revoked'}")
    return 0


def _owner_rotate(args):
    from dlheir.client.access import rotate

    collection, key_path, cloud, server = _access(args)
    with cloud:
        report = rotate(key_path, collection, cloud, server=server, drop=args.drop, out_dir=args.out_dir)
    print(f"collection {collection!r}: key version {report.from_key} -> {report.to_key} (added to {key_path}); "
          f"{report.items} stored codes re-keyed on the server; {len(report.revoked)} reader token(s) revoked")
    for user, path in sorted(report.granted.items()):
        print(f"new grant for {user!r}: {path}")
    for user in report.dropped:
        print(f"not re-granted (--drop): {user!r}")
    for user in report.no_public_key:
        print(f"not re-granted, no kept public key: {user!r} (grant again with 'dlheir owner grant --user {user}')")
    return 0


def _user_keygen(args):
    from dlheir.client.crypto import generate_user_keypair

    passphrase = _passphrase(args.passphrase_env)
    private, public = generate_user_keypair(paths.resolve(args.out, paths.USER_KEY, create=True), passphrase)
    print(f"private key: {private} (mode 0600{', passphrase-protected' if passphrase else ''}; keep it secret)")
    print(f"public key:  {public} (send this one to the data owner)")


def _user_search(args):
    from dlheir.client.cloud import CloudClient
    from dlheir.client.crypto import open_grant, read_private_key_file
    from dlheir.client.private import open_local
    from dlheir.client.triton import TritonHasher
    from dlheir.client.user import search_image, write_results

    grant_path = paths.resolve(args.grant, paths.GRANT)
    key_path = paths.resolve(args.user_key, paths.USER_KEY)
    for path, what in ((grant_path, "grant"), (key_path, "private key"), (args.query, "query image")):
        if not Path(path).is_file():
            raise UserError(f"{what} not found: {path}")
    private_pem = read_private_key_file(key_path)  # a public key, or a key others can read, stops here
    grant = open_grant(grant_path.read_bytes(), private_pem, _passphrase(args.passphrase_env))
    server = args.server or grant.server or DEFAULT_SERVER
    with CloudClient(server, grant.reader_token) as cloud, TritonHasher(args.triton) as hasher:
        local = open_local(cloud, grant)  # one round trip: the mode, and (private mode) the new sealed pages
        first_sync = local.last_sync if local is not None else None
        hits, timings = search_image(args.query, grant, cloud, hasher, args.k, local=local)
    files = write_results(hits, args.out)
    if args.json:
        print(json.dumps({"query": args.query, "results": [
            {"rank": h.rank, "id": h.id, "distance": h.distance, "name": h.name, "file": str(p)}
            for h, p in zip(hits, files)], "ranking": "server" if local is None else "local (private mode)",
            "sync": None if first_sync is None else {"pages_cached": first_sync.pages_cached,
                                                     "pages_fetched": first_sync.pages_fetched,
                                                     "bytes_fetched": first_sync.bytes_fetched,
                                                     "seconds": first_sync.seconds},
            "seconds": {"trapdoor": timings.trapdoor_s, "sync": timings.sync_s, "search": timings.search_s,
                        "fetch_decrypt": timings.fetch_decrypt_s}}, indent=2))
        return 0
    print(f"{'rank':>4} {'dist':>4}  {'id':>20}  file")
    for h, p in zip(hits, files):
        print(f"{h.rank:>4} {h.distance:>4}  {h.id:>20}  {p}")
    if first_sync is not None:
        print(f"private mode: {len(local)} codes ranked on this machine from {local.pages} sealed page(s) "
              f"({first_sync.pages_cached} cached, {first_sync.pages_fetched} fetched, "
              f"{first_sync.bytes_fetched / 1e3:.1f} KB, {first_sync.seconds * 1e3:.1f} ms)")
    print(f"trapdoor {timings.trapdoor_s * 1e3:.1f} ms, search {timings.search_s * 1e3:.1f} ms, "
          f"fetch+decrypt {timings.fetch_decrypt_s * 1e3:.1f} ms; {len(files)} images in {args.out}")
