"""SAE encoder architectures behind one registry.

Each module holds one architecture's encode and extra losses; ``get`` maps the
estimator's ``architecture`` parameter to its class.
"""

from ._base import Architecture, EncodeOutput, SparseCodes, decode
from .batchtopk import BatchTopK
from .gated import Gated
from .jumprelu import JumpReLU
from .relu import ReLU
from .topk import TopK

REGISTRY = {cls.name: cls for cls in (ReLU, TopK, BatchTopK, JumpReLU, Gated)}


def register(cls):
    """Add an :class:`Architecture` subclass to the registry (usable as a decorator)."""
    REGISTRY[cls.name] = cls
    return cls


def get(name):
    """The architecture class registered under ``name``."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"Unknown architecture {name!r}; expected one of {sorted(REGISTRY)}."
        ) from None


__all__ = ["Architecture", "EncodeOutput", "SparseCodes", "decode", "REGISTRY", "register", "get"]
