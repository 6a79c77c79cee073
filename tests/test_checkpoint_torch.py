"""Checkpoints of torch states and models: ``nn.Module``s (their named-parameter dicts) and dicts
of tensors, ties kept (a Parameter under two names, a ``W.t()`` view), dtypes exact, loaded onto
``like``'s devices and dtypes; a resumed run equals the uninterrupted one bitwise; what torch
kinds a file cannot hold get an error of ours.

References: the uninterrupted run of the same code (a resumed run must reproduce it bit for bit),
torch's own bits of every tensor (``Tensor.view`` as an integer type), and torch's autograd for
the gradients.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from checkpoint_cases import saved
from torch import nn

import optstate as ost
from optstate.checkpoint import CheckpointError, CheckpointMismatchError
from optstate.interop import torch as ost_torch

ROOT = Path(__file__).resolve().parents[1]
V, D = 7, 5  # vocabulary, width


def tied_lm(seed: int, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """A small language model whose output layer (``3.weight``) is its input embedding
    (``0.weight``): one Parameter under two names."""
    lm = nn.Sequential(
        nn.Embedding(V, D, dtype=dtype),
        nn.Linear(D, D, dtype=dtype),
        nn.Tanh(),
        nn.Linear(D, V, bias=False, dtype=dtype),
    )
    lm[3].weight = lm[0].weight
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lm.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype) * 0.5)
    return lm


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, V, (6,), generator=gen), torch.randint(0, V, (6,), generator=gen)


def module_step(state: ost.State, module: nn.Module, step: int) -> tuple[ost.State, nn.Module]:
    """One in-place step from ``.grad`` totals after ``backward``."""
    module.zero_grad()
    idx, target = batch(step)
    nn.functional.cross_entropy(module(idx), target).backward()
    return ost.update_(state, module, ost_torch.grad_totals(module))


def view_model(seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A dict of tensors tied through a view: ``dec`` is ``enc.t()``."""
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(D, 3, generator=gen) * 0.5).to(dtype).requires_grad_()
    return {"enc": w, "dec": w.t(), "b": torch.zeros(3, dtype=dtype, requires_grad=True)}


def view_step(state: ost.State, model: Any, step: int) -> tuple[ost.State, Any]:
    """One pure step: the loss uses both positions; autograd's totals, counted once."""
    gen = torch.Generator().manual_seed(200 + step)
    x = torch.randn(4, D, generator=gen).to(model["enc"].dtype)
    h = torch.tanh(x @ model["enc"] + model["b"])
    ((h @ model["dec"] - x) ** 2).float().mean().backward()
    return ost.update(state, model, ost_torch.grad_totals(model))


def bits(t: torch.Tensor) -> np.ndarray:
    """A tensor's bits as unsigned integers (torch's own view of its memory)."""
    kinds = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    raw = t.detach().contiguous().view(kinds[t.element_size()]).numpy()
    return raw.view(f"u{t.element_size()}")


def assert_bitwise(a: Any, b: Any) -> None:
    """The same structure, and every tensor leaf equal bit for bit with its dtype."""
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb, strict=True):
        assert isinstance(x, torch.Tensor), type(x)
        assert isinstance(y, torch.Tensor), type(y)
        assert (x.dtype, x.shape, x.device) == (y.dtype, y.shape, y.device)
        np.testing.assert_array_equal(bits(x), bits(y))


def state_tensors(state: ost.State) -> list[Any]:
    return [*state.states, *state.hyper, state.step]


def chain() -> ost.Rule:
    """Clipping across parameters, decoupled weight decay, and a schedule."""
    lr = ost.schedules.warmup_cosine(1e-2, warmup_steps=2, decay_steps=10)
    return ost.OptimiserChain(ost.ClipGlobalNorm(1.0), ost.AdamW(lr, weight_decay=0.1))


RULES = {"adam": lambda: ost.Adam(1e-2), "chain": chain}


