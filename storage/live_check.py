"""A publish's live check, told apart from served traffic by a key callers never hold.

The live check (``tasks/publish.py``) sends its golden digits through the gateway as any caller
does, with its own ``x-request-id``, logged as the entry's ``client_request_id``. Any caller
chooses that id too, so a prefix proves nothing: the live check's id is signed::

    live-check-v<version>-<nonce>-<mac>

- ``nonce``: the second it was made (8 hex digits), then 64 random bits (16 hex digits);
- ``mac``: HMAC-SHA256 of ``v<version>:<nonce>`` under the live-check key, its first 128 bits in hex.

The key is derived (HMAC with ``KEY_CONTEXT``) from ``MNIST_LIVE_CHECK_KEY`` when it is set, else
from the S3 secret access key the store's clients sign with: the publisher and the drift flow hold
it already, a caller never does, and nothing new needs distributing. Temporary credentials (with a
session token) rotate, so they give no key: without ``MNIST_LIVE_CHECK_KEY`` a live check is then
signed by nothing and counts as served traffic, the safe side.

An entry is a live check only if its id verifies, names the version that answered it and was
logged within ``MAX_SKEW`` of the second it was made; the drift flow also takes each id as a live
check once (``FirstLiveChecks``): a replay of it is served traffic.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from storage.logs import LogEntry
from storage.s3 import long_lived_secret
from storage.settings import TrafficSettings

PREFIX = "live-check-"
KEY_CONTEXT = b"mnist live-check key v1"
MAC_HEX = 32  # 128 bits of the HMAC
MIN_KEY_CHARACTERS = 16  # MNIST_LIVE_CHECK_KEY
SIGNED_ID = re.compile(rf"{PREFIX}v([1-9][0-9]{{0,9}})-([0-9a-f]{{24}})-([0-9a-f]{{{MAC_HEX}}})")
# How far apart the second an id was made and the gateway's time for the call may be: the call
# follows at once, so this only allows for clocks that disagree. An id found later is no live check.
MAX_SKEW = timedelta(minutes=10)


@dataclass(frozen=True)
class LiveCheckKey:
    """The key live checks are signed and verified with, and where it came from (never the key)."""

    secret: bytes = field(repr=False)
    source: str = "MNIST_LIVE_CHECK_KEY"

    def mac(self, version: int, nonce: str) -> str:
        return hmac.new(self.secret, f"v{version}:{nonce}".encode(), hashlib.sha256).hexdigest()[:MAC_HEX]

    def request_id(self, version: int, now: float | None = None) -> str:
        """A fresh signed id for a live check of ``version``, made at ``now`` (Unix seconds)."""
        nonce = f"{int(time.time() if now is None else now):08x}{secrets.token_hex(8)}"
        return f"{PREFIX}v{version}-{nonce}-{self.mac(version, nonce)}"

    def marks(self, entry: LogEntry) -> bool:
        """Whether ``entry`` is a publish's live check: its client request id verifies, names the
        version that answered, and was logged within MAX_SKEW of the second the id was made."""
        match = SIGNED_ID.fullmatch(entry.client_request_id)
        if match is None or entry.version is None:
            return False
        version, nonce, mac = int(match[1]), match[2], match[3]
        if not hmac.compare_digest(self.mac(version, nonce), mac) or version != entry.version:
            return False
        try:
            logged = datetime.fromisoformat(entry.time)
        except ValueError:
            return False
        made = datetime.fromtimestamp(int(nonce[:8], 16), timezone.utc)
        return logged.tzinfo is not None and abs(logged - made) <= MAX_SKEW


class FirstLiveChecks:
    """A window's live checks, entry by entry in the order they were logged: an id that ``key``
    marks counts as a live check the first time only; a replay of it is served traffic. With no
    key, nothing is a live check."""

    def __init__(self, key: LiveCheckKey | None):
        self.key = key
        self.seen: set[str] = set()

    def take(self, entry: LogEntry) -> bool:
        """Whether ``entry`` is a live check to leave out (and, if so, its id is now used)."""
        if self.key is None or entry.client_request_id in self.seen or not self.key.marks(entry):
            return False
        self.seen.add(entry.client_request_id)
        return True


def live_check_key(settings: TrafficSettings) -> LiveCheckKey | None:
    """The key of ``MNIST_LIVE_CHECK_KEY``, else the one derived from the store's long-lived S3
    secret key; None with neither (then no traffic is a live check)."""
    if settings.live_check_key is not None:
        given = settings.live_check_key.get_secret_value()
        if len(given) < MIN_KEY_CHARACTERS:  # said here, not by the field: pydantic's error shows the value
            raise ValueError(f"MNIST_LIVE_CHECK_KEY is shorter than {MIN_KEY_CHARACTERS} characters")
        material, source = given, "MNIST_LIVE_CHECK_KEY"
    else:
        secret = long_lived_secret()
        if secret is None:
            return None
        material, source = secret, "the store's S3 secret key"
    return LiveCheckKey(hmac.new(material.encode(), KEY_CONTEXT, hashlib.sha256).digest(), source)


def key_note(key: LiveCheckKey | None) -> str:
    """How a flow tells live checks apart, for its log."""
    if key is None:
        return ("no live-check key (no MNIST_LIVE_CHECK_KEY and no long-lived S3 secret key): "
                "live checks count as served traffic")
    return f"live checks verified with the key from {key.source}"
