"""DLHEIR: deep-hashing encrypted image retrieval, served.

Core package. The network lives in ``dlheir.export`` (folder ``export/``), the cloud
server in ``dlheir.server`` (``server/``), the clients in ``dlheir.client``
(``client/``) and the benchmarks in ``dlheir.benchmarks`` (``benchmarks/``).
"""

__version__ = "0.1.0"
