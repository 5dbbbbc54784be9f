"""The Python API of DLHEIR's clients: :class:`Owner`, :class:`User` and :func:`status`.

The ``dlheir owner|user|collections|items|status`` commands are thin layers over this module:
they parse flags, call one method and print what it returns (``--json``: the same dataclass as
JSON), so the CLI and the API give the same results.

    import dlheir

    owner = dlheir.Owner()                      # addresses, key paths: dlheir.config (file, env)
    owner.init_keys()                           # -> $DLHEIR_HOME/owner.key
    owner.create_collection("photos")           # bits from the Triton model; admin token from config/env
    summary = owner.upload("my_images/", "photos")       # UploadSummary
    owner.grant("alice.pub.pem", "photos")      # -> $DLHEIR_HOME/grant.bin
    print(owner.collections())                  # [CollectionInfo(...)]

    owner.upload({7: numpy_array, 8: pil_image, 9: jpeg_bytes}, "photos")  # in memory, with ids

    with dlheir.User() as user:                 # grant and private key from the key folder
        result = user.search("query.jpg", k=10)  # SearchResult: .results, each Hit (rank, id, distance, name, image)
        results = user.search([path, jpeg_bytes, numpy_array, pil_image], k=10)  # one SearchResult per query

    from dlheir.client.api import hash_images
    codes = hash_images(images, onnx="model.onnx")  # uint8 [B, L] in-process; triton=... for Triton's (the same)

Images: wherever the API takes one it takes a path, encoded bytes, a numpy uint8 array (HxW or
HxWxC) or a PIL image; a list of them is a batch (:mod:`dlheir.client.images`). Nothing is
written to disk unless asked (``search(..., out=FOLDER)``).

Settings: every constructor argument left as None comes from :mod:`dlheir.config` (flag >
environment > config file > built-in default; for the server, a tokens file's or grant's
recorded address comes before the built-in default). Connections are opened on first use, kept
open between calls and closed by :meth:`close` (or at the end of a ``with`` block).

**Errors.** Everything a caller can fix raises :class:`dlheir.errors.UserError` (one line,
what the CLI prints after ``dlheir: error:``); subclasses say more:
:class:`dlheir.client.cloud.CloudError` (the cloud server answered an error or cannot be
reached: ``.code`` is the ``grpc.StatusCode``, ``.address``), :class:`dlheir.client.triton.HashError`
(Triton refused an image), :class:`dlheir.client.crypto.GrantError` (a grant that this key
cannot open), :class:`dlheir.client.crypto.BlobAuthenticationError` (a blob that does not
decrypt). Invalid code lengths raise :class:`dlheir.contract.ContractError` (a ``ValueError``).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from dlheir import config as _config
from dlheir import paths
from dlheir.errors import UserError
from dlheir.client.owner import UploadRates

__all__ = ["Owner", "User", "status", "hash_images", "CollectionInfo", "UploadSummary", "Hit", "SearchResult", "Readers",
           "ServiceStatus", "Status", "to_json"]

MODES = {0: "server-ranked", 1: "private"}


# --- results: plain dataclasses ---------------------------------------------------------------
@dataclass
class CollectionInfo:
    """A collection as the server reports it."""

    name: str
    bits: int
    items: int
    blob_bytes: int
    mode: str  # "server-ranked" or "private"
    key_id: int  # the owner's key version the stored codes are under
    code_pages: int = 0  # private mode: sealed code pages and their bytes
    code_page_bytes: int = 0
    model_fingerprint: str | None = None  # the model its codes come from (None: a raw-code collection)
    image_size: int | None = None  # that model's image size S
    served: bool | None = None  # dlheir status: Triton's model is the one its codes come from (None: unknown)

    @classmethod
    def from_pb(cls, info) -> "CollectionInfo":
        return cls(info.name, int(info.bits), int(info.items), int(info.blob_bytes), MODES.get(int(info.mode), "?"),
                   int(info.key_id or 1), int(info.code_pages), int(info.code_page_bytes),
                   info.model_fingerprint or None, int(info.image_size) or None)


@dataclass
class Reader:
    user: str
    created: float  # seconds since the epoch
    revoked: float | None  # None while active


@dataclass
class Readers:
    """Who holds a reader token for a collection (``Owner.grants``)."""

    collection: str
    key_id: int
    shared_token_active: bool
    readers: list[Reader]


@dataclass
class UploadSummary(UploadRates):
    """What ``Owner.upload`` did. ``duplicates``: (file, the file with the same id earlier in this
    upload) -- not uploaded again; ``already_present``: files whose id the server already held (not
    sent; with ``replace`` they are sent and counted in ``replaced``); ``skipped``: (file, reason)."""

    collection: str
    id_from: str
    files: int
    uploaded: int
    replaced: int
    already_present: list[str]
    duplicates: list[tuple[str, str]]
    skipped: list[tuple[str, str]]
    bytes_uploaded: int
    seconds: float


@dataclass
class Hit:
    rank: int
    id: int
    distance: int
    name: str  # the original file name (from the decrypted blob)
    file: Path | None = None  # where it was written (None if not written)
    image: bytes = field(default=b"", repr=False)  # the decrypted image, as the owner uploaded it

    def to_pil(self):
        """The decrypted image as a PIL image."""
        import io

        from PIL import Image

        return Image.open(io.BytesIO(self.image))


@dataclass
class SearchResult:
    """One query's top k. ``query``: its path, or what it was (e.g. "array 32x32x3")."""

    query: str
    collection: str
    ranking: str  # "server" or "local (private mode)"
    results: list[Hit]
    out_dir: Path | None
    seconds: dict[str, float]  # trapdoor, sync, search, fetch_decrypt
    sync: dict[str, Any] | None = None  # private mode: pages cached / fetched, bytes, seconds


@dataclass
class ServiceStatus:
    name: str  # "cloud server" or "triton"
    address: str
    up: bool
    detail: str  # one line: what answered, or why not
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Status:
    config_file: str | None
    server: ServiceStatus
    triton: ServiceStatus
    collections: list[CollectionInfo] | None  # None when no token could list them
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)  # key -> {"value", "from"} (no secrets)


