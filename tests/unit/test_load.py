"""layercache.testing.load against a scripted inference endpoint (http.server on 127.0.0.1 in a thread)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from layercache.evaluation import from_run, summarize_latency
from layercache.testing.load import BAD_ANSWER, EXIT_HEADER, NO_ANSWER, predict, send_all

NAMES = {"cat": 0, "dog": 1}


class _Handler(BaseHTTPRequestHandler):
    """Body ``cat``/``dog`` -> that class (with an exit header for dog); ``bad`` -> 400; ``junk`` -> 200 non-JSON;
    on ``/secure/`` paths 400 unless ``Authorization: Bearer k`` (as TorchServe with token authorization on)."""

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"])).decode()
        if self.path.startswith("/secure/") and self.headers.get("Authorization") != "Bearer k":
            self._reply(400, b'{"code": 400, "type": "InvalidKeyException", "message": "Token Authorization failed"}')
        elif body == "bad":
            self._reply(400, b'{"code": 400, "message": "not an image"}')
        elif body == "junk":
            self._reply(200, b"<html>")
        else:
            other = "dog" if body == "cat" else "cat"
            headers = {EXIT_HEADER: "layer1.0.relu_1"} if body == "dog" else {}
            self._reply(200, json.dumps({body: 0.9, other: 0.1}).encode(), headers)

    def _reply(self, code: int, payload: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/predictions/m"
    finally:
        server.shutdown()
        server.server_close()


def test_predict_reads_the_top_class_the_exit_header_and_errors(url: str) -> None:
    cat, dog = predict(url, b"cat", NAMES), predict(url, b"dog", NAMES)
    assert (cat.status, cat.predicted, cat.exit) == (200, 0, None)
    assert (dog.status, dog.predicted, dog.exit) == (200, 1, "layer1.0.relu_1")
    bad = predict(url, b"bad", NAMES)
    assert bad.status == 400 and "not an image" in bad.error and bad.predicted is None
    assert predict(url, b"junk", NAMES).status == BAD_ANSWER
    assert predict(url, b"bird", NAMES).status == BAD_ANSWER  # a class the caller does not know
    closed = predict("http://127.0.0.1:9/predictions/m", b"cat", NAMES, timeout_s=2)
    assert closed.status == NO_ANSWER and closed.error


def test_send_all_answers_in_body_order_and_summarize_counts_failures(url: str) -> None:
    bodies = [b"cat", b"dog", b"bad", b"cat"] * 5
    seen: list[int] = []

    def progress(answers, desc, total):  # type: ignore[no-untyped-def]
        seen.append(total)
        return answers

    run = send_all(url, bodies, 4, NAMES, progress=progress, desc="t")
    assert seen == [20]
    assert [a.predicted for a in run.answers[:4]] == [0, 1, None, 0]
    assert run.failed == 5
    stats = summarize_latency(from_run(run))
    assert stats["requests"] == 20 and stats["errors"] == 5 and stats["rps"] > 0
    assert 0 < stats["p50_ms"] <= stats["p90_ms"] <= stats["p99_ms"]
    with pytest.raises(ValueError, match="concurrency"):
        send_all(url, bodies, 0, NAMES)


def test_predict_and_send_all_send_the_token_as_a_bearer_header(url: str) -> None:
    secure = url.replace("/predictions/", "/secure/")
    refused = predict(secure, b"cat", NAMES)
    assert refused.status == 400 and "Token Authorization failed" in refused.error
    assert predict(secure, b"cat", NAMES, token="k").predicted == 0
    assert predict(secure, b"cat", NAMES, token="wrong").status == 400
    run = send_all(secure, [b"cat", b"dog"] * 3, 2, NAMES, token="k")
    assert run.failed == 0 and [a.predicted for a in run.answers] == [0, 1] * 3
