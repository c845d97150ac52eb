"""consumer_final.py: apply and dead-letter. Applies the change events from Kafka to the
destination PostgreSQL exactly once (the daemon is ``cdc.sink.daemon``).

    python consumer_final.py                  # run until SIGINT/SIGTERM
    python consumer_final.py --show-dlq       # print the dead-letter topic with its headers
    python consumer_final.py --replay-dlq     # republish the dead-letter topic, then exit

``from consumer_final import ProductionCDCConsumer`` gives the consumer class with its switches
(``group_id``, ``enable_dlq``, ``enable_idempotency``, ``batch_size``, ``settings``). Settings come from the
environment and ``.env`` (USAGE.md lists them).
"""

import sys

from cdc.sink.daemon import ProductionCDCConsumer, main, parse_args, tune_gc

__all__ = ["ProductionCDCConsumer", "main", "parse_args", "tune_gc"]

if __name__ == "__main__":
    sys.exit(main())
