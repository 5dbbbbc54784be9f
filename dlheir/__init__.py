"""DLHEIR: deep-hashing encrypted image retrieval, served.

Core package. The network lives in ``dlheir.export`` (folder ``export/``), the cloud
server in ``dlheir.server`` (``server/``), the clients in ``dlheir.client``
(``client/``) and the benchmarks in ``dlheir.benchmarks`` (``benchmarks/``).
"""

__version__ = "0.1.0"

# The Python API (dlheir.client.api), imported on first use so that ``import dlheir`` stays light.
_API = ("Owner", "User", "status", "hash_images")
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        from dlheir.client import api

        return getattr(api, name)
    raise AttributeError(f"module 'dlheir' has no attribute {name!r}")
