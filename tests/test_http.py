"""The small HTTP server both REST APIs answer through, on loopback."""

from __future__ import annotations

import httpx

from serving.protocol.http import HttpServer, Reply, Request, json_reply


def test_a_handler_that_fails_answers_500_and_the_connection_lives_on() -> None:
    def respond(request: Request) -> Reply:
        if request.path == "/bug":
            raise KeyError("a bug")
        return json_reply(200, {"path": request.path})

    server = HttpServer("127.0.0.1", 0, 1024, respond).start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=10) as client:
            failed = client.get("/bug")
            assert failed.status_code == 500 and "GET /bug" in failed.json()["error"]
            assert client.get("/fine").json() == {"path": "/fine"}  # same client, kept-alive connection
    finally:
        server.stop()
