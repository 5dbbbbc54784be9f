"""TLS to Triton (issue 19, item 7): Triton sees every plaintext image, so the client can reach
it over TLS, and refuses a Triton that is not on loopback without TLS unless told --insecure."""

from __future__ import annotations

import socket

import numpy as np
import pytest

from dlheir.client.triton import TritonHasher
from dlheir.errors import UserError
from dlheir.procs import free_port
from dlheir.server.testing import self_signed_certificate
from dlheir.triton.launcher import TritonServer


def test_the_client_hashes_over_tls_and_refuses_cleartext_to_a_remote_triton(served_model, triton_server,
                                                                             digits_small, tmp_path):
    cert, key = self_signed_certificate(tmp_path)
    images = sorted(p for p in digits_small.rglob("*.png"))[:4]
    with TritonHasher(triton_server.grpc_url) as plain:
        _, expected = plain.hash_images(images)
    server = TritonServer(served_model["repo"], grpc_port=free_port(), http_port=free_port(),
                          metrics_port=free_port(), state_dir=tmp_path / "triton", tls_cert=cert, tls_key=key)
    with server:
        with TritonHasher(server.grpc_url, tls_ca=str(cert)) as hasher:
            _, codes = hasher.hash_images(images)
        np.testing.assert_array_equal(codes, expected)  # the same codes, over TLS
        with pytest.raises(UserError) as info:  # a cleartext client gets no answer from the TLS port
            TritonHasher(server.grpc_url)
        assert "\n" not in str(info.value) and server.grpc_url in str(info.value)
        with socket.socket() as s:  # HTTP (which has no TLS in Triton) is off
            assert s.connect_ex(("127.0.0.1", server.http_port)) != 0
    with pytest.raises(UserError) as info:  # refused before any connection: no Triton listens there
        TritonHasher("192.0.2.123:8001")
    assert "without TLS" in str(info.value) and "--triton-tls-ca" in str(info.value)
