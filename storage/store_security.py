"""The embedded store closed to everything but S3 with credentials.

``weed mini`` opens master, volume, filer, S3 and admin ports. Only S3 checks the S3 credentials;
the others took any local process's writes (a plain ``curl -F`` to the filer rewrote a bucket's
objects). SeaweedFS closes them with its own security settings (``weed scaffold -config=security``),
given here as the ``WEED_*`` environment variables it reads in place of ``security.toml``:

- mutual TLS on every gRPC port (``[grpc]``, one private CA, a certificate for every component and
  for its clients): a caller without the certificate fails the handshake;
- HTTPS with client-certificate verification on the master, volume and filer HTTP ports
  (``[https.*]``, ``[https.client]`` for SeaweedFS's own calls between them);
- JWT signing of volume and filer reads and writes (``[jwt.signing]``, ``[jwt.filer_signing]``), so a
  write that got past TLS would still need a token only the servers mint.

The admin port, with its UI off, answers only ``/health`` and ``/metrics``. The material is made once
per store, in a folder of mode 0700 with files of mode 0600, beside the store's credentials: who can
read those can use the bucket anyway.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import secrets
from pathlib import Path

CA, CERTIFICATE, KEY, JWT_KEYS = "ca.pem", "store.pem", "store-key.pem", "jwt.json"
GRPC_COMPONENTS = ("MASTER", "VOLUME", "FILER", "S3", "ADMIN", "WORKER", "MSG_BROKER", "MSG_AGENT", "MQ", "CLIENT")
HTTPS_SERVERS = ("MASTER", "VOLUME", "FILER")
JWT_SETTINGS = ("WEED_JWT_SIGNING_KEY", "WEED_JWT_SIGNING_READ_KEY", "WEED_JWT_FILER_SIGNING_KEY",
                "WEED_JWT_FILER_SIGNING_READ_KEY")
VALID_DAYS = 3650  # the store's own CA: nothing outside the store trusts it


def write_private(path: Path, data: bytes) -> None:
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)
    path.write_bytes(data)


def make_certificates(folder: Path) -> None:
    """A private CA and one certificate (for 127.0.0.1 and localhost) that every component serves
    and presents as a client; the CA's key is not kept, so no other certificate can be made."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def name(common_name: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=VALID_DAYS)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = name("mnist embedded store CA")
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    hosts = x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    certificate = (x509.CertificateBuilder().subject_name(name("mnist embedded store")).issuer_name(ca.subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(start).not_valid_after(end).add_extension(hosts, critical=False)
                   .sign(ca_key, hashes.SHA256()))
    write_private(folder / CA, ca.public_bytes(serialization.Encoding.PEM))
    write_private(folder / CERTIFICATE, certificate.public_bytes(serialization.Encoding.PEM))
    write_private(folder / KEY, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))


def security_environment(folder: Path) -> dict[str, str]:
    """The ``WEED_*`` settings that close every port but S3's, made once into ``folder``."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.chmod(0o700)
    if not all((folder / name).is_file() for name in (CA, CERTIFICATE, KEY, JWT_KEYS)):
        make_certificates(folder)
        write_private(folder / JWT_KEYS, json.dumps({name: secrets.token_hex(32) for name in JWT_SETTINGS}).encode())
    ca, certificate, key = (str(folder / name) for name in (CA, CERTIFICATE, KEY))
    settings = {"WEED_GRPC_CA": ca, **json.loads((folder / JWT_KEYS).read_text())}
    for component in GRPC_COMPONENTS:
        settings |= {f"WEED_GRPC_{component}_CERT": certificate, f"WEED_GRPC_{component}_KEY": key}
    for server in HTTPS_SERVERS:
        settings |= {f"WEED_HTTPS_{server}_CERT": certificate, f"WEED_HTTPS_{server}_KEY": key,
                     f"WEED_HTTPS_{server}_CA": ca}
    settings |= {"WEED_HTTPS_CLIENT_ENABLED": "true", "WEED_HTTPS_CLIENT_CERT": certificate,
                 "WEED_HTTPS_CLIENT_KEY": key, "WEED_HTTPS_CLIENT_CA": ca}
    return settings