# -- resuming ----------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", list(RULES))
def test_a_resumed_module_run_equals_the_uninterrupted_run(tmp_path, rule):
    """``update_`` on a tied module: 3 steps, save, load into a freshly built module (another
    initialisation) through ``like``, copy the loaded parameters in, 3 more steps: bit for bit
    the 6 uninterrupted steps, the tie one Parameter throughout."""
    whole = tied_lm(0)
    state = ost.setup(RULES[rule](), whole)
    for i in range(6):
        state, whole = module_step(state, whole, i)

    part = tied_lm(0)
    part_state = ost.setup(RULES[rule](), part)
    for i in range(3):
        part_state, part = module_step(part_state, part, i)
    path = saved(tmp_path, part_state, part)

    fresh = tied_lm(1)
    loaded, params = ost.load(path, like=(ost.setup(RULES[rule](), fresh), fresh))
    assert sorted(params) == sorted(ost_torch.parameters(fresh))
    assert params["3.weight"] is params["0.weight"]
    assert all(t.requires_grad for t in params.values())
    assert int(loaded.step) == 3
    fresh.load_state_dict(params, strict=False)
    assert fresh[3].weight is fresh[0].weight
    for i in range(3, 6):
        loaded, fresh = module_step(loaded, fresh, i)
    assert_bitwise(ost_torch.parameters(fresh), ost_torch.parameters(whole))
    assert_bitwise(state_tensors(loaded), state_tensors(state))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rule", list(RULES))
def test_a_resumed_pure_run_on_a_view_tie_equals_the_uninterrupted_run(tmp_path, rule, dtype):
    """``update`` on a dict whose ``dec`` is ``enc.t()``: the loaded model is a dict of new
    tensors with ``dec`` a view of ``enc`` again, in like's dtype, and the resumed run is bit for
    bit the uninterrupted one (bfloat16 included)."""
    model = view_model(0, dtype)
    state = ost.setup(RULES[rule](), model)
    for i in range(5):
        state, model = view_step(state, model, i)
        if i == 2:
            path = saved(tmp_path, state, model)

    like = view_model(1, dtype)
    loaded, got = ost.load(path, like=(ost.setup(RULES[rule](), like), like))
    assert got["dec"]._base is got["enc"]
    assert got["dec"].stride() == got["enc"].t().stride()
    assert got["enc"].dtype == dtype
    assert got["enc"].requires_grad
    for i in range(3, 5):
        loaded, got = view_step(loaded, got, i)
    assert got["dec"]._base is got["enc"]
    assert_bitwise(got, model)
    assert_bitwise(state_tensors(loaded), state_tensors(state))


# -- what the file holds, and what comes back --------------------------------------------------


def test_dtypes_are_exact_and_without_like_come_back_as_numpy(tmp_path):
    """bfloat16, float16, float64 and complex64 Parameters and a bfloat16 first moment: the file
    holds torch's own bits; loaded with ``like``, the same dtypes and bits as tensors on like's
    device; without ``like``, NumPy arrays of the matching dtypes (bfloat16 as ml_dtypes'), the
    tie a shared array again."""
    gen = torch.Generator().manual_seed(0)
    emb = nn.Parameter(torch.randn(4, 3, generator=gen).to(torch.bfloat16))
    model = {
        "emb": emb,
        "head": emb,
        "h": nn.Parameter(torch.randn(5, generator=gen).to(torch.float16)),
        "d": nn.Parameter(torch.randn(2, 2, generator=gen, dtype=torch.float64)),
        "z": nn.Parameter(torch.randn(3, generator=gen, dtype=torch.complex64)),
    }
    low = ost.Adam(1e-2, mu_dtype=torch.bfloat16)
    rule = {"emb": low, "head": low, "h": low, "d": low, "z": ost.Adam(1e-2)}
    state = ost.setup(rule, model)
    state, model = ost.update(state, model, {k: torch.ones_like(v) for k, v in model.items()})
    path = saved(tmp_path, state, model)

    with np.load(path, allow_pickle=False) as npz:
        meta = json.loads(npz["optstate.json"])
        records = {r["member"]: r["dtype"] for r in meta["arrays"]}
        assert records["model['emb'].npy"] == "bfloat16"
        np.testing.assert_array_equal(npz["model['emb']"], bits(model["emb"]))
        np.testing.assert_array_equal(npz["model['h']"], bits(model["h"]).view(np.float16))
        assert records["state.states[0].mu.npy"] == "bfloat16"
        np.testing.assert_array_equal(npz["state.states[0].mu"], bits(state.states[0].mu))
    assert "model['head'].npy" not in records  # the tie is stored once

    like = {k: torch.zeros_like(v.detach()).requires_grad_() for k, v in model.items()}
    like["head"] = like["emb"]
    loaded, got = ost.load(path, like=(ost.setup(rule, like), like))
    assert got["head"] is got["emb"]
    assert_bitwise(got, model)
    assert_bitwise(state_tensors(loaded), state_tensors(state))

    np_state, np_model = ost.load(path)
    assert all(isinstance(x, np.ndarray) for x in np_model.values())
    assert np_model["head"] is np_model["emb"]
    assert np_model["emb"].dtype == np.dtype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(np_model["emb"].view(np.uint16), bits(model["emb"]))
    np.testing.assert_array_equal(np_model["z"], model["z"].detach().numpy())
    assert np_state.states[0].mu.dtype == np.dtype(ml_dtypes.bfloat16)
    assert isinstance(np_state.step, np.ndarray)


