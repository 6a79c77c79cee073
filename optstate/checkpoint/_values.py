"""Plain values in the metadata: rule fields, dictionary keys, dataclass fields and model leaves
that are numbers, strings, dtypes or rules; and the classes a file may name, which are
optstate's own and nothing else.

A value with no JSON form (a function, an object of another package) is kept as its ``repr``:
enough to compare two of them and to name them in a message, never to rebuild one.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from typing import Any

import jax
import numpy as np

from ..rules._contract import Rule
from ._codec import CheckpointError, Json, dtype_name, parse_dtype
from ._kinds import numpy_dtype


class OpaqueError(Exception):
    """A value with no JSON form: it can be compared through its ``repr`` but not rebuilt."""


def encode(v: Any) -> Json:
    """``v`` as JSON; ``OpaqueError`` if it has no JSON form."""
    if v is None or isinstance(v, bool | str):
        return v
    if isinstance(v, int):
        return int(v)
    if isinstance(v, float):
        return float(v) if math.isfinite(v) else {"float": repr(float(v))}
    if isinstance(v, complex):
        return {"complex": [encode(v.real), encode(v.imag)]}
    if isinstance(v, np.generic) and v.dtype.kind in "biufc":
        return encode(v.item())
    if isinstance(v, tuple):
        return {"tuple": [encode(x) for x in v]}
    if isinstance(v, list):
        return {"list": [encode(x) for x in v]}
    if isinstance(v, Rule):
        return rule_desc(v)
    if isinstance(v, np.dtype):
        return {"dtype": dtype_name(v)}
    if isinstance(v, type) and (issubclass(v, np.generic) or hasattr(v, "dtype")):
        form = "jax" if v.__module__.startswith("jax") else "numpy"
        return {"dtype": dtype_name(np.dtype(getattr(v, "dtype", v))), "as": form}
    if type(v).__module__ == "torch" and type(v).__name__ == "dtype":
        as_numpy = numpy_dtype(v)
        if as_numpy is not None:  # without like, a NumPy dtype comes back (as arrays do)
            return {"dtype": dtype_name(as_numpy), "as": "torch"}
    raise OpaqueError(repr(v))


def encode_or_repr(v: Any) -> Json:
    try:
        return encode(v)
    except OpaqueError:
        return {"repr": repr(v)}


def decode(v: Json) -> Any:
    """The value that ``encode`` gave ``v``; ``OpaqueError`` for a ``repr``."""
    if not isinstance(v, dict):
        if isinstance(v, list):
            raise CheckpointError(f"malformed value in the metadata: {v!r}"[:300])
        return v
    if "float" in v:
        return float(v["float"])
    if "complex" in v:
        return complex(decode(v["complex"][0]), decode(v["complex"][1]))
    if "tuple" in v:
        return tuple(decode(x) for x in v["tuple"])
    if "list" in v:
        return [decode(x) for x in v["list"]]
    if "dtype" in v:
        dtype = parse_dtype(v["dtype"])
        form = v.get("as")
        if form == "jax":
            return getattr(jax.numpy, dtype.name)
        return dtype.type if form == "numpy" else dtype
    if "rule" in v:
        return build_rule(v)
    raise OpaqueError(str(v.get("repr", v)))


def same(a: Json, b: Json) -> bool:
    """Equal descriptions, whatever object stood for a dtype (``jnp.bfloat16`` or its dtype)."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = (set(a) | set(b)) - ({"as"} if "dtype" in a else set())
        return all(k in a and k in b and same(a[k], b[k]) for k in keys)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and bool(a == b)


# -- classes that a checkpoint may name: optstate's own, and nothing else ---------------------


def type_name(cls: type) -> list[str]:
    return [cls.__module__, cls.__qualname__]


