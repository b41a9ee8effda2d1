"""Moved to :mod:`mnemo_fast.distributed.sharding`; this name stays for imports written before."""

from .distributed.sharding import *  # noqa: F401,F403
from .distributed.sharding import DTensor, Partial  # noqa: F401