def to_json(obj: Any) -> Any:
    """A result dataclass (or list of them) as JSON-ready data: paths as strings, image bytes left out."""
    if isinstance(obj, list):
        return [to_json(o) for o in obj]
    data = asdict(obj) if hasattr(obj, "__dataclass_fields__") else obj

    def clean(value):
        if hasattr(value, "__dataclass_fields__"):
            value = asdict(value)
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if k != "image"}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return str(value) if isinstance(value, Path) else value

    out = clean(data)
    for prop in ("images_per_s", "mb_per_s"):
        if hasattr(obj, prop):
            out[prop] = round(getattr(obj, prop), 3)
    return out


def _cfg(cfg: "_config.Config | str | os.PathLike | None") -> "_config.Config":
    return cfg if isinstance(cfg, _config.Config) else _config.load(cfg)


def _server(cfg: "_config.Config", flag: str | None, recorded: str | None) -> str:
    """flag > env > config file > the address a tokens file or grant recorded > built-in default."""
    return cfg.get("server", flag) if cfg.given("server", flag) else (recorded or cfg.get("server"))


def _hasher(cfg: "_config.Config", triton: str | None, model: str | None, batch_size: int = 16,
            onnx: str | os.PathLike | None = None):
    """A TritonHasher (the configured Triton, or ``triton``), or with ``onnx`` an in-process OnnxHasher."""
    if onnx is not None:
        from dlheir.client.onnx_hasher import OnnxHasher

        return OnnxHasher(onnx, batch_size=batch_size)
    from dlheir.client.triton import TritonHasher

    return TritonHasher(cfg.get("triton", triton), batch_size=batch_size, model=cfg.get("model", model),
                        tls_ca=cfg.get("triton_tls_ca"), insecure=cfg.insecure(None))


def _cloud(client: "Owner | User", address: str, token: str | None):
    """``client``'s open connection to ``address`` with ``token`` (made on first use, with its TLS CA
    and cleartext setting), as a context manager that leaves it open: :meth:`_Connections.close`
    closes it."""
    return contextlib.nullcontext(client._cloud_client(address, token))


class _Connections:
    """The gRPC connections an Owner or User keeps open between calls (one per server address and
    token, and one hasher), closed by :meth:`close` or at the end of a ``with`` block. A call
    after ``close`` opens new ones."""

    tls_ca: str | None
    insecure: bool
    config: "_config.Config"
    _triton: str | None
    _model: str | None
    _onnx: str | os.PathLike | None

    def _init_connections(self) -> None:
        self._clouds: dict[tuple[str, str | None], Any] = {}
        self._hash_client: Any = None

    def _cloud_client(self, address: str | Sequence[str], token: str | None):
        if not isinstance(address, str):  # a list of fronts' addresses: one key
            address = ",".join(str(a).strip() for a in address)
        key = (address, token)
        if key not in self._clouds:
            from dlheir.client.cloud import CloudClient

            self._clouds[key] = CloudClient(address, token, tls_ca=self.tls_ca, insecure=self.insecure)
        return self._clouds[key]

    def _hashing(self, batch_size: int = 16):
        """The open hasher (Triton, or ONNX Runtime with ``onnx``) as a context manager that leaves it open."""
        if self._hash_client is None:
            self._hash_client = _hasher(self.config, self._triton, self._model, batch_size, self._onnx)
        self._hash_client.batch_size = batch_size
        return contextlib.nullcontext(self._hash_client)

    @property
    def connections(self) -> list:
        """The connections open now: CloudClients (``.channel``), then the hasher if one is open."""
        return [*self._clouds.values(), *([self._hash_client] if self._hash_client is not None else [])]

    def close(self) -> None:
        """Close every open connection (the object stays usable: a later call opens new ones)."""
        clients, self._clouds, hasher, self._hash_client = list(self._clouds.values()), {}, self._hash_client, None
        for c in [*clients, *([hasher] if hasher is not None else [])]:
            try:
                c.close()
            except Exception:  # noqa: BLE001 - closing one must not keep the others open
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _images():
    from dlheir.client import images

    return images


MAX_ID = 2 ** 63 - 1


def _item_id(value: Any, where: str) -> int:
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= int(value) <= MAX_ID:
        raise _images().ImageTypeError(f"{where}: an item id is an int from 0 to 2**63 - 1, got {value!r:.60}")
    return int(value)


def _upload_entries(images: Any) -> list[tuple[str, Any, int | None]]:
    """What ``Owner.upload`` was given -> (name, Path or encoded bytes, given id or None) per image."""
    from dlheir.client.owner import image_files

    im = _images()
    if isinstance(images, (str, os.PathLike)):
        return [(rel, path, None) for rel, path in image_files(images)]
    if isinstance(images, dict):
        pairs = list(images.items())
    elif isinstance(images, (list, tuple)) and images and all(isinstance(x, tuple) and len(x) == 2 for x in images):
        pairs = list(images)
    else:
        batch, _ = im.as_batch(images, "images")
        out: list[tuple[str, Any, int | None]] = []
        for n, x in enumerate(batch):
            if im.is_path(x):
                out += [(rel, path, None) for rel, path in image_files(x)]
            else:
                out.append((f"image-{n}", im.encode(x, im.label(x, n)), None))
        return out
    out = []
    for n, (given, x) in enumerate(pairs):
        i = _item_id(given, f"images[{n}] id")
        if not im.is_image(x):
            raise im.ImageTypeError(f"image of id {i} is {im.describe(x)}; expected {im.ACCEPTED}")
        if im.is_path(x):
            if not Path(x).is_file():
                raise UserError(f"image of id {i}: file not found: {x}")
            out.append((Path(x).name, Path(x), i))
        else:
            out.append((str(i), im.encode(x, f"image of id {i}"), i))
    return out


