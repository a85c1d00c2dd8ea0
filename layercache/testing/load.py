"""HTTP clients for a served image classifier: one prediction, a closed loop of many, and their summary.

Used by the demo and the benchmarks (standard library only, no torch). A prediction's answer is what TorchServe's
image classifier handlers return, ``{class name: probability}`` for the top classes; the layercache handlers add
the ``X-Layercache-Exit`` header. With TorchServe's token authorization on, pass the inference key as ``token``
(sent as ``Authorization: Bearer <token>``); without it TorchServe answers 400.

Example::

    run = send_all(f"{base}/predictions/fashion", bodies, concurrency=8, name_to_index=names, token=key)
    stats = summarize_latency(from_run(run))    # layercache.evaluation: rps, p50/p90/p99 ms, errors
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from layercache.config import EXIT_HEADER

logger = logging.getLogger(__name__)

__all__ = ["EXIT_HEADER", "Answer", "Run", "predict", "send_all"]

REQUEST_TIMEOUT_S = 30.0

# status codes of answers that never got an HTTP status
NO_ANSWER = -1  # refused, reset, timed out
BAD_ANSWER = -2  # 200 with a body that is not a {class name: probability} map of known classes


@dataclass(frozen=True)
class Answer:
    """One prediction request: HTTP status (or ``NO_ANSWER`` / ``BAD_ANSWER``), latency, exit header, class index."""

    status: int
    seconds: float
    exit: str | None
    predicted: int | None
    error: str = ""


@dataclass(frozen=True)
class Run:
    """Answers of one batch of requests, in the order of the bodies sent, and the wall time of the whole batch."""

    answers: list[Answer]
    seconds: float

    @property
    def failed(self) -> int:
        return sum(a.status != 200 for a in self.answers)


def predict(
    url: str,
    body: bytes,
    name_to_index: dict[str, int],
    *,
    timeout_s: float = REQUEST_TIMEOUT_S,
    content_type: str = "image/png",
    token: str | None = None,
) -> Answer:
    """POST one image and read the top class (as an index) and the exit header of the answer.

    ``token``: TorchServe's inference key, sent as ``Authorization: Bearer``; None sends no such header.
    """
    headers = {"Content-Type": content_type}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=body, method="POST", headers=headers)
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            payload = response.read()
            seconds = time.perf_counter() - t0
            exit_name = response.headers.get(EXIT_HEADER)
    except urllib.error.HTTPError as error:
        return Answer(error.code, time.perf_counter() - t0, None, None, error.read().decode("utf-8", "replace")[:200])
    except OSError as error:
        return Answer(NO_ANSWER, time.perf_counter() - t0, None, None, repr(error))
    try:
        scores = json.loads(payload)
        predicted = name_to_index[max(scores, key=scores.get)]
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        return Answer(BAD_ANSWER, seconds, exit_name, None, f"unexpected answer {payload[:200]!r}: {error!r}")
    return Answer(200, seconds, exit_name, predicted)


def send_all(
    url: str,
    bodies: Sequence[bytes],
    concurrency: int,
    name_to_index: dict[str, int],
    *,
    progress: Callable[[Iterable[Answer], str, int], Iterable[Answer]] | None = None,
    desc: str = "requests",
    token: str | None = None,
) -> Run:
    """Closed loop: ``concurrency`` client threads send every body once, each as soon as its previous answer came
    back; answers come back in body order. ``token``: the inference key, as for :func:`predict`."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="layercache-client") as pool:
        answers_it: Iterable[Answer] = pool.map(lambda b: predict(url, b, name_to_index, token=token), bodies)
        if progress is not None:
            answers_it = progress(answers_it, desc, len(bodies))
        answers = list(answers_it)
    run = Run(answers, time.perf_counter() - t0)
    first_bad = next((a for a in answers if a.status != 200), None)
    if first_bad is not None:
        logger.warning(
            "%s: %d of %d failed, e.g. %s %s", desc, run.failed, len(answers), first_bad.status, first_bad.error
        )
    return run
