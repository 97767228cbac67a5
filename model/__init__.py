"""The network, its losses and metrics.

The package's names are imported on first use (PEP 562), so that a torch-free part of it
(:mod:`model.stages`, :mod:`model.metrics.names`) can be imported without torch.
"""

import importlib

#: Each re-exported name: the module that defines it.
_EXPORTS = {"AuxNet": "model.AuxNet", "AuxNetOutput": "model.AuxNet", "fold_batchnorm": "model.AuxNet",
            "inference_copy": "model.fused"}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