# --- the data owner ---------------------------------------------------------------------------
class Owner(_Connections):
    """The data owner: keys, collections, encrypted uploads, grants.

    ``key``: the owner key file (default ``owner_key`` setting, else ``$DLHEIR_HOME/owner.key``);
    ``server``, ``triton``, ``model``, ``tls_ca``, ``insecure``: override the configured ones
    (``insecure``: allow a server that is not loopback without TLS, tokens in the clear); ``config``: a
    :class:`dlheir.config.Config` or a config file path; ``onnx``: an exported ONNX file to hash with
    in this process (ONNX Runtime) instead of Triton. A collection's owner token is read from
    its tokens file (``$DLHEIR_HOME/COLLECTION.tokens.json``, or ``tokens=``). Connections stay
    open between calls: ``with Owner() as owner:`` or :meth:`close` closes them."""

    def __init__(self, server: str | None = None, triton: str | None = None, model: str | None = None,
                 key: str | os.PathLike | None = None, tls_ca: str | None = None,
                 config: "_config.Config | str | os.PathLike | None" = None, insecure: bool | None = None,
                 onnx: str | os.PathLike | None = None) -> None:
        self._init_connections()
        self.config = _cfg(config)
        self._server_flag, self._triton, self._model, self._onnx = server, triton, model, onnx
        self.key_path = paths.resolve(self.config.get("owner_key", key), paths.OWNER_KEY)
        self.tls_ca = self.config.get("tls_ca", tls_ca)
        self.insecure = self.config.insecure(insecure)

    # helpers
    def server_for(self, tokens: dict | None = None) -> str:
        return _server(self.config, self._server_flag, (tokens or {}).get("server"))

    def _collection(self, collection: str | None) -> str:
        name = self.config.get("collection", collection)
        if not name and self.key_path.is_file():
            from dlheir.client.crypto import OwnerKeys

            name = OwnerKeys.load(self.key_path).collection
        if not name:
            raise UserError("give a collection (--collection, or collection in the config file; "
                            f"{self.key_path} records none)")
        paths.tokens_name(name)
        return name

    def tokens(self, collection: str, tokens: str | os.PathLike | None = None) -> dict:
        """The tokens file of ``collection`` (written by :meth:`create_collection`)."""
        from dlheir.client.crypto import read_secret

        path = Path(tokens) if tokens else paths.default_path(paths.tokens_name(collection))
        raw = read_secret(path, "tokens file", " (from 'dlheir owner create-collection', or give --tokens)")
        try:
            doc = json.loads(raw)
            if not isinstance(doc, dict) or not all(isinstance(doc.get(k), str) for k in ("owner_token", "reader_token")):
                raise ValueError("owner_token or reader_token missing")
        except (OSError, ValueError) as exc:
            raise UserError(f"{path}: not a tokens file from 'dlheir owner create-collection' ({exc})") from None
        return doc

    def _owner_cloud(self, collection: str, tokens: str | os.PathLike | None = None):
        doc = self.tokens(collection, tokens)
        return _cloud(self, self.server_for(doc), doc["owner_token"])

    def keys(self):
        from dlheir.client.crypto import OwnerKeys

        return OwnerKeys.load(self.key_path)

    # keys and collections
    def init_keys(self, collection: str | None = None, out: str | os.PathLike | None = None) -> Path:
        """KeyGen: a new owner key file (mode 0600, never overwritten); returns its path."""
        from dlheir.client.crypto import OwnerKeys

        target = paths.resolve(out if out is not None else self.config.get("owner_key"), paths.OWNER_KEY, create=True)
        return OwnerKeys.generate(collection).save(target)

    def migrate_keys(self) -> tuple[Path, Path, list[str]]:
        """Convert the key file from format 1 or 2 to 3 (:func:`dlheir.client.crypto.migrate_key_file`):
        (key file, backup of the old one, the collections whose tokens files are in the key folder,
        each to be re-created and uploaded again)."""
        from dlheir.client.crypto import migrate_key_file

        _, backup = migrate_key_file(self.key_path)
        names = sorted(p.name[: -len(paths.TOKENS_SUFFIX)] for p in paths.dlheir_home().glob("*" + paths.TOKENS_SUFFIX))
        return self.key_path, backup, names

    def fingerprint(self) -> str:
        """The fingerprint of the owner's grant-signing key, to give users out of band."""
        return self.keys().fingerprint

    def create_collection(self, name: str, bits: int | None = None, private: bool = False,
                          admin_token_file: str | os.PathLike | None = None,
                          tokens_out: str | os.PathLike | None = None) -> CollectionInfo:
        """Create ``name`` on the server (admin token) for the Triton model (its code length, image
        size and fingerprint: uploads and searches with another model are refused), or, with
        ``bits`` alone, a raw-code collection tied to no model. The owner/reader tokens go into a
        new tokens file (mode 0600; path in ``last_tokens_file``)."""
        from dlheir.client.crypto import write_private
        from dlheir.client.owner import create_collection, model_binding

        paths.tokens_name(name)  # a name that cannot be a file name stops here
        admin_token = self.config.admin_token(admin_token_file)
        out = paths.resolve(tokens_out, paths.tokens_name(name), create=True)
        if out.exists():
            raise UserError(f"{out} already exists; refusing to overwrite")
        keys = self.keys()  # the collection's keys are made with it: no key file, no collection
        mode = "private" if private else "server-ranked"
        if bits is None:
            with self._hashing() as hasher:
                binding = model_binding(hasher)
        else:
            binding = model_binding(None, bits)
        server = self.server_for()
        with _cloud(self, server, None) as cloud:
            owner, reader = create_collection(cloud, name, admin_token, binding, private=private)
            # a new uid and keys for the name, recorded only once the server created it (an existing
            # collection of that name keeps its keys); a crash right here leaves a collection whose keys
            # this key file lacks: 'owner upload' then says to re-create it
            keys.register(name, mode).replace_file(self.key_path)
        with _cloud(self, server, owner) as cloud:
            info = CollectionInfo.from_pb(cloud.stats(name))
        doc = {"collection": name, "server": server, "bits": binding.bits, "mode": mode, "owner_token": owner,
               "reader_token": reader}
        write_private(out, (json.dumps(doc, indent=2) + "\n").encode())
        self.last_tokens_file = out
        return info

    def collections(self, admin_token_file: str | os.PathLike | None = None) -> list[CollectionInfo]:
        """Every collection on the server with the admin token (when one is configured), else the
        collections whose tokens files are in the key folder."""
        # a token given anywhere must work (an unreadable one is an error, not "no collections")
        admin = self.config.admin_token(admin_token_file) if self.config.has_admin_token(admin_token_file) else None
        if admin is not None:
            with _cloud(self, self.server_for(), None) as cloud:
                return sorted((CollectionInfo.from_pb(c) for c in cloud.list_collections(admin)), key=lambda c: c.name)
        found = []
        for path in sorted(paths.dlheir_home().glob("*" + paths.TOKENS_SUFFIX)):
            name = path.name[: -len(paths.TOKENS_SUFFIX)]
            try:
                found.append(self.describe(name))
            except UserError:
                continue  # a collection deleted since, or on another server
        return found

    def describe(self, name: str, admin_token_file: str | os.PathLike | None = None) -> CollectionInfo:
        """One collection: with its tokens file (owner token), else with the admin token."""
        paths.tokens_name(name)
        if paths.default_path(paths.tokens_name(name)).is_file() and admin_token_file is None:
            with self._owner_cloud(name) as cloud:
                return CollectionInfo.from_pb(cloud.stats(name))
        admin = self.config.admin_token(admin_token_file)
        with _cloud(self, self.server_for(), None) as cloud:
            for c in cloud.list_collections(admin):
                if c.name == name:
                    return CollectionInfo.from_pb(c)
        raise UserError(f"no collection named {name!r} on {self.server_for()}")

    def delete_collection(self, name: str, admin_token_file: str | os.PathLike | None = None) -> CollectionInfo:
        """Delete ``name`` and everything it holds (admin token); its tokens file is removed too.
        Returns what it held."""
        paths.tokens_name(name)
        admin = self.config.admin_token(admin_token_file)
        tokens_file = paths.default_path(paths.tokens_name(name))
        recorded = None
        if tokens_file.is_file():
            try:
                recorded = self.tokens(name).get("server")
            except UserError:
                pass
        with _cloud(self, _server(self.config, self._server_flag, recorded), None) as cloud:
            info = CollectionInfo.from_pb(cloud.delete_collection(name, admin))
        tokens_file.unlink(missing_ok=True)  # its tokens open nothing any more
        return info

    # items
    def item_ids(self, files: Iterable[str | os.PathLike], id_from: str = "content",
                 root: str | os.PathLike | None = None, collection: str | None = None) -> list[int]:
        """The ids ``upload`` gives these files (``id_from`` "content", or "path" relative to
        ``root``), keyed with the collection's id key (the server cannot compute them)."""
        from dlheir.ids import keyed_content_id, keyed_path_id

        id_key = self.keys().for_collection(self._collection(collection), self.key_path).id_key
        out = []
        for f in files:
            f = Path(f)
            if id_from == "content":
                try:
                    out.append(keyed_content_id(id_key, f.read_bytes()))
                except OSError as exc:
                    raise UserError(f"cannot read {f}: {exc.strerror or exc}") from None
            elif id_from == "path":
                if root is None:
                    raise UserError("ids from paths need the folder they were uploaded from (--root)")
                try:
                    out.append(keyed_path_id(id_key, f.resolve().relative_to(Path(root).resolve())))
                except ValueError:
                    raise UserError(f"{f} is not inside --root {root}: path ids are relative to the uploaded "
                                    "folder") from None
            else:
                raise UserError(f"unknown id rule {id_from!r} (content or path)")
        return out

    def upload(self, images: Any, collection: str | None = None, id_from: str = "content",
               replace: bool = False, batch_size: int = 32, progress: bool | None = None,
               tokens: str | os.PathLike | None = None) -> UploadSummary:
        """Hash, encrypt and upload images. ``images``: a folder (every image under it) or an image
        file; a list of files, folders or in-memory images; or in-memory images with their ids, as a
        dict ``{id: image}`` or a list of ``(id, image)``. An image is a path, encoded bytes, a numpy
        uint8 array (HxW or HxWxC) or a PIL image (arrays and PIL images are stored as PNG).

        Ids given are used as they are (ints from 0 to 2**63 - 1); the others follow ``id_from``:
        "content" (default: a keyed hash of the encoded bytes; the same image twice is one item) or
        "path" (files only: the path relative to the folder given, a file's name for a file). Items
        whose id the server holds are not sent unless ``replace``; items repeating an id of this
        upload are reported in ``duplicates``."""
        from dlheir.client.owner import upload_images
        from dlheir.ids import ID_RULES, keyed_content_id, keyed_path_id

        if id_from not in ID_RULES:
            raise UserError(f"unknown id rule {id_from!r}: {' or '.join(ID_RULES)}")
        entries = _upload_entries(images)  # (name, path or bytes, given id or None)
        collection = self._collection(collection)
        keys = self.keys()
        id_key = keys.for_collection(collection, self.key_path).id_key
        doc = self.tokens(collection, tokens)
        if not entries:
            raise UserError(f"no images found under {images}" if isinstance(images, (str, os.PathLike))
                            else "no images given")
        first: dict[int, str] = {}
        kept, ids, duplicates, skipped = [], [], [], []
        for rel, source, given in entries:
            if given is not None:
                i = given
            elif id_from == "content":
                try:
                    i = keyed_content_id(id_key, source if isinstance(source, bytes) else Path(source).read_bytes())
                except OSError as exc:
                    skipped.append((rel, exc.strerror or str(exc)))
                    continue
            elif isinstance(source, bytes):
                raise UserError(f"{rel}: an in-memory image has no path for --id-from path ids: give its id "
                                "({id: image} or [(id, image)]) or use content ids")
            else:
                i = keyed_path_id(id_key, rel)
            if isinstance(source, bytes) and not Path(rel).suffix:
                rel = f"{rel if given is not None else i}{_images().extension(source)}"  # the name stored in the blob
            if i in first:
                duplicates.append((rel, first[i]))
                continue
            first[i] = rel
            kept.append((rel, source))
            ids.append(i)
        show = not _config.quiet() if progress is None else progress  # a bar, or timed lines in a log
        with _cloud(self, self.server_for(doc), doc["owner_token"]) as cloud:
            present = set()
            for start in range(0, len(ids), 50_000):
                present |= cloud.contains(collection, ids[start:start + 50_000])
            if present >= set(ids) and not replace:  # all stored: nothing to hash, Triton need not be up
                from dlheir.client.owner import UploadReport, collection_keys

                collection_keys(keys, collection, cloud.stats(collection))  # the key file's mode and version still
                report = UploadReport(already_present=len(ids))
            else:
                with self._hashing(batch_size) as hasher:
                    report = upload_images(kept, keys, collection, cloud, hasher, batch_size, progress=show, ids=ids,
                                           replace=replace)
        return UploadSummary(collection, id_from, len(entries), report.uploaded, report.replaced,
                             [] if replace else [rel for (rel, _), i in zip(kept, ids) if i in present],
                             duplicates, skipped + list(report.skipped), report.bytes_uploaded, report.seconds)

    def delete_items(self, ids: Iterable[int], collection: str | None = None,
                     tokens: str | os.PathLike | None = None) -> int:
        """Delete items by id (owner token); in a private-ranking collection tombstone pages go
        first. Returns how many the server deleted (ids it did not hold are not counted)."""
        from dlheir.client.owner import collection_keys
        from dlheir.client.private import delete_items

        collection = self._collection(collection)
        ids = [int(i) for i in ids]
        keys = self.keys().for_collection(collection, self.key_path)
        with self._owner_cloud(collection, tokens) as cloud:
            info = cloud.stats(collection)
            keys = collection_keys(keys, collection, info)  # the key file's mode, not the server's word
            if keys.private:
                return delete_items(cloud, keys.image_keys(), collection, info.bits, ids, keys.key_id, keys.binding)
            return cloud.delete(collection, ids)

    # access
    def grant(self, user_pub: str | os.PathLike | None = None, collection: str | None = None, user: str | None = None,
              out: str | os.PathLike | None = None, replace: bool = False, reader_token: str | None = None,
              bits: int | None = None, tokens: str | os.PathLike | None = None) -> Path:
        """Seal a grant for the holder of ``user_pub``'s private key (see ``dlheir owner grant``);
        returns the grant file: ``out`` (or the ``grant`` setting), which must not exist; else, for
        this machine's own user (no ``user_pub``), installed where ``user search`` finds it,
        ``$DLHEIR_HOME/user-grants/COLLECTION.grant``; else ``$DLHEIR_HOME/grants/COLLECTION/USER.grant``,
        to send. A default file is replaced: granting a user again makes their older grant useless.
        ``last_grant_installed`` says which of the last two it was."""
        from dlheir.client.access import default_label, issue_grant
        from dlheir.client.crypto import make_grant, read_public_key_file, replace_private, write_private

        from dlheir.client.crypto import public_key_path

        own_pub = public_key_path(paths.resolve(self.config.get("user_key"), paths.USER_KEY))
        own_user = user_pub is None or Path(user_pub).resolve() == own_pub.resolve()  # this machine's user
        if user_pub is None:  # a user on this machine: the public key next to the configured private key
            user_pub = own_pub
            if not Path(user_pub).is_file():
                raise UserError(f"give the user's public key with --user-pub FILE (none at {user_pub}, where "
                                "'dlheir user keygen' on this machine puts it)")
        pub = self.last_grant_user_pub = Path(user_pub)
        public_pem = read_public_key_file(pub)  # a private key stops here: never sealed, written or sent
        keys = self.keys()
        collection = self.config.get("collection", collection) or keys.collection
        if not collection:
            raise UserError(f"give --collection ({self.key_path} records no collection name)")
        user = paths.check_label(user) if user else None
        out = self.config.get("grant", out)
        out = Path(out) if out is not None else None
        if out is not None and out.exists():
            suggestion = paths.rotated_grant(collection, user or "user")
            raise UserError(f"{out} already exists; refusing to overwrite a grant (without --out a grant goes to "
                            f"a file per collection and user, e.g. {suggestion})")
        if reader_token is not None:  # offline: the caller's token (no per-user credential on the server)
            server = self._server_flag or (self.config.get("server") if self.config.given("server") else None)
            grant = make_grant(keys, public_pem, collection, reader_token, server=server, bits=bits, user=user)
        else:
            doc = self.tokens(collection, tokens)
            server = self.server_for(doc)
            user = user or paths.check_label(default_label(pub))
            with _cloud(self, server, doc["owner_token"]) as cloud:
                grant = issue_grant(keys, public_pem, collection, user, cloud, server=server,
                                    bits=bits or doc.get("bits"), replace=replace)
        self.last_grant_user, self.last_grant_installed = user, out is None and own_user
        if out is not None:
            return write_private(out, grant, "a grant")
        paths.ensure_home()
        out = paths.held_grant(collection) if own_user else paths.rotated_grant(collection, user or "user")
        out.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        return replace_private(out, grant)

    def grants(self, collection: str | None = None, tokens: str | os.PathLike | None = None) -> Readers:
        collection = self._collection(collection)
        with self._owner_cloud(collection, tokens) as cloud:
            answer = cloud.list_readers(collection)
        return Readers(collection, answer.key_id or 1, answer.shared_token_active,
                       [Reader(r.user, r.created, r.revoked or None) for r in answer.readers])

    def revoke(self, user: str | None = None, collection: str | None = None, shared_token: bool = False,
               tokens: str | os.PathLike | None = None) -> bool:
        """Revoke one user's reader token (or the shared one); False if it was already revoked."""
        if bool(user) == bool(shared_token):
            raise UserError("give a USER to revoke, or --shared-token")
        user = paths.check_label(user) if user else None
        collection = self._collection(collection)
        with self._owner_cloud(collection, tokens) as cloud:
            return cloud.revoke_reader(collection, user, shared_token=shared_token)

    def rotate(self, collection: str | None = None, drop: Sequence[str] = (), out_dir: str | os.PathLike | None = None,
               tokens: str | os.PathLike | None = None, resume: bool = False):
        """Key rotation (see :func:`dlheir.client.access.rotate`); returns its RotationReport. An
        interrupted rotation of the collection (a pending record in $DLHEIR_HOME/rotations/) is
        finished instead of starting a new one (``report.resumed``); ``resume`` only finishes one
        (UserError if none is pending)."""
        from dlheir.client.access import rotate

        collection = self._collection(collection)
        doc = self.tokens(collection, tokens)
        server = self.server_for(doc)
        with _cloud(self, server, doc["owner_token"]) as cloud:
            return rotate(self.key_path, collection, cloud, server=server, drop=drop, out_dir=out_dir, resume=resume)

    def reindex(self, collection: str | None = None, batch_size: int = 64, progress: bool | None = None,
                tokens: str | os.PathLike | None = None):
        """Re-hash ``collection`` with the served model (see :func:`dlheir.client.owner.reindex_collection`):
        each blob fetched and decrypted with the owner's keys, hashed, its code staged, then every code
        and the collection's model switched in one server transaction; resumable. Returns a ReindexReport."""
        from dlheir.client.owner import reindex_collection

        collection = self._collection(collection)
        doc = self.tokens(collection, tokens)
        show = not _config.quiet() if progress is None else progress
        with _cloud(self, self.server_for(doc), doc["owner_token"]) as cloud, self._hashing(batch_size) as hasher:
            return reindex_collection(self.keys(), collection, cloud, hasher, batch_size, progress=show)


