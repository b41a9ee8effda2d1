"""``python -m mnemo_fast``: the ``mnemo-fast`` command line (:mod:`mnemo_fast.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
