"""Waiting for a gone upstream to come back: the links standing in for it (``relay.py``) are held
here, one probe tries upstream for all of them, and once it answers HTTP/2 again every link is
sent away (GOAWAY) so its caller reconnects at once."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

from serving.gateway.http2 import PREFACE, SETTINGS, frame

log = logging.getLogger("mnist.gateway")
PROBE_SECONDS = 0.2  # how often a relay standing in for a gone upstream tries to reach it again
ANSWER_SECONDS = 3.0  # an upstream that takes a connection but sends no SETTINGS within this is not there


class Link(Protocol):
    """A caller's connection standing in for upstream (``relay.Link``)."""

    def send_away(self) -> None: ...


class UpstreamProbe:
    """On the relay's loop only."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.waiting: set[Link] = set()  # links standing in for a gone upstream
        self.task: asyncio.Task | None = None

    def hold(self, link: Link, reason: str) -> None:
        """Hold ``link`` until upstream answers again (one probe for all of them, said once)."""
        self.waiting.add(link)
        if self.task is None or self.task.done():
            log.warning("upstream %s:%s gone (%s): calls answered UNAVAILABLE until it is back", self.host,
                        self.port, reason)
            self.task = asyncio.get_running_loop().create_task(self.run())

    def release(self, link: Link) -> None:
        self.waiting.discard(link)

    async def answers(self) -> bool:
        """Whether upstream speaks HTTP/2 again: its SETTINGS in answer to a client preface (a TCP
        connect alone is taken by a stopped server's kernel too)."""
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), ANSWER_SECONDS)
        except (OSError, asyncio.TimeoutError):
            return False
        try:
            writer.write(PREFACE + frame(SETTINGS, 0, 0, b""))
            head = await asyncio.wait_for(reader.readexactly(9), ANSWER_SECONDS)
            return head[3] == SETTINGS
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
            return False
        finally:
            writer.close()

    async def run(self) -> None:
        started = time.monotonic()
        while self.waiting:
            if not await self.answers():
                await asyncio.sleep(PROBE_SECONDS)
                continue
            waiting, self.waiting = list(self.waiting), set()
            log.warning("upstream %s:%s back after %.1f s: %d callers sent to reconnect", self.host, self.port,
                        time.monotonic() - started, len(waiting))
            for link in waiting:
                link.send_away()
