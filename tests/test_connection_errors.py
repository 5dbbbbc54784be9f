"""Connection errors name the address, what was expected there and how to start it: a cloud
client or a Triton client pointed at nothing, or at the other one's gRPC port."""

from __future__ import annotations

import os

import grpc
import pytest

from dlheir.cli import main
from dlheir.client.cloud import CloudClient, CloudError
from dlheir.client.triton import TritonHasher
from dlheir.errors import UserError
from dlheir.procs import free_port


def cloud_error(address: str, insecure: bool = False) -> CloudError:
    with CloudClient(address, insecure=insecure) as client, pytest.raises(CloudError) as info:
        client.list_collections("some-token")
    return info.value


def test_cloud_client_against_nothing_names_the_address_and_the_start_command():
    address = f"127.0.0.1:{free_port()}"
    exc = cloud_error(address)
    assert exc.code == grpc.StatusCode.UNAVAILABLE and exc.details  # code and gRPC details are kept
    message = str(exc)
    assert f"cannot reach the dlheir cloud server at {address} (connection refused)" in message
    assert "dlheir server start" in message and "--server HOST:PORT" in message and "\n" not in message


def test_cloud_client_against_an_unresolvable_name():
    message = str(cloud_error("no-such-host.invalid:50051", insecure=True))  # not loopback: cleartext opted in
    assert message.startswith("cannot reach the dlheir cloud server at no-such-host.invalid:50051 (")
    assert "dlheir server start" in message


def test_cloud_client_against_tritons_port_says_it_is_not_a_cloud_server(triton_server):
    exc = cloud_error(triton_server.grpc_url)
    assert exc.code == grpc.StatusCode.UNIMPLEMENTED
    assert str(exc) == (f"{triton_server.grpc_url} answers gRPC but is not a dlheir cloud server "
                        "(is it Triton's port? the cloud server's default is 50051)")


def test_a_server_side_error_still_reads_as_the_servers_own(cloud_server):
    with CloudClient(cloud_server.address) as client, pytest.raises(CloudError) as info:
        client.list_collections("not-a-token")
    assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert str(info.value).startswith("cloud server: UNAUTHENTICATED: ")


def test_triton_client_against_nothing_names_the_address_and_the_start_command():
    address = f"127.0.0.1:{free_port()}"
    with pytest.raises(UserError) as info:
        TritonHasher(address)
    assert str(info.value) == (f"cannot reach Triton at {address} (connection refused): "
                               "start it with 'dlheir triton start', or give --triton HOST:PORT")


def test_triton_client_against_the_cloud_servers_port_says_it_is_not_triton(cloud_server):
    with pytest.raises(UserError) as info:
        TritonHasher(cloud_server.address)
    message = str(info.value)
    assert message.startswith(f"{cloud_server.address} answers gRPC but is not Triton "
                              "(is it the cloud server's port?)")
    assert "dlheir triton start" in message


def test_cli_prints_one_line_naming_the_address(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DLHEIR_HOME", str(tmp_path / "home"))  # never the real ~/.config/dlheir
    key = tmp_path / "owner.key"  # create-collection records the collection in the owner key file: it needs one
    assert main(["owner", "init", "--out", str(key)]) == 0
    capsys.readouterr()
    before = key.read_bytes()
    token_file = tmp_path / "admin.token"
    token_file.write_text("admin-token\n")
    os.chmod(token_file, 0o600)
    address = f"127.0.0.1:{free_port()}"
    code = main(["owner", "create-collection", "x", "--bits", "48", "--server", address, "--admin-token-file",
                 str(token_file), "--key", str(key), "--out", str(tmp_path / "x.tokens.json")])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"dlheir: error: cannot reach the dlheir cloud server at {address} (connection refused)")
    assert "dlheir server start" in err
    assert not (tmp_path / "x.tokens.json").exists()
    assert key.read_bytes() == before  # no collection the server never created is recorded in the key file
