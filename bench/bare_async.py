"""A bare asynchronous import: the lower bound on wall time for this endpoint from Python.

    python bench/bare_async.py EXPORT.jsonl --base-url URL [--concurrency 8]

Reads the whole file, groups it by (department, customer), cuts chunks of 100 per customer
and keeps 8 requests in flight with `httpx.AsyncClient`. No validation, no ledger, no order
between a customer's chunks, no retries except the least a rate-limited server needs: on a
429 or a 503, sleep Retry-After (or a second) and send the same request again. Credentials come from
HISTIMPORT_USERNAME and HISTIMPORT_PASSWORD. Prints one JSON line of counts on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

import httpx


async def send_all(base_url: str, chunks: list[tuple[str, str, list[dict]]], width: int) -> dict:
    auth = (os.environ.get("HISTIMPORT_USERNAME", ""), os.environ.get("HISTIMPORT_PASSWORD", ""))
    limits = httpx.Limits(max_connections=width, max_keepalive_connections=width)
    counts = {"requests": 0, "throttled": 0, "accepted": 0, "errors": 0}
    queue = iter(chunks)

    async def worker(client: httpx.AsyncClient) -> None:
        for department, customer, messages in queue:
            url = f"{base_url}/department/{department}/customer/{customer}/communication/historical"
            while True:
                counts["requests"] += 1
                response = await client.put(url, json={"saveMessageRequestList": messages})
                if response.status_code not in (429, 503):
                    break
                counts["throttled"] += 1
                await asyncio.sleep(float(response.headers.get("Retry-After", "1")))
            if response.status_code == 200:
                counts["accepted"] += len(response.json()["succesfullySubmittedSourceUuids"])
            else:
                counts["errors"] += 1

    async with httpx.AsyncClient(auth=auth, timeout=30, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(width)))
    return counts


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("source")
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--chunk-size", type=int, default=100)
    args = parser.parse_args()
    chunk = args.chunk_size

    with open(args.source, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        key = (row.pop("departmentUUID"), row.pop("customerUUID"))
        groups.setdefault(key, []).append(row)
    chunks = [
        (department, customer, messages[i : i + chunk])
        for (department, customer), messages in groups.items()
        for i in range(0, len(messages), chunk)
    ]

    counts = asyncio.run(send_all(args.base_url, chunks, args.concurrency))
    print(json.dumps(counts))
    return 0 if counts["accepted"] == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
