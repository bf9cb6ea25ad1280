"""What every benchmark script shares. Scripts run as `python benchmarks/NAME.py`, so they import this
module by its plain name."""

from __future__ import annotations

import resource


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
