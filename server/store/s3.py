"""Blobs in an S3-compatible object store (boto3), for the PostgreSQL backend.

``--blobs s3://BUCKET?endpoint=http://HOST:PORT[&region=R][&prefix=P]``. Credentials come the
usual AWS ways (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_SHARED_CREDENTIALS_FILE``,
a profile). Each blob is one object ``[PREFIX/]collection/COLLECTION_UID/ITEM_ID/VERSION``: the
collection's random uid keeps a re-created collection from ever sharing an object with the old
one, and a fresh random VERSION per write keeps a replaced blob's old object until the row that
names the new one has committed (see ``server/store/postgres.py`` for the commit order). The
bytes are the client's AES-GCM blob, unchanged.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Iterator
from urllib.parse import parse_qs, urlsplit

from dlheir.server.store.base import StoreError, StoreUnusableError

log = logging.getLogger("dlheir.server.store.s3")
PUT_THREADS = 8


class S3Blobs:
    """PUT/GET/DELETE/LIST of blobs; every failure is a StoreError naming the store (UNAVAILABLE)."""

    def __init__(self, url: str) -> None:
        import boto3
        from botocore.config import Config

        parts = urlsplit(url)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        if parts.scheme != "s3" or not parts.netloc:
            raise StoreUnusableError(f"--blobs {url!r}: expected s3://BUCKET?endpoint=http://HOST:PORT")
        unknown = set(query) - {"endpoint", "region", "prefix"}
        if unknown:
            raise StoreUnusableError(f"--blobs: unknown setting {sorted(unknown)[0]!r} (endpoint, region, prefix)")
        self.bucket, self.endpoint = parts.netloc, query.get("endpoint")
        self.prefix = query.get("prefix", "").strip("/")
        self.where = f"object store s3://{self.bucket}" + (f" at {self.endpoint}" if self.endpoint else "")
        config = Config(retries={"max_attempts": 2, "mode": "standard"}, connect_timeout=3, read_timeout=30,
                        s3={"addressing_style": "path"}, max_pool_connections=PUT_THREADS * 2)
        self.client = boto3.session.Session().client("s3", endpoint_url=self.endpoint,
                                                     region_name=query.get("region", "us-east-1"), config=config)
        self._pool = ThreadPoolExecutor(PUT_THREADS, thread_name_prefix="s3-put")

    def _error(self, exc: Exception, what: str) -> StoreError:
        code = getattr(exc, "response", {}).get("Error", {}).get("Code", "") if hasattr(exc, "response") else ""
        reason = {"NoSuchBucket": "the bucket does not exist", "404": "the bucket does not exist",
                  "AccessDenied": "access denied (credentials?)", "403": "access denied (credentials?)",
                  "InvalidAccessKeyId": "unknown access key (credentials?)",
                  "SignatureDoesNotMatch": "wrong secret key (credentials?)"}.get(code)
        text = reason or str(exc).splitlines()[0][:200]
        return StoreError(f"{self.where}: {what} failed: {text}")

    def check(self) -> None:
        """At start: the bucket answers (StoreUnusableError, one line naming it and the setting, if not)."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as exc:  # botocore's errors have no common base worth naming
            raise StoreUnusableError(f"{self._error(exc, 'reaching the bucket')} (--blobs)") from None

    def key(self, uid: str, item_id: int, version: str) -> str:
        path = f"collection/{uid}/{int(item_id)}/{version}"
        return f"{self.prefix}/{path}" if self.prefix else path

    def collection_prefix(self, uid: str = "") -> str:
        """Where a collection's objects are (``uid`` empty: where every collection's are)."""
        path = f"collection/{uid}/" if uid else "collection/"
        return f"{self.prefix}/{path}" if self.prefix else path

    def put_many(self, objects: list[tuple[str, bytes]]) -> None:
        """PUT every (key, bytes), in parallel; returns once all succeeded (StoreError otherwise)."""
        def put(kv):
            self.client.put_object(Bucket=self.bucket, Key=kv[0], Body=kv[1])
        try:
            list(self._pool.map(put, objects))
        except Exception as exc:
            raise self._error(exc, "storing a blob") from None

    def get(self, key: str) -> bytes:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except Exception as exc:
            raise self._error(exc, "reading a blob") from None

    def get_many(self, keys: list[str]) -> list[bytes]:
        """GET every key, in parallel, in the order given (StoreError if one fails)."""
        return list(self._pool.map(self.get, keys))

    def delete_many(self, keys: Iterable[str]) -> int:
        """Delete objects (1000 per request); returns how many were asked. Failures are logged, not
        raised: what is left is an orphan, which the sweep at start removes."""
        keys, done = list(keys), 0
        for start in range(0, len(keys), 1000):
            chunk = keys[start:start + 1000]
            try:
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in chunk],
                                                                        "Quiet": True})
                done += len(chunk)
            except Exception as exc:
                log.warning("%s; %d object(s) left for the sweep at the next start", self._error(exc, "deleting"),
                            len(chunk))
        return done

    def list(self, prefix: str) -> Iterator[tuple[str, float]]:
        """(key, last modified as a unix time) of every object under ``prefix``."""
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    yield obj["Key"], obj["LastModified"].timestamp()
        except Exception as exc:
            raise self._error(exc, "listing blobs") from None

    def close(self) -> None:
        self._pool.shutdown(wait=False)