def resolve(name: Json, base: type, where: str) -> Any:
    """The optstate class ``name`` (``[module, qualname]``), a subclass of ``base``. Classes of
    other packages are never imported from a file: they need ``like``.

    A class that has moved since the file was written (``optstate.schedules.Linear`` became
    ``optstate._schedules.Linear``) is found by its qualified name: when the recorded module or
    attribute is gone, the one subclass of ``base`` defined in optstate with that qualified name
    stands for it (none, or more than one, is an error)."""
    module, qualname = name
    if not (module == "optstate" or str(module).startswith("optstate.")):
        raise OpaqueError(f"{where} is a {qualname} (from {module})")
    try:
        obj: Any = importlib.import_module(module)
        for part in str(qualname).split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        obj = _moved(str(qualname), base, f"{where}: the checkpoint names {module}.{qualname}")
    if not (isinstance(obj, type) and issubclass(obj, base)):
        raise CheckpointError(f"{where}: {module}.{qualname} is not a {base.__name__}")
    return obj


def _moved(qualname: str, base: type, named: str) -> type:
    """The one optstate subclass of ``base`` (at any depth) whose qualified name is
    ``qualname``, wherever it lives now."""
    found: dict[type, None] = {}  # ordered, and each class once (diamonds reach one twice)
    todo: list[type] = [base]
    while todo:
        subclasses: list[type] = todo.pop().__subclasses__()
        for sub in subclasses:
            if sub not in found:
                found[sub] = None
                todo.append(sub)
    candidates = [
        c
        for c in found
        if c.__qualname__ == qualname
        and (c.__module__ == "optstate" or c.__module__.startswith("optstate."))
    ]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise CheckpointError(
            f"{named}, which this optstate does not have (a checkpoint from another version?)"
        )
    places = ", ".join(sorted(f"{c.__module__}.{c.__qualname__}" for c in candidates))
    raise CheckpointError(
        f"{named}, which has moved, and this optstate has {len(candidates)} classes of that "
        f"name ({places}): it cannot tell which one the file means"
    )


def rule_desc(rule: Rule) -> Json:
    if not dataclasses.is_dataclass(rule):
        return {"rule": type_name(type(rule)), "fields": {"repr": repr(rule)}}
    fields = {f.name: encode_or_repr(getattr(rule, f.name)) for f in dataclasses.fields(rule)}
    return {"rule": type_name(type(rule)), "fields": fields}


def build_rule(desc: Json) -> Rule:
    """A rule structure from its description, field by field (no ``__init__`` runs: a structure
    has its hyper-parameters set to ``None``, which some constructors would refuse)."""
    cls = resolve(desc["rule"], Rule, "a rule")
    names = {f.name for f in dataclasses.fields(cls)}
    if set(desc["fields"]) != names:
        raise CheckpointError(
            f"the checkpoint's {cls.__name__} has fields {sorted(desc['fields'])}, this "
            f"optstate's has {sorted(names)} (a checkpoint from another version?)"
        )
    rule = object.__new__(cls)
    for name, value in desc["fields"].items():
        object.__setattr__(rule, name, decode(value))
    return rule  # type: ignore[no-any-return]


def rule_text(desc: Json, qualified: bool = False) -> str:
    """``Adam(mu_dtype=bfloat16)``: the class and its fields that are set, for messages; with
    ``qualified``, each class with its module (``mylib.rules.Adam(...)``)."""
    if desc is None:
        return "no rule (None at setup)"
    module, name = desc["rule"]
    if qualified:
        name = f"{module}.{name}"
    fields = desc["fields"]
    if "rules" in fields and isinstance(fields["rules"], dict) and "tuple" in fields["rules"]:
        inner = ", ".join(rule_text(r, qualified) for r in fields["rules"]["tuple"])
        return f"{name}({inner})"
    if "rule" in fields and isinstance(fields["rule"], dict) and "rule" in fields["rule"]:
        return f"{name}({rule_text(fields['rule'], qualified)})"
    shown = []
    for key, value in fields.items():
        if value is not None:
            text = (
                value.get("dtype", value.get("repr", value)) if isinstance(value, dict) else value
            )
            shown.append(f"{key}={text}")
    return f"{name}({', '.join(shown)})"


def rule_texts(a: Json, b: Json) -> tuple[str, str]:
    """Two different rules as a message shows them: qualified by module where their short texts
    would read the same."""
    ta, tb = rule_text(a), rule_text(b)
    if ta == tb:
        ta, tb = rule_text(a, qualified=True), rule_text(b, qualified=True)
    return ta, tb
