"""The one list of rules under test: every property, sharding, checkpoint and hostile-input test
runs over it, and a guard (test_rule_properties) fails when a public rule is missing from it."""

from collections.abc import Iterator
from typing import Any

import optstate as ost


def muon_adamw(path, x):
    """Muon for the matrices, AdamW for the rest: how Muon is used (docs/rules.md). The test
    problems' single vector is AdamW's; the matrices of the other properties are Muon's."""
    return ost.Muon(0.02) if x.ndim == 2 else ost.AdamW(1e-2, weight_decay=1e-4)


# name -> (rule, steps): hyper-parameters that bring each rule close to the minimum of both test
# problems within ``steps`` jitted steps. A rule may also be a function of the path and the leaf
# (``setup`` takes those), as for Muon, which trains matrices only.
RULES = {
    "Descent": (ost.Descent(1e-3), 3000),
    "Momentum": (ost.Momentum(1e-3, momentum=0.9), 3000),
    "Nesterov": (ost.Nesterov(1e-3, momentum=0.9), 3000),
    "Adam": (ost.Adam(1e-2), 3000),
    "AdamW": (ost.AdamW(1e-2, weight_decay=1e-4), 3000),
    "ClipNorm+Momentum": (ost.OptimiserChain(ost.ClipNorm(10.0), ost.Momentum(1e-3)), 3000),
    "ClipGrad+Momentum": (ost.OptimiserChain(ost.ClipGrad(10.0), ost.Momentum(1e-3)), 3000),
    "ClipGlobalNorm+Adam": (ost.OptimiserChain(ost.ClipGlobalNorm(5.0), ost.Adam(1e-2)), 3000),
    "WeightDecay+Adam": (ost.OptimiserChain(ost.WeightDecay(1e-6), ost.Adam(1e-2)), 3000),
    "AccumGrad+Adam": (ost.OptimiserChain(ost.AccumGrad(2), ost.Adam(1e-2)), 6000),
    "SkipNonFinite(Adam)": (ost.SkipNonFinite(ost.Adam(1e-2)), 3000),
    "MixedPrecision(Adam)": (ost.MixedPrecision(ost.Adam(1e-2)), 3000),
    "Lion": (ost.Lion(3e-3, weight_decay=0.0), 3000),
    "Signum": (ost.Signum(3e-3), 3000),
    "SignDecay+Momentum": (ost.OptimiserChain(ost.SignDecay(1e-4), ost.Momentum(1e-3)), 3000),
    "Rprop": (ost.Rprop(0.01), 3000),
    "Lamb": (ost.Lamb(3e-3), 3000),
    "Lars": (ost.Lars(1.0, trust_coefficient=0.005), 3000),
    "Adafactor": (ost.Adafactor(0.1), 3000),
    "Adafactor-factored": (ost.Adafactor(0.1, min_dim_size_to_factor=2), 3000),
    "RMSProp": (ost.RMSProp(1e-2), 3000),
    "RMSProp-centred-momentum": (ost.RMSProp(1e-3, momentum=0.9, centred=True), 3000),
    "RAdam": (ost.RAdam(3e-3, betas=(0.9, 0.99)), 3000),
    "NAdam": (ost.NAdam(1e-2), 3000),
    "AdaMax": (ost.AdaMax(2e-2), 3000),
    "AMSGrad": (ost.AMSGrad(1e-2), 3000),
    "OAdam": (ost.OAdam(1e-2), 3000),
    "AdaGrad": (ost.AdaGrad(0.3), 3000),
    "AdaDelta": (ost.AdaDelta(1.0, rho=0.99, eps=1e-6), 3000),
    "AdaBelief": (ost.AdaBelief(1e-2), 3000),
    "Yogi": (ost.Yogi(1e-2), 3000),
    "Muon+AdamW": (muon_adamw, 3000),
    "Adopt": (ost.Adopt(1e-2, betas=(0.9, 0.999)), 3000),
    "AdEMAMix": (ost.AdEMAMix(1e-2, beta3=0.999, alpha=2.0), 3000),
    "ScheduleFreeSGD": (ost.ScheduleFreeSGD(1e-3), 6000),
    "ScheduleFreeAdamW": (ost.ScheduleFreeAdamW(1e-2), 3000),
    "Prodigy": (ost.Prodigy(0.5), 3000),
}


def rules_in(rule: Any) -> Iterator[type]:
    """The rule classes a rule of the list is made of (members of chains and wrappers too)."""
    if isinstance(rule, ost.Rule):
        yield type(rule)
        for member in rule.members():
            yield from rules_in(member)


def instances() -> list[ost.Rule]:
    """Every entry as a Rule (a function of the path and the leaf stands for Muon and AdamW)."""
    return [
        r for rule, _ in RULES.values() for r in ((rule,) if isinstance(rule, ost.Rule) else ())
    ] + [ost.Muon(0.02), ost.AdamW(1e-2, weight_decay=1e-4)]