# --- the query user ---------------------------------------------------------------------------
def default_search_dir(query: str | os.PathLike, base: str | os.PathLike = "results/search") -> Path:
    """A new, empty folder (made here, mode 0700) for one search's results:
    ``results/search/YYYYmmdd-HHMMSS-<query name>`` (``-2``, ``-3``, ... when taken), so searches
    never mix their files."""
    stem = _safe_stem(query)
    base = Path(base)
    name = f"{time.strftime('%Y%m%d-%H%M%S')}-{stem}"
    base.mkdir(parents=True, exist_ok=True)
    for n in range(1, 10_000):
        folder = base / (name if n == 1 else f"{name}-{n}")
        try:
            folder.mkdir(mode=0o700)  # atomic: two searches at once get two folders
            return folder
        except FileExistsError:
            continue
    raise UserError(f"cannot find a free folder name for {name} under {base}")


class User(_Connections):
    """A query user: opens the owner's grant with the user's RSA private key and searches.

    ``grant``/``user_key``: files (default ``grant``/``user_key`` settings, else the grant held for
    ``collection`` (default the ``collection`` setting) in ``$DLHEIR_HOME/user-grants/``, or the only
    one held, and ``user.pem``); ``passphrase``: the private key's, if it has one;
    ``onnx``: an exported ONNX file to hash queries with in this process instead of Triton.
    Connections stay open between searches: ``with User() as user:`` or :meth:`close` closes them."""

    def __init__(self, grant: str | os.PathLike | None = None, user_key: str | os.PathLike | None = None,
                 passphrase: str | None = None, server: str | None = None, triton: str | None = None,
                 model: str | None = None, tls_ca: str | None = None,
                 config: "_config.Config | str | os.PathLike | None" = None, insecure: bool | None = None,
                 onnx: str | os.PathLike | None = None, collection: str | None = None) -> None:
        self._init_connections()
        self._onnx = onnx
        self._local: Any = None  # private mode: the synced LocalIndex, kept between searches
        self.config = _cfg(config)
        # a collection asked for (flag or argument) must be the grant's; the setting only helps find it
        self._asked_collection = collection
        self.collection = collection or self.config.get("collection")
        self._grant_given = self.config.get("grant", grant)
        self._grant_path: Path | None = None
        self.key_path = paths.resolve(self.config.get("user_key", user_key), paths.USER_KEY)
        self.passphrase = passphrase
        self._server_flag, self._triton, self._model = server, triton, model
        self.tls_ca = self.config.get("tls_ca", tls_ca)
        self.insecure = self.config.insecure(insecure)  # see Owner
        self._grant = None
        self.trust_note: str | None = None  # set when opening the grant pinned its owner's key (first use)

    @property
    def grant_path(self) -> Path:
        """The grant file this user opens (resolved on first use, see :meth:`_grant_file`)."""
        if self._grant_path is None:
            self._grant_path = self._grant_file(self._grant_given)
        return self._grant_path

    def _grant_file(self, given: str | os.PathLike | None) -> Path:
        """The grant to open: the one given; else the one held for ``self.collection``; else the
        legacy ``grant.bin``; else the only one held. UserError naming what is held when it is not clear."""
        if given is not None:
            return Path(given)
        legacy = paths.default_path(paths.GRANT)
        held = paths.held_grants()
        names = ", ".join(repr(p.stem) for p in held) or "none"
        if self.collection:
            path = paths.held_grant(self.collection)
            if path.is_file():
                return path
        if self._asked_collection:
            if legacy.is_file():
                return legacy  # its collection is checked when it is opened
            raise UserError(f"no grant for collection {self.collection!r} on this machine ({path}; held: {names}): "
                            "ask its owner for one and install it with 'dlheir user add-grant FILE'")
        if legacy.is_file() or not held:
            return legacy  # none at all: 'grant not found' when opened
        if len(held) == 1:
            return held[0]
        raise UserError(f"this machine holds grants for several collections ({names}): name one with --collection")

    def add_grant(self, grant_file: str | os.PathLike) -> tuple[Path, "Any", bool]:
        """Install a grant received from an owner as this machine's grant for its collection
        (``$DLHEIR_HOME/user-grants/COLLECTION.grant``, 0600), after opening it with the private key and
        checking its owner's signing key is trusted. Returns (where, the opened grant, whether it
        replaced one: a grant re-issued after a rotation or a new grant replaces the older)."""
        from dlheir.client.crypto import open_grant, read_private_key_file, replace_private
        from dlheir.client.trust import check_owner

        source = Path(grant_file)
        if not source.is_file():
            raise UserError(f"grant not found: {source}")
        if not Path(self.key_path).is_file():
            raise UserError(f"private key not found: {self.key_path}")
        data = source.read_bytes()
        grant = open_grant(data, read_private_key_file(self.key_path), self.passphrase)
        self.trust_note = check_owner(grant)
        paths.ensure_home()
        target = paths.held_grant(grant.collection)
        replaced = target.is_file()
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        replace_private(target, data)
        return target, grant, replaced

    def held_grants(self) -> list[dict]:
        """Every grant this machine's user holds (``user-grants/``, and a legacy ``grant.bin``), opened
        with the private key: collection, mode, server, key version, user label, file; one that
        does not open says why (``opens``/``error``)."""
        from dlheir.client.crypto import open_grant, read_private_key_file

        files = paths.held_grants()
        legacy = paths.default_path(paths.GRANT)
        files += [legacy] if legacy.is_file() else []
        if files and not Path(self.key_path).is_file():
            raise UserError(f"private key not found: {self.key_path}")
        private_pem = read_private_key_file(self.key_path) if files else b""
        rows = []
        for path in files:
            row = {"collection": path.stem, "mode": "?", "server": None, "key_version": None, "user": None,
                   "file": str(path), "opens": True, "error": ""}
            try:
                g = open_grant(path.read_bytes(), private_pem, self.passphrase)
                row.update(collection=g.collection, mode=g.mode, server=g.server, key_version=g.key_id, user=g.user,
                           owner=g.owner_fingerprint)
            except (UserError, OSError, ValueError) as exc:
                row.update(opens=False, error=str(exc).splitlines()[0])
            rows.append(row)
        return rows

    @staticmethod
    def keygen(out: str | os.PathLike | None = None, passphrase: str | None = None,
               config: "_config.Config | str | os.PathLike | None" = None) -> tuple[Path, Path]:
        """A new RSA-3072 pair (private 0600, public next to it); returns (private, public)."""
        from dlheir.client.crypto import generate_user_keypair

        cfg = _cfg(config)
        return generate_user_keypair(paths.resolve(cfg.get("user_key", out), paths.USER_KEY, create=True), passphrase)

    @property
    def grant(self):
        """The opened grant (collection, reader token, keys, recorded server and bits)."""
        if self._grant is None:
            from dlheir.client.crypto import open_grant, read_private_key_file

            for path, what in ((self.grant_path, "grant"), (self.key_path, "private key")):
                if not Path(path).is_file():
                    raise UserError(f"{what} not found: {path}")
            from dlheir.client.trust import check_owner

            private_pem = read_private_key_file(self.key_path)  # a public key, or one others can read, stops here
            grant = open_grant(self.grant_path.read_bytes(), private_pem, self.passphrase)
            self.trust_note = check_owner(grant)  # an owner key not trusted stops here (the first is pinned)
            asked = self._asked_collection
            if asked and grant.collection != asked:
                raise UserError(f"{self.grant_path} is a grant for collection {grant.collection!r}, not {asked!r}: "
                                f"give --collection {grant.collection}, or ask the owner of {asked!r} for a grant "
                                "('dlheir user add-grant FILE' installs it)")
            self._grant = grant
        return self._grant

    @property
    def server(self) -> str:
        return _server(self.config, self._server_flag, self.grant.server)

    def search(self, images: Any, k: int = 20, out: str | os.PathLike | None = None,
               write: bool | None = None) -> "SearchResult | list[SearchResult]":
        """TrapGen (hash), search (server-ranked, or locally in private mode), fetch and decrypt the
        top ``k`` of each query. ``images``: one image (a path, encoded bytes, a numpy uint8 array
        HxW or HxWxC, a PIL image) -> one :class:`SearchResult`; a list of them (or a 4-D array)
        -> a list of SearchResults, one per query in order, searched together (one hashing call,
        one search, one fetch; ``seconds`` are the batch's). Each hit carries the decrypted
        ``image`` bytes, its ``id`` and ``distance``.

        Nothing is written unless ``out`` is given (or ``write=True``): then the images go into
        ``out`` (a list: one subfolder per query, ``out/000-NAME``; ``write=True`` without ``out``:
        a new folder per query from :func:`default_search_dir`), created 0700, each file 0600."""
        from dlheir.client.user import search_images, write_results

        im = _images()
        batch, single = im.as_batch(images, "images")
        for x in batch:
            if im.is_path(x) and not Path(x).is_file():
                raise UserError(f"query image not found: {x}")
        write = out is not None if write is None else write
        labels = [str(x) if im.is_path(x) else im.label(x, None if single else n) for n, x in enumerate(batch)]
        grant = self.grant
        try:
            with _cloud(self, self.server, grant.reader_token) as cloud, self._hashing() as hasher:
                if self._local is None or (self._local and self._local.cloud is not cloud):
                    from dlheir.client.private import open_local

                    # one round trip: the mode, and (private mode) the new sealed pages
                    self._local = open_local(cloud, grant) or False
                    first_sync = self._local.last_sync if self._local else None
                else:  # kept from an earlier search: only the pages added since
                    first_sync = self._local.sync() if self._local else None
                local = self._local or None
                found, timings = search_images(im.for_hashing(batch), grant, cloud, hasher, k, local=local)
        except UserError as exc:
            if getattr(exc, "code", None) is not None and exc.code.name == "UNAUTHENTICATED":
                raise UserError(f"the server refused this grant's reader token for collection {grant.collection!r}: "
                                "the owner revoked it, rotated the collection's keys or re-created the collection; "
                                f"ask the owner for a new grant ({self.grant_path})") from None
            raise
        sync = None if first_sync is None else {
            "codes": len(local), "pages": local.pages, "pages_cached": first_sync.pages_cached,
            "pages_fetched": first_sync.pages_fetched, "bytes_fetched": first_sync.bytes_fetched,
            "seconds": first_sync.seconds}
        seconds = {"trapdoor": timings.trapdoor_s, "sync": timings.sync_s, "search": timings.search_s,
                   "fetch_decrypt": timings.fetch_decrypt_s}
        results = []
        for n, (query, hits) in enumerate(zip(labels, found)):
            out_dir, files = None, {}
            if write:
                stem = query if im.is_path(batch[n]) else "query"
                if out is None:
                    out_dir = default_search_dir(stem)
                else:
                    out_dir = Path(out) if single else Path(out) / f"{n:03d}-{_safe_stem(stem)}"
                written = write_results(hits, out_dir)
                files = dict(zip([h.rank for h in hits if h.image], written))
            results.append(SearchResult(query, grant.collection, "server" if local is None else "local (private mode)",
                                        [Hit(h.rank, h.id, h.distance, h.name, files.get(h.rank), h.image)
                                         for h in hits], out_dir, dict(seconds), sync))
        return results[0] if single else results

    def codes(self, images: Any) -> Any:
        """The raw (untransformed) codes of ``images`` from this user's hasher: see :func:`hash_images`."""
        im = _images()
        batch, single = im.as_batch(images, "images")
        with self._hashing() as hasher:
            codes = hasher.hash_images(im.for_hashing(batch))[1]
        return codes[0] if single else codes

    def close(self) -> None:
        """Close the connections (and forget the private-mode index synced over them)."""
        self._local = None
        super().close()


