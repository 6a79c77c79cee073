"""The rules: small pure functions of one parameter and its summed gradient (see ``_base``)."""

from ._base import Rule as Rule
from .adafactor import Adafactor as Adafactor
from .adam import Adam as Adam
from .adam import AdamW as AdamW
from .clip import ClipGlobalNorm as ClipGlobalNorm
from .clip import ClipGrad as ClipGrad
from .clip import ClipNorm as ClipNorm
from .compose import OptimiserChain as OptimiserChain
from .decay import WeightDecay as WeightDecay
from .layerwise import Lamb as Lamb
from .layerwise import Lars as Lars
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
