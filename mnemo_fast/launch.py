"""Moved to :mod:`mnemo_fast.distributed.launch`; ``python -m mnemo_fast.launch`` still runs it."""

import sys

from .distributed.launch import build_parser, main, shard  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
