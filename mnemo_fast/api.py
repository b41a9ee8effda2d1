"""The public API, built once for each engine so both namespaces have the same names.

``mnemo_fast`` exports the method's functions with the engine chosen per call (fast when the
extension can run the case, else the reference); ``mnemo_fast.reference`` exports the same
functions bound to the reference engine. Nothing else differs between the two.
"""

from __future__ import annotations

import functools

from . import method
from .diagnose import diagnose  # the codes-vs-data check, on the same engine
from .explain import explain

#: Public functions that take an ``engine`` argument.
ENGINE_FUNCTIONS = ("fisher_diagonal", "class_fishers", "perturbation", "forget", "code_accuracy", "explain",
                    "diagnose")


def engine_function(name: str):
    """The unbound function behind ``name`` of :data:`ENGINE_FUNCTIONS`."""
    if name == "explain":
        return explain
    if name == "diagnose":
        return diagnose
    return getattr(method, name)


def bind(engine) -> dict[str, object]:
    """name -> function with ``engine`` fixed (the caller cannot override it)."""

    def bound_to(fn):
        @functools.wraps(fn)
        def bound(*args, **kwargs):
            if "engine" in kwargs:
                raise TypeError(f"{fn.__name__}() of this namespace has a fixed engine")
            return fn(*args, engine=engine, **kwargs)

        return bound

    return {name: bound_to(engine_function(name)) for name in ENGINE_FUNCTIONS}
