"""The tie plan in the metadata: which positions hold which parameter, in what orientation, with
which rule, frozen or not; and the comparison of a file's plan with ``like``'s, naming the first
difference.
"""

from __future__ import annotations

from .._state import Plan
from .._ties import Param, Slot
from .._walk import path_strings, skeleton
from ._codec import CheckpointMismatchError, Json, dtype_name, parse_dtype
from ._kinds import dtype_text
from ._trees import describe, first_difference
from ._values import rule_desc, rule_texts, same


def plan_meta(plan: Plan) -> Json:
    skel = skeleton(plan.treedef)
    return {
        "tree": describe(skel),
        "positions": path_strings(skel),
        "slots": [
            None if s is None else [s.param, None if s.perm is None else list(s.perm), s.depth]
            for s in plan.slots
        ],
        "params": [
            {
                "primary": p.primary,
                "positions": list(p.positions),
                "shape": list(p.shape),
                "dtype": dtype_text(p.dtype),
            }
            for p in plan.params
        ],
        "rules": [rule_desc(r) for r in plan.rules],
        "param_rules": list(plan.param_rules),
        "frozen": list(plan.frozen),
        "param_variants": list(plan.param_variants),
    }


def slots(meta: Json) -> tuple[Slot | None, ...]:
    return tuple(
        None if s is None else Slot(int(s[0]), None if s[1] is None else tuple(s[1]), int(s[2]))
        for s in meta["slots"]
    )


def params(meta: Json) -> tuple[Param, ...]:
    return tuple(
        Param(int(p["primary"]), tuple(p["positions"]), tuple(p["shape"]), parse_dtype(p["dtype"]))
        for p in meta["params"]
    )


def _param_rule(meta: Json, k: int) -> Json:
    r = meta["param_rules"][k]
    return None if r < 0 else meta["rules"][r]


def _tie_text(meta: Json, pos: int) -> str:
    slot = meta["slots"][pos]
    if slot is None:
        return "is not a parameter"
    param = meta["params"][slot[0]]
    others = [meta["positions"][q] for q in param["positions"] if q != pos]
    how = []
    if slot[2]:
        how.append(f"through {slot[2]} Transpose layer(s)")
    if slot[1] is not None:
        how.append(f"as a NumPy view with axes {tuple(slot[1])}")
    where = f"tied to {', '.join(others)}" if others else "a parameter of its own"
    return f"is {where}{' ' + ' and '.join(how) if how else ''}"


def _tie_key(meta: Json, pos: int) -> Json:
    slot = meta["slots"][pos]
    if slot is None:
        return None
    return [meta["params"][slot[0]]["positions"], slot[1], slot[2]]


def compare_plans(path: str, file: Json, like: Json) -> None:
    """Raise ``CheckpointMismatchError`` naming the first difference of model structure, ties,
    parameter shapes and dtypes, or rules (frozen flags and rule groups come from the file)."""
    if not same(file["tree"], like["tree"]):
        have, want = file["positions"], like["positions"]
        missing = [p for p in have if p not in set(want)]
        extra = [p for p in want if p not in set(have)]
        detail = ""
        if missing:
            detail += f"; in the file but not in like: {', '.join(missing[:5])}"
        if extra:
            detail += f"; in like but not in the file: {', '.join(extra[:5])}"
        where = first_difference(file["tree"], like["tree"], "model")
        raise CheckpointMismatchError(
            f"{path} holds a state for a model of another structure{detail}; first difference "
            f"at {where}"
        )
    names = file["positions"]
    for pos in range(len(names)):
        if not same(_tie_key(file, pos), _tie_key(like, pos)):
            raise CheckpointMismatchError(
                f"{path} holds a state with other ties: in the file {names[pos]} "
                f"{_tie_text(file, pos)}; in like it {_tie_text(like, pos)}"
            )
    for k, (a, b) in enumerate(zip(file["params"], like["params"], strict=True)):
        if a["shape"] != b["shape"] or dtype_name(parse_dtype(a["dtype"])) != b["dtype"]:
            raise CheckpointMismatchError(
                f"{path}: {names[a['primary']]} is {a['dtype']}{a['shape']} in the file, "
                f"{b['dtype']}{b['shape']} in like"
            )
        ra, rb = _param_rule(file, k), _param_rule(like, k)
        if not same(ra, rb):
            ta, tb = rule_texts(ra, rb)
            raise CheckpointMismatchError(
                f"{path}: the state of {names[a['primary']]} is for {ta} in the file, for {tb} "
                "in like (a state for a different rule)"
            )


def like_params(file_params: tuple[Param, ...], like_plan: Plan) -> tuple[Param, ...]:
    """The file's parameters (their primary positions may differ from like's: a view of the same
    layout that ``update`` has since replaced by the array itself) with like's dtype objects
    (a torch dtype where like holds tensors), once ``compare_plans`` found the dtypes equal."""
    return tuple(
        p._replace(dtype=q.dtype) for p, q in zip(file_params, like_plan.params, strict=True)
    )
