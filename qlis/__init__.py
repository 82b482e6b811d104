"""qlis: layer-importance-guided pruning, quantization and entropy-coded archives for PyTorch.

>>> import qlis, torch
>>> report = qlis.inspect(torch.nn.Linear(8, 8))
>>> result = qlis.compress(torch.nn.Linear(8, 8))  # rate–distortion, safe default
>>> paper = qlis.compress(torch.nn.Linear(8, 8), policy="lapq", beta=0.5)

The public names load on first use (PEP 562), so that what needs no torch (reading an
archive's header: ``qlis info``, ``qlis.archive.format``) starts without importing it.
"""

import importlib

from qlis.errors import ArchiveError as ArchiveError
from qlis.errors import ConfigError as ConfigError
from qlis.errors import InputError as InputError
from qlis.errors import QlisError as QlisError
from qlis.version import __version__ as __version__

_PUBLIC = {  # name -> the module that defines it
    **dict.fromkeys(("Archive", "load", "open", "save"), "qlis.archive.file"),
    **dict.fromkeys(("CompressionResult", "QualityWarning", "compress"), "qlis.plan.compress"),
    "LayerPlan": "qlis.plan.execute",
    "pack": "qlis.archive.pack",
    **dict.fromkeys(("LayerConfig", "Plan"), "qlis.plan.plans"),
    **dict.fromkeys(("LevelsPolicy", "Policy", "make_policy", "policy_names",
                     "register_policy"), "qlis.plan.policy"),
    **dict.fromkeys(("FractionPruner", "Pruner", "SigmaPruner", "get_pruner",
                     "register_pruner"), "qlis.quantize.pruners"),
    **dict.fromkeys(("AffineQuantizer", "BinaryQuantizer", "KMeansQuantizer",
                     "QuantizedTensor", "Quantizer", "UniformQuantizer", "get_quantizer",
                     "register_quantizer"), "qlis.quantize.quantizers"),
    "RDPolicy": "qlis.plan.rd",
    "synthetic_calibration": "qlis.models.synthetic_inputs",
    **dict.fromkeys(("InspectionReport", "LayerStats", "inspect"), "qlis.measure.stats"),
}

__all__ = sorted([*_PUBLIC, "ArchiveError", "ConfigError", "InputError", "QlisError"])


def __getattr__(name: str) -> object:
    """A public name, imported from its module the first time it is asked for (PEP 562)."""
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'qlis' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
