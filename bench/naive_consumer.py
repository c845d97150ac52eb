"""The naive consumer the seed's "before" column describes, for ``make bench`` only.

Per message: open a database connection, apply the one row (upsert or delete), commit, close,
then commit the message's offset synchronously. No batching, no pool, no idempotency record.
Reads the same env file as ``consumer_final.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
from pathlib import Path

import psycopg2
from confluent_kafka import Consumer
from dotenv import dotenv_values
from psycopg2 import sql

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cdc.model.table import SOURCE_TABLE, Table


def statements(url: str) -> tuple[str, str, str]:
    """The upsert and the delete for the destination table, read from its catalog at start, and
    the event field holding the key."""
    with contextlib.closing(psycopg2.connect(url)) as conn, conn.cursor() as cur:
        table = Table.load(cur, SOURCE_TABLE)
        t, k = table.ident, table.key.ident
        upsert = sql.SQL("INSERT INTO {t} ({c}) VALUES ({p}) ON CONFLICT ({k}) DO UPDATE SET {s}").format(
            t=t,
            c=sql.SQL(", ").join(c.ident for c in table.written),
            p=sql.SQL(", ").join(sql.Placeholder(c.name) for c in table.written),
            k=k,
            s=sql.SQL(", ").join(sql.SQL("{c} = EXCLUDED.{c}").format(c=c.ident) for c in table.values),
        )
        delete = sql.SQL("DELETE FROM {t} WHERE {k} = %s").format(t=t, k=k)
        return upsert.as_string(cur), delete.as_string(cur), table.key.name


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--env-file", required=True)
    args = p.parse_args()
    env = dotenv_values(args.env_file)
    upsert, delete, key = statements(env["DEST_DB_URL"])
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
                        cur.execute(delete, (event[key],))
                    else:
                        cur.execute(upsert, event)
                conn.commit()
            finally:
                conn.close()
            consumer.commit(msg, asynchronous=False)
    finally:
        consumer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
