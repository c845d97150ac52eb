"""producer.py: capture and publish. Publishes every change captured in the source's outbox to
Kafka, in commit order, missing none (the daemon is ``cdc.source.daemon``).

    python producer.py                 # run until SIGINT/SIGTERM
    python producer.py --help          # every flag

Settings come from the environment and ``.env`` (USAGE.md lists them).
"""

import sys

from cdc.source.daemon import ChangeProducer, build_parser, check_rows, main, reset_cursor

__all__ = ["ChangeProducer", "build_parser", "check_rows", "main", "reset_cursor"]

if __name__ == "__main__":
    sys.exit(main())
