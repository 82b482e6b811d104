"""qlis: layer-importance-guided pruning, quantization and entropy-coded archives for PyTorch.

>>> import qlis, torch
>>> report = qlis.inspect(torch.nn.Linear(8, 8))
>>> result = qlis.compress(torch.nn.Linear(8, 8))  # rate–distortion, safe default
>>> paper = qlis.compress(torch.nn.Linear(8, 8), policy="lapq", beta=0.5)
"""

from qlis.archive import Archive, load, open, save
from qlis.compress import CompressionResult, QualityWarning, compress
from qlis.errors import ArchiveError, ConfigError, InputError, QlisError
from qlis.execute import LayerPlan
from qlis.pack import pack
from qlis.plan import LayerConfig, Plan
from qlis.policy import LevelsPolicy, Policy, make_policy, policy_names, register_policy
from qlis.prune import FractionPruner, Pruner, SigmaPruner, get_pruner, register_pruner
from qlis.quantize import (
    AffineQuantizer,
    BinaryQuantizer,
    KMeansQuantizer,
    QuantizedTensor,
    Quantizer,
    UniformQuantizer,
    get_quantizer,
    register_quantizer,
)
from qlis.rd import RDPolicy
from qlis.stats import InspectionReport, LayerStats, inspect
from qlis.version import __version__ as __version__

__all__ = [
    "Archive",
    "AffineQuantizer",
    "ArchiveError",
    "BinaryQuantizer",
    "CompressionResult",
    "ConfigError",
    "FractionPruner",
    "InputError",
    "InspectionReport",
    "KMeansQuantizer",
    "LayerConfig",
    "LayerPlan",
    "LevelsPolicy",
    "Plan",
    "LayerStats",
    "Policy",
    "Pruner",
    "QlisError",
    "QualityWarning",
    "QuantizedTensor",
    "Quantizer",
    "RDPolicy",
    "UniformQuantizer",
    "SigmaPruner",
    "compress",
    "get_pruner",
    "get_quantizer",
    "inspect",
    "load",
    "make_policy",
    "open",
    "pack",
    "policy_names",
    "register_policy",
    "register_pruner",
    "register_quantizer",
    "save",
]
