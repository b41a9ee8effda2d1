"""Where a warning points: at the user's line that called into ``mnemo_fast``, not at ours.

A fixed ``stacklevel`` lands on whichever of the package's frames happens to sit there (the
public wrappers of :mod:`mnemo_fast.api`, ``engines.py``); Python 3.12's
``skip_file_prefixes`` does what :func:`user_stacklevel` does, but 3.10 and 3.11 lack it.
This module imports nothing of the package, so any module may use it.
"""

from __future__ import annotations

import os
import sys

_PACKAGE = os.path.normcase(os.path.dirname(os.path.abspath(__file__))) + os.sep


def _inside(filename: str) -> bool:
    return os.path.normcase(os.path.abspath(filename)).startswith(_PACKAGE)


def _importlib(filename: str) -> bool:
    """A frame of importlib's bootstrap, which ``warnings.warn`` skips without counting it."""
    return "importlib" in filename and "_bootstrap" in filename


def user_stacklevel() -> int:
    """The ``stacklevel`` for a ``warnings.warn`` in the function calling this one that makes
    the warning name the first frame outside ``mnemo_fast`` (the caller's own line; for a
    warning at ``import mnemo_fast``, the line importing it), counted as ``warnings.warn``
    counts. Where every frame is the package's, the outermost one."""
    frame, level = sys._getframe(1), 1  # the frame that calls warnings.warn: stacklevel 1
    while _inside(frame.f_code.co_filename):
        outer = frame.f_back
        while outer is not None and _importlib(outer.f_code.co_filename):
            outer = outer.f_back
        if outer is None:
            break
        frame, level = outer, level + 1
    return level
