"""``python -m cdc``: the operator's command line (see ``cdc.cli``)."""

import sys

from cdc.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
