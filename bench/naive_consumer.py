"""The naive consumer the seed's "before" column describes, for ``make bench`` only.

Per message: open a database connection, apply the one row (upsert or delete), commit, close,
then commit the message's offset synchronously. No batching, no pool, no idempotency record.
Reads the same env file as ``consumer_final.py``.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys

import psycopg2
from confluent_kafka import Consumer
from dotenv import dotenv_values

UPSERT = """
INSERT INTO employees (emp_id, first_name, last_name, dob, city, salary)
VALUES (%(emp_id)s, %(first_name)s, %(last_name)s, %(dob)s, %(city)s, %(salary)s)
ON CONFLICT (emp_id) DO UPDATE SET first_name = EXCLUDED.first_name, last_name = EXCLUDED.last_name,
    dob = EXCLUDED.dob, city = EXCLUDED.city, salary = EXCLUDED.salary
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--env-file", required=True)
    args = p.parse_args()
    env = dotenv_values(args.env_file)
    consumer = Consumer(
        {
            "bootstrap.servers": env["KAFKA_BOOTSTRAP_SERVERS"],
            "group.id": env["CONSUMER_GROUP_ID"],
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    consumer.subscribe([env["CDC_TOPIC"]])
    try:
        while not stopping:
            msg = consumer.poll(0.5)
            if msg is None or msg.error():
                continue
            event = json.loads(msg.value())
            conn = psycopg2.connect(env["DEST_DB_URL"])
            try:
                with conn.cursor() as cur:
                    if event["action"] == "DELETE":
                        cur.execute("DELETE FROM employees WHERE emp_id = %s", (event["emp_id"],))
                    else:
                        cur.execute(UPSERT, event)
                conn.commit()
            finally:
                conn.close()
            consumer.commit(msg, asynchronous=False)
    finally:
        consumer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
