"""optiscope: momentum, Adam and inverted dropout for PyTorch, exact to the equations."""

from . import functional as functional
from . import reference as reference
from .adam import Adam as Adam
from .adam import AdamW as AdamW
from .adam import adam_step as adam_step
from .dropout import Dropout as Dropout
from .momentum import Momentum as Momentum
from .momentum import momentum_step as momentum_step
from .probes import probe as probe

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
]
