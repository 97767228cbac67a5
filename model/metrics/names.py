"""The metric names: every name the metrics report, which way is better, and which are distances.

One list per set of choices: the config's EVAL_METRIC and CMA keys, the trainer's model selection,
the accumulator and the pictures of a run all read these.
"""

from __future__ import annotations

#: Whether a larger value is better, for every metric name (model selection by EVAL_METRIC).
HIGHER_IS_BETTER: dict[str, bool] = {
    "DSC": True,
    "IoU": True,
    "TTR": True,
    "ASD": False,
    "AD": False,
    "HD95": False,
    "D95": False,
    "CMA": True,
}
#: Every metric name, in report order (the valid EVAL_METRIC values).
METRIC_NAMES: tuple[str, ...] = tuple(HIGHER_IS_BETTER)
#: The surface-distance metrics (switched on and off together).
DISTANCE_METRICS: tuple[str, ...] = ("ASD", "AD", "HD95", "D95")
#: Metrics that may carry a CMA coefficient.
CMA_METRICS: tuple[str, ...] = tuple(m for m in METRIC_NAMES if m != "CMA")
