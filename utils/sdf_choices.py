"""The choices of a signed distance map: its distance types and normalisations.

Standard library only, so that the configuration (SDM_DISTANCE) lists them without importing torch;
:mod:`utils.sdf` computes with them.
"""

from __future__ import annotations

#: The distance types of a signed distance map (the valid SDM_DISTANCE values).
DISTANCES = ("euclidean", "manhattan", "chebyshev")
#: How a signed distance map is normalised (None: not at all).
NORMALIZATIONS = (None, "minmax", "dynamic_max", "static_max")