def _safe_stem(query: str | os.PathLike) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(query).stem)[:40] or "query"


def hash_images(images: Any, triton: str | None = None, onnx: str | os.PathLike | None = None,
                model: str | None = None, batch_size: int = 16,
                config: "_config.Config | str | os.PathLike | None" = None, insecure: bool | None = None) -> Any:
    """The packed hash codes of ``images`` (one image: a path, encoded bytes, a numpy uint8 array
    HxW or HxWxC, or a PIL image -> uint8 [L]; a list of them -> uint8 [B, L], in order; L =
    ceil(N/8)). Through Triton (``triton``, else the configured address) unless ``onnx`` is given
    without ``triton``: then in this process with ONNX Runtime from that exported ONNX file, no
    server needed. Both run :mod:`dlheir.preprocess` and the same graph: the same codes."""
    im = _images()
    batch, single = im.as_batch(images, "images")
    cfg = _cfg(config)
    if onnx is not None and triton is None:
        hasher = _hasher(cfg, None, None, batch_size, onnx)
    else:
        from dlheir.client.triton import TritonHasher

        hasher = TritonHasher(cfg.get("triton", triton), batch_size=batch_size, model=cfg.get("model", model),
                              tls_ca=cfg.get("triton_tls_ca"), insecure=cfg.insecure(insecure))
    with hasher:
        codes = hasher.hash_images(im.for_hashing(batch))[1]
    return codes[0] if single else codes


