"""Bounded memory and full chunks, whatever the input order: a large export that interleaves
thousands of customers, imported by `histimport load` against a server in its own process.

    .venv/bin/python bench/memory.py [--messages 400000] [--customers 8000]   (make bench-memory)

Prints the client's peak RSS (from os.wait4 on its pid alone) and its requests against the
ideal, the sum over customers of ceil(messages / chunk size). Exits 1 if a message was not
stored, or if the peak exceeds --max-rss-mib or the requests exceed 1.1 x the ideal.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys

from gen_data import data_file
from run import DATA, OUT, Profile, Server, client_argv, client_env, reap

CHUNK = 100


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=400_000)
    parser.add_argument("--customers", type=int, default=8_000)
    parser.add_argument("--max-rss-mib", type=float, default=200.0)
    args = parser.parse_args()
    source = data_file(DATA, args.messages, args.customers)
    per_customer, extra = divmod(args.messages, args.customers)
    ideal = sum(-(-(per_customer + (c < extra)) // CHUNK) for c in range(args.customers))
    workdir = OUT / "memory"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    server = Server(Profile("memory", 0.0), "memory", workdir / "server.log")
    try:
        argv = client_argv("histimport", source, server.base_url, workdir)
        wall, usage, code = reap(argv, cwd=workdir, env=client_env(), timeout=3600)
        stored = server.get("/_sandbox/stats")["stored"]
    finally:
        server.stop()
    report = json.loads((workdir / "report.json").read_text())
    rss_mib = usage.ru_maxrss / 1024
    requests = report["requests"]
    print(f"{args.messages:,} messages over {args.customers:,} customers, interleaved")
    print(f"exit {code}, stored {stored:,}, wall {wall:.1f} s")
    print(f"peak RSS {rss_mib:.1f} MiB (limit {args.max_rss_mib:g})")
    print(f"requests {requests:,}, ideal {ideal:,}: {requests / ideal:.3f} x (limit 1.1)")
    ok = code == 0 and stored == args.messages
    ok = ok and rss_mib <= args.max_rss_mib and requests <= 1.1 * ideal
    print("PASS" if ok else "FAIL")
    if ok:
        shutil.rmtree(workdir / "state", ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
