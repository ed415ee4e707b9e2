"""The import script a user would write instead of histimport: read the whole file, group the
messages by (department, customer), PUT each chunk of 100 in turn, one after another.

    python bench/naive.py EXPORT.jsonl --base-url URL

It uses a synchronous `httpx.Client` (one kept-alive connection), which is what
`requests.Session().put` would do; `requests` is not installed in the project's venv. Its
only error handling is the least a rate-limited server needs: on a 429, sleep Retry-After
and send the same request again. Credentials come from HISTIMPORT_USERNAME and
HISTIMPORT_PASSWORD. Prints one JSON line of counts on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import httpx

CHUNK = 100


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("source")
    parser.add_argument("--base-url", required=True)
    args = parser.parse_args()

    with open(args.source, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        key = (row.pop("departmentUUID"), row.pop("customerUUID"))
        groups.setdefault(key, []).append(row)

    auth = (os.environ.get("HISTIMPORT_USERNAME", ""), os.environ.get("HISTIMPORT_PASSWORD", ""))
    requests = throttled = accepted = 0
    with httpx.Client(auth=auth, timeout=30) as client:
        for (department, customer), messages in groups.items():
            url = (
                f"{args.base_url}/department/{department}/customer/{customer}"
                "/communication/historical"
            )
            for i in range(0, len(messages), CHUNK):
                body = {"saveMessageRequestList": messages[i : i + CHUNK]}
                while True:
                    requests += 1
                    response = client.put(url, json=body)
                    if response.status_code != 429:
                        break
                    throttled += 1
                    time.sleep(float(response.headers.get("Retry-After", "1")))
                response.raise_for_status()
                accepted += len(response.json()["succesfullySubmittedSourceUuids"])

    print(json.dumps({"requests": requests, "throttled": throttled, "accepted": accepted}))
    return 0 if accepted == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