# --- services ---------------------------------------------------------------------------------
def _server_status(address: str, tls_ca: str | None, insecure: bool = False) -> ServiceStatus:
    """Whether the cloud server at ``address`` answers; with several addresses (fronts of one
    store), each is asked: up when one is, the detail naming each one's state."""
    from dlheir.client.cloud import parse_addresses

    try:
        addresses = parse_addresses(address)
    except UserError as exc:
        return ServiceStatus("cloud server", str(address), False, str(exc))
    if len(addresses) == 1:
        return _one_server_status(addresses[0], tls_ca, insecure)
    fronts = [_one_server_status(a, tls_ca, insecure) for a in addresses]
    up = [f for f in fronts if f.up]
    detail = (f"{len(up)} of {len(fronts)} serving" + ("" if len(up) == len(fronts) else ": " + "; ".join(
        f"{f.address} {'up' if f.up else 'DOWN'} ({f.detail})" for f in fronts)))
    return ServiceStatus("cloud server", ",".join(addresses), bool(up), detail,
                         {"fronts": {f.address: {"up": f.up, "detail": f.detail} for f in fronts}})


def _store_fronts(address: str, admin_token: str, tls_ca: str | None, insecure: bool) -> list[dict] | None:
    """The fronts serving the store behind ``address`` (several processes over one PostgreSQL store),
    each with the store changes it has not applied yet; None with the embedded store (one server)."""
    import time

    from dlheir.client.cloud import CloudClient

    try:
        with CloudClient(address, admin_token, tls_ca=tls_ca, insecure=insecure) as client:
            reply = client.list_fronts(admin_token)
    except UserError:
        return None
    if not reply.shared:
        return None
    now = time.time()
    return [{"address": f.address, "host": f.host, "pid": f.pid, "applied": f.applied,
             "behind": max(0, reply.head - f.applied), "seen_s_ago": round(max(0.0, now - f.seen), 1),
             "answered": f.id == reply.answered_by} for f in reply.fronts]


