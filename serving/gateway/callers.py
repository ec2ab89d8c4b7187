"""Who may write through the gateway: bearer tokens from a file, checked in constant time, and a
rate per caller.

The file (``mnist gateway --feedback-tokens FILE``, a Kubernetes Secret mounted as a file) has one
caller a line: ``NAME TOKEN`` or ``NAME TOKEN trusted``; ``#`` starts a comment; a token has at
least MIN_TOKEN_CHARS characters. The gateway reads it again when it changes, or on SIGHUP. A trusted caller's
labels become training data as they come; anyone else's wait in quarantine until enough other
callers agree or an operator accepts them (``storage/feedback.py``). Reads of predictions stay as
open as TF Serving's own: only the gateway's write path, feedback, asks for a token.
"""

from __future__ import annotations

import hmac
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from storage.errors import MnistError

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
MIN_TOKEN_CHARS = 24  # secrets.token_urlsafe(18) and up: not guessable within any rate limit


class CallerFileError(MnistError, ValueError):
    """A token file that cannot be used, said in one line."""

    status = "INVALID_ARGUMENT"


@dataclass(frozen=True)
class Caller:
    name: str
    trusted: bool


@dataclass(frozen=True)
class Credential:
    token: bytes
    caller: Caller


def read_token_file(path: Path) -> list[Credential]:
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise CallerFileError(f"{path}: cannot read it ({getattr(error, 'strerror', None) or error})") from None
    credentials: list[Credential] = []
    for number, line in enumerate(lines, start=1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) not in (2, 3) or (len(words) == 3 and words[2] != "trusted"):
            raise CallerFileError(f"{path}:{number}: expected 'NAME TOKEN' or 'NAME TOKEN trusted'")
        name, token = words[0], words[1]
        if not NAME_PATTERN.match(name):
            raise CallerFileError(f"{path}:{number}: caller name {name!r}: lower-case letters, digits, '.', '_', '-'")
        if len(token) < MIN_TOKEN_CHARS:
            raise CallerFileError(f"{path}:{number}: {name}'s token is shorter than {MIN_TOKEN_CHARS} characters")
        if any(c.caller.name == name for c in credentials):
            raise CallerFileError(f"{path}:{number}: caller {name} is listed twice")
        credentials.append(Credential(token.encode(), Caller(name, len(words) == 3)))
    if not credentials:
        raise CallerFileError(f"{path}: lists no caller")
    return credentials


class Authenticator:
    """A request's caller from its ``Authorization: Bearer TOKEN`` header, or None. With
    ``source``, the token file is read again when it changes (checked at each request: a stat) or
    on ``reload()`` (SIGHUP): callers are added and revoked without a restart. A file that no longer
    reads keeps the callers it had, and says why once."""

    def __init__(self, credentials: list[Credential], source: Path | None = None,
                 warn: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)):
        self.credentials, self.source, self.warn = credentials, source, warn
        self.lock = threading.Lock()
        self.seen = self.stamp()

    def stamp(self) -> tuple[int, int, int] | None:
        try:
            stat = self.source.stat() if self.source else None
        except OSError:
            return None
        return (stat.st_ino, stat.st_size, stat.st_mtime_ns) if stat else None

    def reload(self, force: bool = False) -> None:
        if self.source is None:
            return
        with self.lock:
            stamp = self.stamp()
            if stamp == self.seen and not force:
                return
            self.seen = stamp
            try:
                self.credentials = read_token_file(self.source)
            except CallerFileError as error:
                self.warn(f"mnist gateway: --feedback-tokens not reloaded, the callers before stay: {error}")
                return
            self.warn(f"mnist gateway: --feedback-tokens reloaded: {len(self.credentials)} callers")

    def caller(self, authorization: str | None) -> Caller | None:
        self.reload()
        scheme, _, token = (authorization or "").partition(" ")
        offered = token.strip().encode()
        found = None
        for credential in self.credentials:  # every token compared, in constant time: no timing tells which
            if hmac.compare_digest(credential.token, offered) and scheme.lower() == "bearer":
                found = credential.caller
        return found


@dataclass
class RateLimit:
    """A token bucket per caller: ``per_minute`` writes a minute, in bursts of up to as many."""

    per_minute: float
    buckets: dict[str, tuple[float, float]] = field(default_factory=dict)  # caller -> (tokens, when)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def allow(self, caller: str) -> float:
        """0 when the caller may write now, else the seconds until it may."""
        now = time.monotonic()
        with self.lock:
            tokens, then = self.buckets.get(caller, (self.per_minute, now))
            tokens = min(self.per_minute, tokens + (now - then) * self.per_minute / 60)
            if tokens >= 1:
                self.buckets[caller] = (tokens - 1, now)
                return 0.0
            self.buckets[caller] = (tokens, now)
            return (1 - tokens) * 60 / self.per_minute
