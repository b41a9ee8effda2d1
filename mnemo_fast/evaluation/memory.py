"""Peak memory of one call, read from the CPU allocator (used by the memory tests and benchmarks).

``torch.profiler`` with ``profile_memory=True`` records every CPU tensor allocation and free
in order; the peak of their running sum is the most memory the call itself held at once.
Memory that existed before the call (the model, the inputs) is not counted, and neither is
memory outside torch's allocator (Python objects, the allocator's own caching), so this is
exact and repeatable where ``ru_maxrss`` is neither. The bound it checks on the fast path is in
docs/FAST_PATH.md, "Memory".
"""

from __future__ import annotations

from typing import Any, Callable

from torch.profiler import ProfilerActivity, profile


def peak_allocated_bytes(fn: Callable[[], Any]) -> tuple[Any, int]:
    """(fn(), peak bytes of CPU tensors allocated during the call and not yet freed)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    current = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        if "CPU" in str(event.device_type()):
            current += event.nbytes()
            peak = max(peak, current)
    return result, peak
