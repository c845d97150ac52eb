"""The demo's two more tables, linked by a foreign key, and a writer for them.

``customers`` (one-column key) and ``order_lines`` (key ``(order_id, line)``, a foreign key to
``customers``), created on both databases if missing, captured with ``cdc tables add``. The
writer is one thread with its own connection: new customers, new orders of 1 to 4 lines in one
transaction, line updates (numeric, jsonb, timestamptz values), whole orders deleted, customers
moving city. Customers are never deleted, so the source's own foreign key always holds.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time

import psycopg2
import psycopg2.extensions
from psycopg2.extras import Json

from cdc.runtime.db import CONNECT_TIMEOUT

log = logging.getLogger(__name__)

TABLES = ("public.customers", "public.order_lines")

DDL = """
CREATE TABLE IF NOT EXISTS customers (
    id     int PRIMARY KEY,
    name   text NOT NULL,
    city   text,
    since  date,
    credit numeric(12, 2)
);
CREATE TABLE IF NOT EXISTS order_lines (
    order_id    bigint,
    line        int,
    customer_id int NOT NULL REFERENCES customers (id),
    sku         text,
    qty         int,
    price       numeric(10, 2),
    attrs       jsonb,
    at          timestamptz DEFAULT now(),
    PRIMARY KEY (order_id, line)
);
"""

# The consumer's role writes them on the destination (where setup_roles_dest.sql made it).
GRANTS = """
DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'cdc_consumer') THEN
        GRANT SELECT, INSERT, UPDATE, DELETE ON customers, order_lines TO cdc_consumer;
    END IF;
END
$$;
"""

CITIES = ("Oslo", "Zürich", "São Paulo", "東京", "Kraków", None)


def create(source_url: str, dest_url: str) -> None:
    """The two tables on both databases (if missing), writable by the consumer's role."""
    for url, extra in ((source_url, ""), (dest_url, GRANTS)):
        with (
            contextlib.closing(psycopg2.connect(url, connect_timeout=CONNECT_TIMEOUT)) as conn,
            conn,
            conn.cursor() as cur,
        ):
            cur.execute(DDL + extra)


class ShopWriter:
    """Writes ``rate`` transactions a second to the two tables until stopped."""

    def __init__(self, url: str, *, rate: float, seed: int | None = None) -> None:
        self.url = url
        self.rate = rate
        self.random = random.Random(seed)
        self.changes = 0
        self.errors = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="shop-writer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _run(self) -> None:
        try:
            with contextlib.closing(psycopg2.connect(self.url, connect_timeout=CONNECT_TIMEOUT)) as conn:
                with conn.cursor() as cur:
                    cur.execute("SELECT coalesce(max(id), 0) FROM customers")
                    customers = list(range(1, int(cur.fetchone()[0]) + 1))  # type: ignore[index]
                    cur.execute("SELECT coalesce(max(order_id), 0) FROM order_lines")
                    next_order = int(cur.fetchone()[0]) + 1  # type: ignore[index]
                conn.commit()
                orders: list[int] = []
                while not self._stop.wait(1.0 / self.rate if self.rate > 0 else 1.0):
                    try:
                        with conn, conn.cursor() as cur:
                            next_order = self._one(cur, customers, orders, next_order)
                    except psycopg2.Error as exc:
                        self.errors += 1
                        log.debug("shop transaction rolled back: %s", exc)
        except psycopg2.Error as exc:
            log.warning("shop writer stopped: %s", str(exc).strip().splitlines()[0])

    def _one(
        self, cur: psycopg2.extensions.cursor, customers: list[int], orders: list[int], next_order: int
    ) -> int:
        r = self.random
        pick = r.random()
        if pick < 0.25 or not customers:
            new = len(customers) + 1
            cur.execute(
                "INSERT INTO customers VALUES (%s, %s, %s, current_date - %s, %s)",
                (
                    new,
                    f'Customer {new} "o\'k"',
                    r.choice(CITIES),
                    r.randint(0, 9000),
                    r.randint(0, 10**7) / 100,
                ),
            )
            customers.append(new)
            self.changes += 1
        elif pick < 0.65:
            lines = r.randint(1, 4)
            customer = r.choice(customers)
            for line in range(1, lines + 1):
                cur.execute(
                    "INSERT INTO order_lines (order_id, line, customer_id, sku, qty, price, attrs)"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s)",
                    (
                        next_order,
                        line,
                        customer,
                        f"SKU-{r.randint(1, 500)}",
                        r.randint(1, 9),
                        r.randint(1, 99999) / 100,
                        Json({"gift": r.random() < 0.2, "note": None if r.random() < 0.5 else "ü"}),
                    ),
                )
            orders.append(next_order)
            next_order += 1
            self.changes += lines
        elif pick < 0.85 and orders:
            cur.execute(
                "UPDATE order_lines SET qty = qty + 1, at = clock_timestamp() WHERE order_id = %s AND line = 1",
                (r.choice(orders),),
            )
            self.changes += cur.rowcount
        elif pick < 0.93 and orders:
            order = orders.pop(r.randrange(len(orders)))
            cur.execute("DELETE FROM order_lines WHERE order_id = %s", (order,))
            self.changes += cur.rowcount
        else:
            cur.execute(
                "UPDATE customers SET city = %s WHERE id = %s", (r.choice(CITIES), r.choice(customers))
            )
            self.changes += cur.rowcount
        time.sleep(0)
        return next_order
