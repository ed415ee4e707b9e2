"""Generate a benchmark export: N messages over C customers, interleaved round-robin by
customer (as an export sorted by time is), each a realistic 300-500 byte JSON line; with
--sorted, each customer's messages one after another (an export sorted by customer).

    python bench/gen_data.py OUT.jsonl --messages 100000 --customers 1000 [--sorted]

Deterministic: the same arguments always give the same file.
"""

from __future__ import annotations

import argparse
import json
import random
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

#: Bump when the generated content changes, so cached files are regenerated.
VERSION = 1

NS = uuid.UUID("0b7d6f9e-4f57-4c1e-9d8a-2a6c1f3e5b70")
DEPARTMENTS = ["sales-emea", "support-nordics", "billing", "onboarding", "retention"]
NAMES = ["Anna", "Jonas", "Maria", "Lukas", "Sofia", "Elias", "Emma", "Noah", "Lea", "Finn"]
INBOUND = [
    "Hi, I was charged twice for March. Could you please check invoice {n} and refund one?",
    "My order {n} has not arrived yet, the tracking page has shown no update for a week now.",
    "I cannot log in since yesterday, the password reset link expires immediately. Help?",
    "We would like to renew our contract for another year, with {n} seats this time please.",
    "The lamp arrived with a cracked shade, I attached a photo of the box (order {n}).",
    "Can I change the delivery address for order {n}? I am moving at the end of the month.",
]
OUTBOUND = [
    "Thanks {name}, I have forwarded this to our team and will get back to you later today.",
    "Hello {name}, that is sorted now: the duplicate charge was refunded. Anything else?",
    "Dear {name}, we have issued a credit note, you will see it on your next invoice.",
    "Hi {name}, a replacement is on its way and should arrive within two working days.",
]
SUBJECTS = ["Invoice question", "Delivery delayed", "Login problem", "Contract renewal"]


def sid(*parts: object) -> str:
    return str(uuid.uuid5(NS, "/".join(map(str, parts))))


def iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def generate(
    path: Path, messages: int, customers: int, seed: int = 7, *, by_customer: bool = False
) -> None:
    """Write the export to `path` (atomically, so an interrupted run leaves no half file);
    `by_customer`: the same messages, sorted by customer."""
    rng = random.Random(seed)
    start = datetime(2021, 3, 1, 8, 0, tzinfo=UTC)
    people = []
    for c in range(customers):
        people.append(
            {
                "department": DEPARTMENTS[c % len(DEPARTMENTS)],
                "customer": sid("customer", c),
                "agent": sid("agent", c % 37),
                "name": rng.choice(NAMES),
                "protocol": rng.choice(["EMAIL", "SMS", "CHAT"]),
            }
        )
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as out:
        for n in range(messages):
            i = _sorted_index(n, messages, customers) if by_customer else n
            c = i % customers
            turn = i // customers
            person = people[c]
            moment = start + timedelta(minutes=i * 3 + rng.randint(0, 2), seconds=rng.random())
            inbound = turn % 2 == 0
            if inbound:
                body = rng.choice(INBOUND).format(n=rng.randint(10000, 99999))
            else:
                body = rng.choice(OUTBOUND).format(name=person["name"])
            attributes: dict[str, object] = {
                "body": body,
                "protocol": person["protocol"],
                "type": "INBOUND" if inbound else "OUTBOUND",
                "isManual": not inbound,
                "tags": ["imported"],
            }
            if person["protocol"] == "EMAIL":
                attributes["subject"] = rng.choice(SUBJECTS)
            message: dict[str, object] = {
                "departmentUUID": person["department"],
                "customerUUID": person["customer"],
                "sourceUuid": sid("msg", c, turn),
                "sentOn": iso(moment),
                "receivedOn": iso(moment + timedelta(seconds=rng.randint(1, 30))),
                "messageAttributes": attributes,
            }
            if not inbound:
                message["userUuid"] = person["agent"]
            out.write(json.dumps(message, ensure_ascii=False, separators=(",", ":")) + "\n")
    tmp.replace(path)


def _sorted_index(n: int, messages: int, customers: int) -> int:
    """The interleaved position of the n-th message of the export sorted by customer."""
    per_customer, extra = divmod(messages, customers)
    # Customer c holds per_customer (+1 for the first `extra`) messages, c, c + C, ...
    big = extra * (per_customer + 1)
    if n < big:
        c, turn = divmod(n, per_customer + 1)
    else:
        c, turn = divmod(n - big, per_customer)
        c += extra
    return turn * customers + c


def data_file(folder: Path, messages: int, customers: int, *, by_customer: bool = False) -> Path:
    """The export for these sizes, generated on first use and reused afterwards."""
    folder.mkdir(parents=True, exist_ok=True)
    order = "-sorted" if by_customer else ""
    path = folder / f"export-v{VERSION}-{messages}x{customers}{order}.jsonl"
    if not path.exists():
        generate(path, messages, customers, by_customer=by_customer)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--customers", type=int, default=1_000)
    parser.add_argument("--sorted", action="store_true", help="sorted by customer")
    args = parser.parse_args()
    generate(args.out, args.messages, args.customers, by_customer=args.sorted)


if __name__ == "__main__":
    main()