def _one_server_status(address: str, tls_ca: str | None, insecure: bool = False) -> ServiceStatus:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from dlheir.client.cloud import check_cleartext, tls_credentials, unreachable_reason

    try:
        check_cleartext(address, tls_ca, insecure)  # before any connection, as CloudClient
    except UserError as exc:
        return ServiceStatus("cloud server", address, False, str(exc))

    from dlheir.proto import dlheir_cloud_pb2 as pb
    from dlheir.proto import dlheir_cloud_pb2_grpc as pb_grpc

    # health alone proves nothing: a bare gRPC health service answers SERVING for "" (hence the
    # CloudStore service by name: NOT_FOUND there) and Triton answers SERVING for any name (hence
    # the probe below: a call only our server has, sent without a token)
    service = pb.DESCRIPTOR.services_by_name["CloudStore"].full_name
    channel = grpc.secure_channel(address, tls_credentials(tls_ca)) if tls_ca else grpc.insecure_channel(address)
    with channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                               timeout=3)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                why = "answers gRPC but has no health service: not a dlheir cloud server (Triton's port?)"
            elif exc.code() == grpc.StatusCode.NOT_FOUND:
                why = f"answers gRPC health checks but has no {service} service: not a dlheir cloud server"
            else:
                why = unreachable_reason(exc.details() or "") or f"{exc.code().name}: {exc.details()}"
            return ServiceStatus("cloud server", address, False, why)
        serving = answer.status == health_pb2.HealthCheckResponse.SERVING
        if serving:
            try:  # ours refuses a call without a token (UNAUTHENTICATED); another server has no such method
                pb_grpc.CloudStoreStub(channel).ListCollections(pb.ListCollectionsRequest(), timeout=3)
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                    return ServiceStatus("cloud server", address, False,
                                         "answers gRPC health checks but has no dlheir CloudStore service: "
                                         "not a dlheir cloud server (Triton's port?)")
    return ServiceStatus("cloud server", address, serving,
                         "serving" if serving else health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status))


