"""The embedded SeaweedFS takes no write without the S3 credentials: every port it opens either
checks them (S3), refuses a caller without the store's own certificate (master, volume and filer
over HTTP and gRPC), or takes no writes at all (admin, its UI off)."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import boto3
import botocore.exceptions
import httpx
import psutil
import pytest

from storage.embedded import RunningWeed, security_dir, start_weed

ACCESS, SECRET = "closed-access", "closed-secret-Hq27"
HTTP_PORTS = ("master.port", "volume.port", "filer.port")
GRPC_PORTS = ("master.port.grpc", "volume.port.grpc", "filer.port.grpc", "s3.port.grpc", "admin.port.grpc")
REFUSED = "(?i)certificate required"  # TLS 1.3's alert to a client that shows no certificate
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000")  # and an empty SETTINGS


@pytest.fixture(scope="module")
def weed(tmp_path_factory: pytest.TempPathFactory):
    running = start_weed(tmp_path_factory.mktemp("closed") / "data", ACCESS, SECRET)
    yield running
    running.stop()


def s3(weed: RunningWeed, access: str | None = ACCESS, secret: str | None = SECRET):
    from botocore import UNSIGNED
    from botocore.config import Config

    config = Config(signature_version=UNSIGNED) if access is None else None
    return boto3.client("s3", endpoint_url=weed.endpoint, aws_access_key_id=access, aws_secret_access_key=secret,
                        region_name="us-east-1", config=config)


@pytest.fixture(scope="module")
def labels(weed: RunningWeed) -> str:
    """A registry's labels.json, written with the credentials."""
    import time

    client = s3(weed)
    for _ in range(100):  # the filer takes a moment after S3 listens
        try:
            client.create_bucket(Bucket="models")
            break
        except botocore.exceptions.ClientError:
            time.sleep(0.2)
    client.put_object(Bucket="models", Key="mnist/_registry/labels.json", Body=b'{"stable": 1}')
    return "mnist/_registry/labels.json"


def refuses_plain_http(url: str, body: bytes) -> bool:
    """A plain HTTP write to a TLS port is refused: Go answers 400 ("Client sent an HTTP request to an
    HTTPS server") and closes, and when the close beats the client's reading of that answer the
    client sees the connection reset instead. Either way nothing is written."""
    try:
        return httpx.post(url, files={"file": body}).status_code == 400
    except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError) as error:
        return "reset" in str(error).lower() or isinstance(error, httpx.RemoteProtocolError)


def stored(weed: RunningWeed, key: str) -> bytes:
    return s3(weed).get_object(Bucket="models", Key=key)["Body"].read()


def h2_answers(port: int, tls_client: ssl.SSLContext | None) -> bytes:
    """What a port answers an HTTP/2 preface with: plaintext, or over TLS as ``tls_client``."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        if tls_client is None:
            raw.sendall(H2_PREFACE)
            return raw.recv(64)
        with tls_client.wrap_socket(raw) as connection:
            connection.sendall(H2_PREFACE)
            return connection.recv(64)


def tls_client(certificate: Path | None = None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    if certificate:
        context.load_cert_chain(certificate / "store.pem", certificate / "store-key.pem")
    return context


def test_the_filer_refuses_the_plain_write_that_rewrote_labels(weed: RunningWeed, labels: str) -> None:
    filer = f"127.0.0.1:{weed.ports['filer.port']}"
    assert refuses_plain_http(f"http://{filer}/buckets/models/{labels}", b'{"stable": 9}')
    with pytest.raises(httpx.TransportError, match=REFUSED):  # TLS without the store's client certificate
        httpx.post(f"https://{filer}/buckets/models/{labels}", files={"file": b'{"stable": 9}'}, verify=False)
    assert stored(weed, labels) == b'{"stable": 1}'


def test_s3_takes_writes_only_with_the_credentials(weed: RunningWeed, labels: str) -> None:
    for client in (s3(weed, None, None), s3(weed, ACCESS, "a-wrong-secret")):
        with pytest.raises(botocore.exceptions.ClientError) as refused:
            client.put_object(Bucket="models", Key=labels, Body=b'{"stable": 9}')
        assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert stored(weed, labels) == b'{"stable": 1}'


@pytest.mark.parametrize("port", HTTP_PORTS)
def test_master_volume_and_filer_http_need_the_store_certificate(weed: RunningWeed, port: str) -> None:
    url = f"127.0.0.1:{weed.ports[port]}"
    assert refuses_plain_http(f"http://{url}/submit", b"x")
    with pytest.raises(httpx.TransportError, match=REFUSED):
        httpx.post(f"https://{url}/submit", files={"file": b"x"}, verify=False)


@pytest.mark.parametrize("port", GRPC_PORTS)
def test_every_grpc_port_needs_the_store_certificate(weed: RunningWeed, port: str) -> None:
    """Without the certificate: no answer in plaintext, a refused handshake over TLS. With it, the
    same probe gets the server's HTTP/2 SETTINGS: the probe itself can tell the difference."""
    assert h2_answers(weed.ports[port], None) == b""
    with pytest.raises(ssl.SSLError, match="CERTIFICATE_REQUIRED"):
        h2_answers(weed.ports[port], tls_client())
    data_dir = Path(weed.process.args[2].removeprefix("-dir="))
    assert h2_answers(weed.ports[port], tls_client(security_dir(data_dir)))[3] == 4  # a SETTINGS frame


def test_the_admin_port_takes_no_writes(weed: RunningWeed) -> None:
    admin = f"http://127.0.0.1:{weed.ports['admin.port']}"
    assert httpx.get(f"{admin}/health").status_code == 200
    for path in ("/", "/health", "/metrics", "/api/files/upload", "/api/s3/buckets"):
        assert httpx.post(f"{admin}{path}", files={"file": b"x"}).status_code in (404, 405), path


def test_every_port_the_store_opens_is_one_checked_here(weed: RunningWeed) -> None:
    listening = {c.laddr.port for process in [psutil.Process(weed.process.pid),
                                              *psutil.Process(weed.process.pid).children(recursive=True)]
                 for c in process.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
    checked = {weed.ports[name] for name in (*HTTP_PORTS, *GRPC_PORTS, "s3.port", "admin.port")}
    assert listening and listening <= checked, sorted(listening - checked)
    assert all(c.laddr.ip == "127.0.0.1" for c in psutil.Process(weed.process.pid).net_connections(kind="inet")
               if c.status == psutil.CONN_LISTEN)


def test_the_security_material_is_private(weed: RunningWeed) -> None:
    folder = security_dir(Path(weed.process.args[2].removeprefix("-dir=")))
    assert folder.stat().st_mode & 0o777 == 0o700
    assert {path.name: path.stat().st_mode & 0o777 for path in folder.iterdir()} == {
        "ca.pem": 0o600, "store.pem": 0o600, "store-key.pem": 0o600, "jwt.json": 0o600}