def test_a_file_that_does_not_fit_a_torch_like(tmp_path):
    """Another dtype in like's module, a like module on the meta device: refused before
    anything is read, naming the path; like unchanged."""
    module = tied_lm(0)
    path = saved(tmp_path, ost.setup(ost.Adam(1e-2), module), module)
    wide = tied_lm(0, torch.float64)
    before = {k: v.detach().clone() for k, v in ost_torch.parameters(wide).items()}
    with pytest.raises(
        CheckpointMismatchError, match=r"model\['0.weight'\] is float32\[7, 5\] in the file, "
    ):
        ost.load(path, like=(ost.setup(ost.Adam(1e-2), wide), wide))
    assert_bitwise(ost_torch.parameters(wide), before)

    like_state = ost.setup(ost.Adam(1e-2), module)
    meta = tied_lm(0).to("meta")
    with pytest.raises(CheckpointMismatchError, match=r"like's model\['0.weight'\] is on the meta"):
        ost.load(path, like=(like_state, meta))


# -- what a file cannot hold -------------------------------------------------------------------


def test_tensors_a_file_cannot_hold_are_refused_by_save(tmp_path):
    """A sparse tensor, a raw-bits tensor, a subclass of Tensor, a module on the meta device:
    our TypeError naming the path, before the file is opened (never NumPy's ``Cannot interpret
    'torch.float32'``)."""

    class Tagged(torch.Tensor):
        pass

    w = nn.Parameter(torch.ones(3))
    indices = torch.sparse_coo_tensor([[0, 2]], [1, 1], (3,), check_invariants=True)
    cases = [
        ({"w": w, "idx": indices}, r"model\['idx'\] is a torch.sparse_coo tensor; densify it"),
        (
            {"w": w, "raw": torch.zeros(3, dtype=torch.int16).view(torch.bits16)},
            r"model\['raw'\] has dtype torch.bits16, which a checkpoint cannot store",
        ),
        (
            {"w": torch.ones(3).as_subclass(Tagged)},
            r"model\['w'\] is a Tagged; a checkpoint stores plain tensors and Parameters",
        ),
    ]
    for model, message in cases:
        state = ost.setup(ost.Descent(1e-2), model)
        with pytest.raises(TypeError, match=message):
            ost.save(tmp_path / "ckpt.npz", state, model)
    linear = nn.Linear(2, 3)
    state = ost.setup(ost.Adam(1e-2), linear)
    with pytest.raises(TypeError, match=r"model\['bias'\] is on the meta device"):
        ost.save(tmp_path / "ckpt.npz", state, nn.Linear(2, 3, device="meta"))
    assert list(tmp_path.iterdir()) == []


def test_checkpoints_do_not_import_torch(tmp_path):
    """``import optstate`` and a NumPy checkpoint's save and load leave torch unimported."""
    code = (
        "import sys, numpy as np, optstate as ost\n"
        "m = {'w': np.ones(3)}\n"
        f"ost.save({str(tmp_path / 'c.npz')!r}, ost.setup(ost.Adam(), m), m)\n"
        f"ost.load({str(tmp_path / 'c.npz')!r})\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert out.stdout.strip() == "False", out.stderr
    with zipfile.ZipFile(tmp_path / "c.npz") as zf:
        assert "model['w'].npy" in zf.namelist()
    with pytest.raises(CheckpointError):  # and a torch program reads it as any other file
        ost.load(tmp_path / "c.npz", like=ost.setup(ost.Adam(), {"w": torch.ones(2)}))
