"""optiscope: momentum, Adam and inverted dropout for PyTorch, exact to the equations."""

from . import functional as functional
from . import reference as reference
from . import rules as rules
from .adam import Adam as Adam
from .adam import AdamW as AdamW
from .dropout import Dropout as Dropout
from .momentum import Momentum as Momentum
from .probes import probe as probe
from .rules import adam_step as adam_step
from .rules import momentum_step as momentum_step

__version__ = "0.1.0"

__all__ = [
    "Adam",
    "AdamW",
    "Dropout",
    "Momentum",
    "adam_step",
    "functional",
    "momentum_step",
    "probe",
    "reference",
    "rules",
]
