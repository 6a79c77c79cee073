"""The Optimizer's ``state_dict``: plain values (numbers, strings, lists, dicts and tensors, what
``torch.load(weights_only=True)`` reads) to and from the optstate state, each part checked
against the Optimizer it is loaded into before anything changes."""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

import jax
import torch

from .._errors import CheckpointMismatchError
from ..schedules import Schedule

FORMAT = "optstate.interop.torch.Optimizer/1"

__all__ = [
    "FORMAT",
    "copied",
    "flat",
    "is_group",
    "is_schedule",
    "key_name",
    "mismatch",
    "named_leaves",
    "plain",
    "plain_copy",
    "restored",
    "same_length",
    "saved_meta",
]


def flat(tree: Any) -> dict[str, Any]:
    """A rule's hyper-parameters by name, a chain's members' together (the first of a name)."""
    out: dict[str, Any] = {}

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if is_group(value):
                    walk(value)
                else:
                    out.setdefault(key, value)
        elif isinstance(node, tuple | list):
            for value in node:
                walk(value)

    walk(tree)
    return out


def is_group(value: Any) -> bool:
    """A nested hyper-parameter tree (a member's), rather than a value or a tuple of values."""
    if isinstance(value, dict):
        return True
    return isinstance(value, tuple | list) and any(is_group(v) for v in value)


def is_schedule(value: Any) -> bool:
    if isinstance(value, tuple | list):
        return any(is_schedule(v) for v in value)
    return isinstance(value, Schedule)


def plain(value: Any, where: str) -> Any:
    """A group's value as the state holds it: a float, a tuple of floats (``betas``), or
    ``None`` (an optional hyper-parameter that is off, such as ``Prodigy``'s ``beta3``)."""
    if value is None:
        return None
    if isinstance(value, tuple | list):
        return tuple(plain(v, where) for v in value)
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        return float(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    raise TypeError(f"{where} must be a real number, got {value!r}")


def plain_copy(value: Any) -> Any:
    """A group's value for a state_dict: tensors cloned, the rest as it is."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, list):
        return [plain_copy(v) for v in value]
    return value


def key_name(key: Any) -> str:
    for attr in ("name", "key", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def named_leaves(tree: Any) -> list[tuple[str, Any]]:
    """A rule state's arrays by dotted name: ``mu``, ``count``, ``1.mu`` (a chain's member)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(".".join(key_name(k) for k in path), x) for path, x in flat]


def saved_meta(state_dict: Any) -> dict[str, Any]:
    if not isinstance(state_dict, Mapping) or not {"state", "param_groups"} <= set(state_dict):
        raise mismatch(
            f"is not a state_dict at all (a {type(state_dict).__name__} with keys "
            f"{sorted(map(str, state_dict)) if isinstance(state_dict, Mapping) else '-'})"
        )
    if not isinstance(state_dict["state"], Mapping) or not isinstance(
        state_dict["param_groups"], list
    ):
        raise mismatch("has a 'state' that is not a dict or 'param_groups' that is not a list")
    meta = state_dict.get("optstate")
    if not isinstance(meta, Mapping) or meta.get("format") != FORMAT:
        raise mismatch(
            "is not one of optstate.interop.torch.Optimizer (it has no 'optstate' entry of "
            f"format {FORMAT!r}: a torch.optim optimizer's state_dict, say)"
        )
    missing = [k for k in ("rules", "names", "scheduled", "clocks", "step") if k not in meta]
    if missing or len(meta["scheduled"]) != len(state_dict["param_groups"]):
        raise mismatch(
            f"has an incomplete 'optstate' entry (missing {missing}, or its 'scheduled' is not "
            "one list per param group)"
        )
    return dict(meta)


def mismatch(what: str) -> CheckpointMismatchError:
    return CheckpointMismatchError(f"the state_dict {what}; nothing was loaded")


def restored(current: Any, saved: Any, index: int, name: str) -> Any:
    """The rule state ``current`` with the tensors of ``saved`` (checked, then copied)."""
    where = f"state_dict['state'][{index}] ({name})"
    named = named_leaves(current)
    if not isinstance(saved, Mapping) or sorted(saved) != sorted(n for n, _ in named):
        have = sorted(saved) if isinstance(saved, Mapping) else saved
        raise mismatch(
            f"holds {have!r} at {where}; this optimizer's rule keeps {[n for n, _ in named]} "
            "there (another rule?)"
        )
    leaves = [copied(saved[n], x, f"{where}[{n!r}]") for n, x in named]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(current), leaves)


def copied(saved: Any, like: Any, where: str) -> Any:
    if not isinstance(saved, torch.Tensor):
        raise mismatch(f"holds {type(saved).__name__} at {where}, expected a tensor")
    if saved.shape != like.shape or saved.dtype != like.dtype:
        raise mismatch(
            f"holds a {saved.dtype} tensor of shape {tuple(saved.shape)} at {where}, expected "
            f"{like.dtype} of shape {tuple(like.shape)}"
        )
    return torch.empty_like(like).copy_(saved)


def same_length(saved: Any, now: list[Any], what: str) -> list[tuple[Any, Any]]:
    if not isinstance(saved, list) or len(saved) != len(now):
        raise mismatch(f"has other {what} than this optimizer's ({len(now)} expected)")
    return list(zip(saved, now, strict=True))
