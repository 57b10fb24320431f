"""Closed-loop HTTP clients in a process of their own, so that they do not share the server's GIL.

    echo '{"base_url": ..., "headers": {...}, "requests": [[path, body], ...], "concurrency": 8}' |
        python -m bench.loadgen

Each of `concurrency` clients sends its next request when its previous one is answered (the same
`drive` the benchmarks use in-process). Prints one JSON object: the wall time from the first request
sent to the last answer read (process start-up excluded), and per answer its latency and a trimmed
payload (`usage`, and `data` as a list of nulls of the same length: images are not sent back).
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import aiohttp

from bench.common import drive


def trimmed(payload: dict[str, Any]) -> dict[str, Any]:
    return {
        "usage": payload.get("usage"),
        "data": [None] * len(payload.get("data") or []),
        "events": payload.get("events"),  # streamed answers: chunks before [DONE]
    }


async def main(job: dict[str, Any]) -> dict[str, Any]:
    requests = [(path, body) for path, body in job["requests"]]
    connector = aiohttp.TCPConnector(limit=int(job["concurrency"]) * 2)
    timeout = aiohttp.ClientTimeout(total=900)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, headers=job["headers"]) as session:
        wall_s, answers = await drive(
            session, job["base_url"], lambda i: requests[i], range(len(requests)), int(job["concurrency"])
        )
    return {"wall_s": wall_s, "answers": [[latency, trimmed(payload)] for latency, payload in answers]}


if __name__ == "__main__":
    json.dump(asyncio.run(main(json.load(sys.stdin))), sys.stdout)
