"""The rules: small pure functions of one parameter and its summed gradient (see ``_contract``)."""

from ._contract import Rule as Rule
from ._validate import Hyper as Hyper
from ._validate import hyper as hyper
from ._validate import member as member
from ._validate import static as static
from .accumulators import AdaDelta as AdaDelta
from .accumulators import AdaGrad as AdaGrad
from .accumulators import RMSProp as RMSProp
from .adafactor import Adafactor as Adafactor
from .adam import Adam as Adam
from .adam import AdamW as AdamW
from .adam_moments import AdaBelief as AdaBelief
from .adam_moments import OAdam as OAdam
from .adam_moments import Yogi as Yogi
from .adam_variants import AdaMax as AdaMax
from .adam_variants import AMSGrad as AMSGrad
from .adam_variants import NAdam as NAdam
from .adam_variants import RAdam as RAdam
from .ademamix import AdEMAMix as AdEMAMix
from .adopt import Adopt as Adopt
from .clip import ClipGlobalNorm as ClipGlobalNorm
from .clip import ClipGrad as ClipGrad
from .clip import ClipNorm as ClipNorm
from .compose import OptimiserChain as OptimiserChain
from .decay import WeightDecay as WeightDecay
from .layerwise import Lamb as Lamb
from .layerwise import Lars as Lars
from .muon import Muon as Muon
from .muon import MuonDimensions as MuonDimensions
from .prodigy import Prodigy as Prodigy
from .schedule_free import ScheduleFreeAdamW as ScheduleFreeAdamW
from .schedule_free import ScheduleFreeSGD as ScheduleFreeSGD
from .sgd import Descent as Descent
from .sgd import Momentum as Momentum
from .sgd import Nesterov as Nesterov
from .sign import Lion as Lion
from .sign import Rprop as Rprop
from .sign import SignDecay as SignDecay
from .sign import Signum as Signum
from .wrappers import AccumGrad as AccumGrad
from .wrappers import MixedPrecision as MixedPrecision
from .wrappers import SkipNonFinite as SkipNonFinite

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
    "ClipGlobalNorm",
    "ClipGrad",
    "ClipNorm",
    "Descent",
    "Hyper",
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
    "WeightDecay",
    "Yogi",
    "hyper",
    "member",
    "static",
]
