"""The rules: small pure functions of one parameter and its summed gradient (see ``_base``)."""

from ._base import Rule as Rule
from .adam import Adam as Adam
from .adam import AdamW as AdamW
from .clip import ClipGlobalNorm as ClipGlobalNorm
from .clip import ClipGrad as ClipGrad
from .clip import ClipNorm as ClipNorm
from .compose import OptimiserChain as OptimiserChain
from .decay import WeightDecay as WeightDecay
from .sgd import Descent as Descent
from .sgd import Momentum as Momentum
from .sgd import Nesterov as Nesterov
from .wrappers import AccumGrad as AccumGrad
from .wrappers import MixedPrecision as MixedPrecision
from .wrappers import SkipNonFinite as SkipNonFinite
