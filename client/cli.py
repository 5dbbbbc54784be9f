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
        "grant", help="seal the collection's keys and reader token for one user's RSA public key",
        description="Key delivery: write a grant file holding the collection name, its reader token, the image "
                    "key and the transform secret, encrypted with a fresh AES-256-GCM key that is wrapped with "
                    "RSA-OAEP (SHA-256) for the user's public key. Only that user's private key opens it; the "
                    "file can travel over any channel.")
    p.add_argument("--key", help=f"owner key file (default {HOME}/{paths.OWNER_KEY})")
    p.add_argument("--user-pub", required=True, help="the user's public key (user.pub.pem from 'dlheir user keygen'); "
                                                     "a private key is refused")
    p.add_argument("--collection", help="collection name (default: the one recorded in the key file)")
    p.add_argument("--reader-token", help="the collection's reader token (default: from the tokens file)")
    p.add_argument("--tokens", help=f"tokens file from create-collection (default {HOME}/COLLECTION{paths.TOKENS_SUFFIX})")
    p.add_argument("--server", default=None, help="server address recorded in the grant for the user's convenience")
    p.add_argument("--bits", type=int, default=None, help="code length recorded in the grant (checked at search)")
    p.add_argument("--out", help=f"grant file to create (default {HOME}/{paths.GRANT}; must not exist)")
    p.set_defaults(func=_owner_grant)

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
    from dlheir.codes import validate_bits

    validate_bits(args.bits)
    paths.tokens_name(args.name)  # a name that cannot be a file name stops here
    admin_token = read_secret(args.admin_token_file, "admin token file").decode("utf-8", "replace").strip()
    out = paths.resolve(args.out, paths.tokens_name(args.name), create=True)
    if out.exists():
        raise UserError(f"{out} already exists; refusing to overwrite")
    with CloudClient(args.server) as cloud:
        owner, reader = cloud.create_collection(args.name, args.bits, admin_token)
    doc = {"collection": args.name, "server": args.server, "bits": args.bits, "owner_token": owner, "reader_token": reader}
    write_private(out, (json.dumps(doc, indent=2) + "\n").encode())
    print(f"collection {args.name!r} ({args.bits} bits) created on {args.server}; tokens in {out} (mode 0600)")


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
    from dlheir.client.crypto import OwnerKeys, make_grant, read_public_key_file, write_private

    pub = Path(args.user_pub)
    public_pem = read_public_key_file(pub)  # a private key stops here: never sealed, written or sent
    key_path = paths.resolve(args.key, paths.OWNER_KEY)
    keys = OwnerKeys.load(key_path)
    collection = args.collection or keys.collection
    if not collection:
        raise UserError(f"give --collection ({key_path} records no collection name)")
    reader, server, bits = args.reader_token, args.server, args.bits
    if reader is None:
        tokens = _load_tokens(args, collection)
        reader, server, bits = tokens["reader_token"], server or tokens.get("server"), bits or tokens.get("bits")
    grant = make_grant(keys, public_pem, collection, reader, server=server, bits=bits)
    out = paths.resolve(args.out, paths.GRANT, create=True)
    write_private(out, grant, "a grant")
    print(f"grant for {collection!r} written to {out}; only the holder of the private key matching {pub} can open it")


def _user_keygen(args):
    from dlheir.client.crypto import generate_user_keypair

    passphrase = _passphrase(args.passphrase_env)
    private, public = generate_user_keypair(paths.resolve(args.out, paths.USER_KEY, create=True), passphrase)
    print(f"private key: {private} (mode 0600{', passphrase-protected' if passphrase else ''}; keep it secret)")
    print(f"public key:  {public} (send this one to the data owner)")


def _user_search(args):
    from dlheir.client.cloud import CloudClient
    from dlheir.client.crypto import open_grant, read_private_key_file
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
        hits, timings = search_image(args.query, grant, cloud, hasher, args.k)
    files = write_results(hits, args.out)
    if args.json:
        print(json.dumps({"query": args.query, "results": [
            {"rank": h.rank, "id": h.id, "distance": h.distance, "name": h.name, "file": str(p)}
            for h, p in zip(hits, files)], "seconds": {"trapdoor": timings.trapdoor_s, "search": timings.search_s,
                                                      "fetch_decrypt": timings.fetch_decrypt_s}}, indent=2))
        return 0
    print(f"{'rank':>4} {'dist':>4}  {'id':>20}  file")
    for h, p in zip(hits, files):
        print(f"{h.rank:>4} {h.distance:>4}  {h.id:>20}  {p}")
    print(f"trapdoor {timings.trapdoor_s * 1e3:.1f} ms, search {timings.search_s * 1e3:.1f} ms, "
          f"fetch+decrypt {timings.fetch_decrypt_s * 1e3:.1f} ms; {len(files)} images in {args.out}")
