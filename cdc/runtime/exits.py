"""The exit codes of every command: the daemons (``producer.py``, ``consumer_final.py``) and
``python -m cdc``. One table, so a code means the same thing whichever command returned it."""

OK = 0
# The command ran and the answer is no: the daemon stopped on an error it could not handle, or
# verify found a difference, or a replay was not decided (a clear line says which).
FAILED = 1
# Bad settings, missing setup or an unreachable service at start: nothing was done.
CONFIG = 2
# A second signal stopped a daemon at once: the last batch may be delivered again.
FORCED = 3
