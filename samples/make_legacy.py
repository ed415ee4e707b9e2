"""Write samples/legacy-helpdesk.csv: an export from an old helpdesk, in its own shape.

    python samples/make_legacy.py > samples/legacy-helpdesk.csv

Local Berlin times as `27/03/2025 14:05`, channel and direction in the helpdesk's words,
quoted texts with commas and line breaks; samples/legacy-helpdesk.map.toml maps it.
"""

from __future__ import annotations

import csv
import random
import sys
from datetime import datetime, timedelta

rng = random.Random(1998)
TEAMS = ["Support Nordics", "Billing", "Sales EMEA"]
CHANNELS = ["mail", "sms", "chat", "Mail"]
NAMES = [("Anna", "Berg"), ("Jonas", "Keller"), ("Maria", "Lund"), ("Lukas", "Wolf")]
TEXTS = [
    "Hello,\nmy invoice shows the wrong address, could you fix it?\nThanks",
    "The parcel arrived damaged, the box was wet, the lamp is broken.",
    'Your "premium" plan is not what I ordered; please cancel it.',
    "Wie kann ich meine Rechnung herunterladen? Grüße",
    "Thanks, that worked!",
]
REPLIES = [
    "We have corrected the address, a new invoice is on its way.",
    "Sorry about that, a replacement ships today, tracking follows.",
    "Done, the plan is cancelled and the difference refunded.",
]


def main() -> None:
    out = csv.writer(sys.stdout, lineterminator="\n")
    out.writerow(
        [
            "ticket_id",
            "msg_no",
            "customer_id",
            "team",
            "created_at",
            "channel",
            "direction",
            "agent",
            "first_name",
            "last_name",
            "subject",
            "text",
        ]
    )
    # Around both daylight-saving changes in Berlin, and an ordinary day.
    starts = [
        datetime(2025, 3, 29, 22, 10),
        datetime(2025, 10, 25, 23, 40),
        datetime(2025, 3, 27, 14, 5),
    ]
    ticket = 40100
    for customer in range(24):
        first, last = NAMES[customer % len(NAMES)]
        moment = starts[customer % len(starts)] + timedelta(minutes=customer)
        for _ in range(rng.randint(1, 2)):
            ticket += 1
            team = TEAMS[ticket % len(TEAMS)]
            channel = CHANNELS[ticket % len(CHANNELS)]
            subject = f"Ticket {ticket}"
            for msg_no in range(1, rng.randint(3, 5)):
                inbound = msg_no % 2 == 1
                out.writerow(
                    [
                        ticket,
                        msg_no,
                        7000 + customer,
                        team,
                        moment.strftime("%d/%m/%Y %H:%M"),
                        channel,
                        "in" if inbound else "out",
                        "" if inbound else f"agent-{ticket % 3}",
                        first,
                        last,
                        subject,
                        rng.choice(TEXTS) if inbound else rng.choice(REPLIES),
                    ]
                )
                moment += timedelta(minutes=rng.randint(20, 90))


if __name__ == "__main__":
    main()
