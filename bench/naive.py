"""The import script a user would write instead of histimport: read the whole file, group the
messages by (department, customer) in a dict, `requests.put` each chunk of 100 in turn, one
after another.

    python bench/naive.py EXPORT.jsonl --base-url URL [--session]

`requests.put` opens a connection per request, as such a script does; with `--session` it
keeps one connection alive (`requests.Session`), the better script a careful user writes.
Its only error handling is the least a rate-limited server needs: on a 429, sleep
Retry-After and send the same request again. Credentials come from HISTIMPORT_USERNAME and
HISTIMPORT_PASSWORD. Prints one JSON line of counts on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import requests

CHUNK = 100


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("source")
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--session", action="store_true", help="keep one connection alive")
    args = parser.parse_args()

    with open(args.source, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        key = (row.pop("departmentUUID"), row.pop("customerUUID"))
        groups.setdefault(key, []).append(row)

    auth = (os.environ.get("HISTIMPORT_USERNAME", ""), os.environ.get("HISTIMPORT_PASSWORD", ""))
    put = requests.Session().put if args.session else requests.put
    sent = throttled = accepted = 0
    for (department, customer), messages in groups.items():
        path = f"/department/{department}/customer/{customer}/communication/historical"
        url = args.base_url + path
        for i in range(0, len(messages), CHUNK):
            body = {"saveMessageRequestList": messages[i : i + CHUNK]}
            while True:
                sent += 1
                response = put(url, json=body, auth=auth, timeout=30)
                if response.status_code != 429:
                    break
                throttled += 1
                time.sleep(float(response.headers.get("Retry-After", "1")))
            response.raise_for_status()
            accepted += len(response.json()["succesfullySubmittedSourceUuids"])

    print(json.dumps({"requests": sent, "throttled": throttled, "accepted": accepted}))
    return 0 if accepted == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
