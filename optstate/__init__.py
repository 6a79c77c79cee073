"""optstate: optimiser state for models whose weights are tied, shared or aliased.

``state = setup(rule, model)`` finds the model's ties and keeps one rule state per unique
parameter; ``state, model = update(state, model, grads)`` sums each parameter's gradients over
its positions, applies the rule once, and puts the one new array back everywhere.
"""

from . import implicit as implicit
from . import schedules as schedules
from ._adjust import adjust as adjust
from ._adjust import freeze as freeze
from ._adjust import hyperparams as hyperparams
from ._adjust import thaw as thaw
from ._errors import CheckpointError as CheckpointError
from ._errors import CheckpointMismatchError as CheckpointMismatchError
from ._errors import CopyWarning as CopyWarning
from ._errors import GroupSplitWarning as GroupSplitWarning
from ._errors import OptstateError as OptstateError
from ._errors import OptstateWarning as OptstateWarning
from ._errors import StaleParamsError as StaleParamsError
from ._errors import StructureError as StructureError
from ._errors import TieError as TieError
from ._eval_params import eval_params as eval_params
from ._jit import jit as jit
from ._setup import setup as setup
from ._state import State as State
from ._transpose import Transpose as Transpose
from ._update import retie as retie
from ._update import update as update
from ._update import update_ as update_
from .checkpoint import load as load
from .checkpoint import save as save
from .interop import _torch_kind  # noqa: F401  (registers torch modules and tensors; imports no torch)
from .rules import AccumGrad as AccumGrad
from .rules import AdaBelief as AdaBelief
from .rules import AdaDelta as AdaDelta
from .rules import Adafactor as Adafactor
from .rules import AdaGrad as AdaGrad
from .rules import Adam as Adam
from .rules import AdaMax as AdaMax
from .rules import AdamW as AdamW
from .rules import AdEMAMix as AdEMAMix
from .rules import Adopt as Adopt
from .rules import AMSGrad as AMSGrad
from .rules import ClipGlobalNorm as ClipGlobalNorm
from .rules import ClipGrad as ClipGrad
from .rules import ClipNorm as ClipNorm
from .rules import Descent as Descent
from .rules import Lamb as Lamb
from .rules import Lars as Lars
from .rules import Lion as Lion
from .rules import MixedPrecision as MixedPrecision
from .rules import Momentum as Momentum
from .rules import Muon as Muon
from .rules import MuonDimensions as MuonDimensions
from .rules import NAdam as NAdam
from .rules import Nesterov as Nesterov
from .rules import OAdam as OAdam
from .rules import OptimiserChain as OptimiserChain
from .rules import Prodigy as Prodigy
from .rules import RAdam as RAdam
from .rules import RMSProp as RMSProp
from .rules import Rprop as Rprop
from .rules import Rule as Rule
from .rules import ScheduleFreeAdamW as ScheduleFreeAdamW
from .rules import ScheduleFreeSGD as ScheduleFreeSGD
from .rules import SignDecay as SignDecay
from .rules import Signum as Signum
from .rules import SkipNonFinite as SkipNonFinite
from .rules import WeightDecay as WeightDecay
from .rules import Yogi as Yogi

__version__ = "0.1.0"

__all__ = [
    "AMSGrad",
    "AccumGrad",
    "AdEMAMix",
    "AdaBelief",
    "AdaDelta",
    "AdaGrad",
    "AdaMax",
    "Adafactor",
    "Adam",
    "AdamW",
    "Adopt",
    "CheckpointError",
    "CheckpointMismatchError",
    "ClipGlobalNorm",
    "ClipGrad",
    "ClipNorm",
    "CopyWarning",
    "Descent",
    "GroupSplitWarning",
    "Lamb",
    "Lars",
    "Lion",
    "MixedPrecision",
    "Momentum",
    "Muon",
    "MuonDimensions",
    "NAdam",
    "Nesterov",
    "OAdam",
    "OptimiserChain",
    "OptstateError",
    "OptstateWarning",
    "Prodigy",
    "RAdam",
    "RMSProp",
    "Rprop",
    "Rule",
    "ScheduleFreeAdamW",
    "ScheduleFreeSGD",
    "SignDecay",
    "Signum",
    "SkipNonFinite",
    "StaleParamsError",
    "State",
    "StructureError",
    "TieError",
    "Transpose",
    "WeightDecay",
    "Yogi",
    "adjust",
    "eval_params",
    "freeze",
    "hyperparams",
    "implicit",
    "jit",
    "load",
    "retie",
    "save",
    "schedules",
    "setup",
    "thaw",
    "update",
    "update_",
]
