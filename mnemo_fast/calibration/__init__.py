"""``lambda1="auto"``: the step of the shift chosen from the mnemonic codes alone.

- :mod:`.search`: the criterion and the search over a candidate session's steps and signs
  (docs/METHOD.md, "Choosing the step from the codes");
- :mod:`.blocks`: its refinements, per-block steps and held-out scoring (docs/METHOD.md,
  "Per-block steps and held-out scoring").

The names below are the calibration's public face (``mnemo_fast.calibration.calibrate``).
"""

from .search import (
    DEFAULT_LAMBDA2,
    PAIRED_LAMBDA1,
    SEARCH_OPTIONS,
    SEARCHES,
    Calibration,
    CalibrationWarning,
    Criterion,
    SearchOptions,
    Trial,
    calibrate,
    calibrate_session,
    lambda2_candidates,
    warn_if_unmet,
)

__all__ = [
    "DEFAULT_LAMBDA2", "PAIRED_LAMBDA1", "SEARCH_OPTIONS", "SEARCHES", "Calibration", "CalibrationWarning", "Criterion",
    "SearchOptions", "Trial", "calibrate", "calibrate_session", "lambda2_candidates", "warn_if_unmet",
]