def _triton_status(cfg: "_config.Config", address: str, model: str | None) -> ServiceStatus:
    try:
        with _hasher(cfg, address, model) as hasher:
            info = {"model": hasher.model, "bits": hasher.bits, "image_size": hasher.image_size}
            fingerprint = getattr(hasher, "fingerprint", None)
            if fingerprint:
                info["fingerprint"] = fingerprint
    except UserError as exc:
        return ServiceStatus("triton", address, False, str(exc))
    return ServiceStatus("triton", address, True, f"model {info['model']!r} ready: {info['bits']} bits, "
                                                  f"{info['image_size']} px", info)


def status(server: str | None = None, triton: str | None = None, model: str | None = None,
           admin_token_file: str | os.PathLike | None = None, tls_ca: str | None = None,
           config: "_config.Config | str | os.PathLike | None" = None, insecure: bool | None = None) -> Status:
    """Which services answer, where, with which model, and the collections (all of them with
    the admin token, else those whose tokens files are in the key folder). Never raises for a
    service that is down: that is what it reports."""
    cfg = _cfg(config)
    address = cfg.get("server", server)
    ca = cfg.get("tls_ca", tls_ca)
    srv = _server_status(address, ca, cfg.insecure(insecure))
    tri = _triton_status(cfg, cfg.get("triton", triton), model)
    collections = None
    if srv.up:
        try:
            admin_token = cfg.admin_token(admin_token_file)
            srv.info["admin"] = True  # the listing is every collection, not only the tokens files held
        except UserError:
            admin_token, srv.info["admin"] = None, False
        if admin_token:
            srv.info["store_fronts"] = _store_fronts(address, admin_token, ca, cfg.insecure(insecure))
        try:
            with Owner(server=address, tls_ca=ca, config=cfg, insecure=insecure) as owner:
                collections = owner.collections(admin_token_file)
        except UserError as exc:
            srv.info["collections_error"] = str(exc)
        served = tri.info.get("fingerprint") if tri.up else None
        for c in collections or []:  # can Triton's model hash queries for it? (codes of one model only)
            c.served = None if served is None or c.model_fingerprint is None else c.model_fingerprint == served
    return Status(str(cfg.path) if cfg.path else None, srv, tri, collections, cfg.as_dict()["settings"])
