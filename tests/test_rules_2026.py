"""The rules of 2025-26 against their references, step by step, on a tied model in float64.

Muon against ``torch.optim.Muon`` (float64, with torch's rounding of the Newton-Schulz iteration to
bfloat16 taken out: see ``torch_muon_in_float64``); Adopt, AdEMAMix, the schedule-free rules and
Prodigy against ``optax.contrib`` under ``jax.enable_x64``. The tied model holds a weight at a
plain position and at a ``Transpose``; the reference holds it once, and its gradient is the sum
of the two positions' gradients, added here by hand. Our side runs on NumPy, JAX and torch.
Errors are at most 1e-10 on values of order one. Then: the Muon+AdamW hybrid as a one-liner (on
a torch module against torch.optim's two optimisers), ``eval_params``, the errors.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib
import pytest
import torch
from optax.contrib._muon import orthogonalize_via_newton_schulz

import optstate as ost
from optstate.rules import member

STEPS = 6
TOL = 1e-10


# -- drivers -------------------------------------------------------------------------------------


def draws(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> tuple[dict[str, Any], list[Any]]:
    """Parameters by name ("w" is tied: at "w" and, transposed, at "wt"), and per step one
    gradient per position; "wt"'s is dense, in the transposed orientation."""
    rng = np.random.default_rng(seed)
    params = {k: rng.normal(size=s) for k, s in shapes.items()}
    grads = []
    for _ in range(STEPS):
        g = {k: 2 * rng.normal(size=s) for k, s in shapes.items()}
        g["wt"] = 2 * rng.normal(size=shapes["w"][::-1])
        grads.append(g)
    return params, grads


def summed(g: dict[str, Any]) -> dict[str, Any]:
    """The reference's gradients: the tied weight's two positions added in its orientation."""
    out = {k: v for k, v in g.items() if k != "wt"}
    out["w"] = g["w"] + g["wt"].T
    return out


def convert(backend: str) -> Any:
    if backend == "torch":
        return lambda x: torch.tensor(np.asarray(x), dtype=torch.float64)
    if backend == "jax":
        return lambda x: jnp.asarray(x, dtype=jnp.float64)
    return lambda x: np.array(x, dtype=np.float64)


def run_ours(rule: Any, backend: str, params: dict[str, Any], grads: list[Any]) -> Any:
    """``(state, model, history)`` after the steps on the tied model, ``history`` the parameters
    after each step; the tie is checked every step."""
    to = convert(backend)
    history = []
    with jax.enable_x64(True):
        model = {k: to(v) for k, v in params.items()}
        model["wt"] = ost.Transpose(model["w"])
        state = ost.setup(rule, model)
        for g in grads:
            state, model = ost.update(state, model, {k: to(v) for k, v in g.items()})
            assert model["wt"].parent is model["w"]
            history.append(as_numpy(model))
        return state, model, history


def as_numpy(tree: Any) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in tree.items() if k != "wt"}


def assert_steps_close(ours: list[Any], ref: list[Any], start: dict[str, Any]) -> None:
    """Step by step: the parameters after every step within ``TOL``."""
    assert len(ours) == len(ref) == STEPS
    for a, b in zip(ours[:-1], ref[:-1], strict=True):
        for k in b:
            np.testing.assert_allclose(a[k], np.asarray(b[k]), rtol=0, atol=TOL, err_msg=k)
    assert_close(ours[-1], ref[-1], start)


def assert_close(ours: dict[str, Any], ref: dict[str, Any], start: dict[str, Any]) -> None:
    ours, ref = as_numpy(ours), as_numpy(ref)
    assert ours.keys() == ref.keys()
    for k in ref:
        assert np.max(np.abs(ref[k] - start[k])) > 1e-3, f"{k} did not move"
        np.testing.assert_allclose(ours[k], ref[k], rtol=0, atol=TOL, err_msg=k)


BACKENDS = ["numpy", "jax", "torch"]


# -- Muon against torch.optim.Muon -----------------------------------------------------------------


@pytest.fixture
def torch_muon_in_float64(monkeypatch: pytest.MonkeyPatch) -> None:
    """``torch.optim.Muon`` runs its Newton-Schulz iteration on ``grad.bfloat16()``, a copy in
    bfloat16; with that copy made in the gradient's own dtype it is torch's arithmetic in
    float64 (the rule computes in the parameter's dtype, as optax does)."""
    monkeypatch.setattr(torch.Tensor, "bfloat16", lambda self: self.clone())


def torch_muon(params: list[np.ndarray], grads: list[list[np.ndarray]], **kwargs: Any) -> Any:
    """The parameters after each step of ``torch.optim.Muon``."""
    ps = [torch.nn.Parameter(torch.tensor(p)) for p in params]
    opt = torch.optim.Muon(ps, **kwargs)
    history = []
    for g in grads:
        for p, x in zip(ps, g, strict=True):
            p.grad = torch.tensor(x)
        opt.step()
        history.append([p.detach().numpy().copy() for p in ps])
    return history


MUON_CASES = {
    "defaults": ({}, {}),
    "plain-momentum-match-rms": (
        {"nesterov": False, "adjust_lr_fn": "match_rms_adamw", "ns_steps": 3, "eps": 1e-4},
        {"nesterov": False, "adjust_lr_fn": "match_rms_adamw", "ns_steps": 3, "eps": 1e-4},
    ),
    "coefficients-none-adjust": (
        {"ns_coefficients": (3.0, -3.2, 1.2), "adjust_lr_fn": None, "ns_steps": 7},
        {"ns_coefficients": (3.0, -3.2, 1.2), "adjust_lr_fn": None, "ns_steps": 7},
    ),
}


@pytest.mark.usefixtures("torch_muon_in_float64")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(MUON_CASES))
def test_muon_matches_torch_on_a_tied_weight(case: str, backend: str) -> None:
    """A wide weight tied to its transpose and a tall one: each orthogonalised once, on the
    summed gradient, as torch.optim.Muon steps the same weights held once."""
    ours_kw, theirs_kw = MUON_CASES[case]
    lr, wd, mu = 0.02, 0.05, 0.9
    params, grads = draws({"w": (4, 6), "v": (6, 3)})
    _, _, history = run_ours(ost.Muon(lr, wd, mu, **ours_kw), backend, params, grads)
    ref = torch_muon(
        [params["w"], params["v"]],
        [[summed(g)["w"], g["v"]] for g in grads],
        lr=lr,
        weight_decay=wd,
        momentum=mu,
        **theirs_kw,
    )
    assert_steps_close(history, [{"w": w, "v": v} for w, v in ref], params)


@pytest.mark.usefixtures("torch_muon_in_float64")
def test_orthogonalising_each_position_apart_is_another_step() -> None:
    """What the tie test guards against: Muon of each position's gradient, added, moves the
    weight elsewhere by far more than the tolerance."""
    params, grads = draws({"w": (4, 6), "v": (6, 3)})
    once = torch_muon([params["w"]], [[summed(g)["w"]] for g in grads], lr=0.02)[-1][0]
    w = params["w"]
    apart = torch_muon([w, w.T.copy()], [[g["w"], g["wt"]] for g in grads], lr=0.02)[-1]
    # each position's own step, applied to the one weight
    moved = (apart[0] - w) + (apart[1] - w.T).T
    assert np.max(np.abs((w + moved) - once)) > 1e-3


@pytest.mark.usefixtures("torch_muon_in_float64")
@pytest.mark.parametrize(
    ("shape", "dims", "to_matrix"),
    [
        # torch's (out, in, height, width) kernel: torch.optim.Muon on its (out, in*h*w) view
        ((8, 2, 3, 3), ost.MuonDimensions((1, 2, 3), 0), lambda k: k.reshape(8, 18)),
        # JAX's (height, width, in, out) kernel, as optax's dimension numbers
        (
            (3, 3, 2, 8),
            optax.contrib.MuonDimensionNumbers((0, 1, 2), 3),
            lambda k: k.reshape(18, 8).T,
        ),
    ],
    ids=["torch-layout", "jax-layout-optax-numbers"],
)
def test_muon_trains_a_conv_kernel_as_a_matrix(shape: Any, dims: Any, to_matrix: Any) -> None:
    rng = np.random.default_rng(4)
    kernel = rng.normal(size=shape)
    grads = [2 * rng.normal(size=shape) for _ in range(STEPS)]
    model = {"k": kernel.copy()}
    rule = ost.Muon(0.02, dimension_numbers=dims, adjust_lr_fn="match_rms_adamw")
    state = ost.setup(rule, model)
    ours = []
    for g in grads:
        state, model = ost.update(state, model, {"k": g})
        ours.append(to_matrix(model["k"]))
    ref = torch_muon(
        [to_matrix(kernel)],
        [[to_matrix(g)] for g in grads],
        lr=0.02,
        adjust_lr_fn="match_rms_adamw",
    )
    for a, (b,) in zip(ours, ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=TOL)


def test_muon_orthogonalises_each_slice_of_the_batch_axes_as_optax_does() -> None:
    """Axes that are neither reduction nor output are batch axes: each slice apart, against
    optax's own orthogonalisation (``eps=0``: both floors are inactive here) and momentum
    written out by hand."""
    rng = np.random.default_rng(5)
    shape, mu, lr = (3, 4, 5), 0.9, 0.1
    dims = optax.contrib.MuonDimensionNumbers(reduction_axis=1, output_axis=2)
    p0 = rng.normal(size=shape)
    grads = [rng.normal(size=shape) for _ in range(STEPS)]
    model = {"p": p0.copy()}
    state = ost.setup(ost.Muon(lr, 0.0, mu, dimension_numbers=dims), model)
    p, buf = p0.copy(), np.zeros(shape)
    with jax.enable_x64(True), jax.numpy_dtype_promotion("standard"):
        coefficients = jnp.asarray(ost.rules.muon.NS_COEFFICIENTS)
        for g in grads:
            state, model = ost.update(state, model, {"p": g})
            buf = mu * buf + (1 - mu) * g
            direction = (1 - mu) * g + mu * buf
            o = orthogonalize_via_newton_schulz(
                jnp.asarray(direction), coefficients, 5, "frobenius", 0.0, dims
            )
            p = p - lr * np.sqrt(max(1, 5 / 4)) * np.asarray(o)
            np.testing.assert_allclose(model["p"], p, rtol=0, atol=TOL)


# -- optax.contrib: Adopt, AdEMAMix, schedule-free, Prodigy --------------------------------------

OPTAX_SHAPES = {"w": (3, 4), "b": (5,), "s": ()}


def run_optax(tx: Any, params: dict[str, Any], grads: list[Any]) -> tuple[Any, Any, Any]:
    """``(state, params, history)`` of optax on the weights held once, gradients summed."""
    history = []
    with jax.enable_x64(True), jax.numpy_dtype_promotion("standard"):
        p = {k: jnp.asarray(v) for k, v in params.items()}
        state = tx.init(p)
        for g in grads:
            g = {k: jnp.asarray(v) for k, v in summed(g).items()}
            updates, state = tx.update(g, state, p)
            p = optax.apply_updates(p, updates)
            history.append(as_numpy(p))
        return state, p, history


LR = 0.05
B1, B2 = 0.8, 0.99


def linear64(init: float, end: float, steps: int) -> Any:
    """optax's linear schedule, written out in float64 (optax's own rounds to float32)."""
    return lambda count: init + (end - init) * jnp.minimum(count, steps).astype(jnp.float64) / steps


OPTAX_CASES = {
    "Adopt": (ost.Adopt(LR, (B1, B2), 1e-6), optax.contrib.adopt(LR, B1, B2, 1e-6)),
    "Adopt-nesterov-unclipped": (
        ost.Adopt(LR, (B1, B2), nesterov=True, use_clipping=False),
        optax.contrib.adopt(LR, B1, B2, nesterov=True, use_clipping=False),
    ),
    "AdEMAMix-schedules": (
        ost.AdEMAMix(
            LR,
            (B1, B2),
            beta3=ost.schedules.linear(0.9, 0.999, 4),
            alpha=ost.schedules.linear(0.0, 5.0, 4),
            eps_root=1e-4,
            weight_decay=0.1,
        ),
        optax.contrib.ademamix(
            LR,
            B1,
            B2,
            b3=linear64(0.9, 0.999, 4),
            alpha=linear64(0.0, 5.0, 4),
            eps_root=1e-4,
            weight_decay=0.1,
        ),
    ),
    "ScheduleFreeSGD": (
        ost.ScheduleFreeSGD(0.5, 0.8, weight_decay=0.01, weight_lr_power=1.5),
        optax.contrib.schedule_free_sgd(0.5, b1=0.8, weight_decay=0.01, weight_lr_power=1.5),
    ),
    "ScheduleFreeSGD-warmup": (
        ost.ScheduleFreeSGD(0.5, warmup_steps=3),
        optax.contrib.schedule_free_sgd(linear64(0.0, 0.5, 3)),  # = its warmup_steps=3
    ),
    "ScheduleFreeAdamW": (
        ost.ScheduleFreeAdamW(LR, (B1, B2), 1e-6, weight_decay=0.05),
        optax.contrib.schedule_free_adamw(LR, b1=B1, b2=B2, eps=1e-6, weight_decay=0.05),
    ),
    "ScheduleFreeAdamW-warmup": (
        ost.ScheduleFreeAdamW(LR, warmup_steps=4, weight_lr_power=3.0),
        optax.contrib.schedule_free_adamw(linear64(0.0, LR, 4), weight_lr_power=3.0),
    ),
    "Prodigy": (ost.Prodigy(d0=0.05), optax.contrib.prodigy(estim_lr0=0.05)),
    "Prodigy-options": (
        ost.Prodigy(
            ost.schedules.linear(1.0, 0.2, 5),
            (B1, B2),
            beta3=0.95,
            d0=5e-2,
            d_coef=0.5,
            weight_decay=0.1,
            safeguard_warmup=True,
        ),
        optax.contrib.prodigy(
            linear64(1.0, 0.2, 5),
            (B1, B2),
            beta3=0.95,
            estim_lr0=5e-2,
            estim_lr_coef=0.5,
            weight_decay=0.1,
            safeguard_warmup=True,
        ),
    ),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(OPTAX_CASES))
def test_matches_optax_on_a_tied_weight(name: str, backend: str) -> None:
    rule, tx = OPTAX_CASES[name]
    params, grads = draws(OPTAX_SHAPES, seed=1)
    state, model, history = run_ours(rule, backend, params, grads)
    ref_state, ref, ref_history = run_optax(tx, params, grads)
    assert_steps_close(history, ref_history, params)
    if name.startswith("ScheduleFree"):
        with jax.enable_x64(True), jax.numpy_dtype_promotion("standard"):
            ours = ost.eval_params(state, model)
            theirs = optax.contrib.schedule_free_eval_params(ref_state, ref)
        assert ours["wt"].parent is ours["w"]
        assert_close(ours, theirs, params)


def test_prodigy_estimates_one_learning_rate_for_the_group() -> None:
    """Every parameter's state holds the group's estimate d; a parameter without a gradient holds
    its moments and its value, and takes the group's d again when it next steps."""
    model = {"a": np.ones(3), "b": np.ones(2)}
    state = ost.setup(ost.Prodigy(d0=1e-3), model)

    def grads(model: Any) -> Any:  # towards 4: d grows towards the distance, 3
        return {k: 2 * (v - 4.0) for k, v in model.items()}

    for _ in range(6):
        state, model = ost.update(state, model, grads(model))
    assert float(state.states[0].d) == float(state.states[1].d) > 1e-3
    before = copy.deepcopy((state.states[1], model["b"]))
    state, model = ost.update(state, model, {"a": grads(model)["a"], "b": None})
    np.testing.assert_array_equal(model["b"], before[1])
    for x, y in zip(state.states[1], before[0], strict=True):
        np.testing.assert_array_equal(x, y)
    assert int(state.states[0].count) == 7
    assert float(state.states[0].d) > float(state.states[1].d)  # b's copy is behind
    state, model = ost.update(state, model, grads(model))
    assert float(state.states[0].d) == float(state.states[1].d)
    assert int(state.states[1].count) == int(state.states[0].count) == 8


# -- the hybrid: Muon for hidden matrices, AdamW for the rest -------------------------------------


def hybrid(path: tuple[Any, ...], x: Any) -> ost.Rule:
    """The docs' one-liner, for a torch module's names ("emb.weight", "mix.bias", ...)."""
    hidden = x.ndim == 2 and not path[0].startswith(("emb", "head"))
    return ost.Muon(0.02, weight_decay=0.01) if hidden else ost.AdamW(3e-3, weight_decay=0.1)


class TiedLM(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.emb = torch.nn.Embedding(11, 6, dtype=torch.float64)
        self.mix = torch.nn.Linear(6, 6, dtype=torch.float64)
        self.out = torch.nn.Linear(6, 4, dtype=torch.float64)
        self.head = torch.nn.Linear(6, 11, bias=False, dtype=torch.float64)
        self.head.weight = self.emb.weight
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.5)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.mix(self.emb(idx)))
        return self.head(h + self.out(h).sum(-1, keepdim=True))


def lm_step(module: torch.nn.Module, step: int) -> None:
    gen = torch.Generator().manual_seed(100 + step)
    x, y = torch.randint(0, 11, (8,), generator=gen), torch.randint(0, 11, (8,), generator=gen)
    module.zero_grad()
    torch.nn.functional.cross_entropy(module(x), y).backward()


@pytest.mark.usefixtures("torch_muon_in_float64")
def test_the_hybrid_one_liner_matches_torch_muon_beside_adamw() -> None:
    """``setup(lambda path, x: ...)`` gives Muon to the hidden matrices and AdamW to the tied
    embedding/head (one parameter), the biases and the output layer: as torch.optim.Muon and
    torch.optim.AdamW side by side, each on its own Parameters."""
    ours, ref = TiedLM(), TiedLM()
    state = ost.setup(hybrid, ours)
    assert [r.name() for r in state.plan.rules] == ["AdamW", "Muon"]
    assert state.plan.n_ties == 1
    names = dict(ref.named_parameters())
    muon_names = ["mix.weight", "out.weight"]
    muon = torch.optim.Muon([names[n] for n in muon_names], lr=0.02, weight_decay=0.01)
    rest = [p for n, p in names.items() if n not in muon_names]
    adamw = torch.optim.AdamW(rest, lr=3e-3, weight_decay=0.1)
    for step in range(STEPS):
        lm_step(ours, step)
        state, _ = ost.update_(state, ours, ost.interop.torch.grad_totals(ours))
        lm_step(ref, step)
        muon.step()
        adamw.step()
    assert ours.head.weight is ours.emb.weight
    for (n, p), q in zip(ours.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=TOL, msg=n)


def test_the_rule_function_sees_each_positions_leaf_and_a_tie_must_agree() -> None:
    e = np.ones((5, 3))
    model = {"emb": e, "hidden": {"w": np.ones((3, 3)), "b": np.zeros(3)}, "head": ost.Transpose(e)}
    seen: dict[tuple[Any, ...], Any] = {}

    def rule(path: tuple[Any, ...], x: Any) -> ost.Rule:
        seen[path] = x
        if x.ndim == 2 and path[0] not in ("emb", "head"):
            return ost.Muon(0.02)
        return ost.AdamW(1e-3)

    state = ost.setup(rule, model)
    assert seen[("head",)] is model["head"]
    assert seen[("emb",)] is e
    assert state.plan.n_ties == 1
    assert len(state.plan.params) == 3
    with pytest.raises(ost.TieError, match=r"model\['emb'\] and model\['head'\] hold one"):
        ost.setup(lambda path, x: ost.Muon() if path[0] == "head" else ost.AdamW(), model)
    # a function of the path alone still works, and so does one with a default second argument
    ost.setup(lambda path: ost.AdamW(), model)
    ost.setup(lambda path, scale=1.0: ost.AdamW(scale * 1e-3), model)


# -- eval_params -----------------------------------------------------------------------------------


def test_eval_params_is_the_model_itself_for_other_rules() -> None:
    model = {"w": np.ones(3)}
    state = ost.setup(ost.Adam(), model)
    assert ost.eval_params(state, model) is model


def test_eval_params_keeps_numpy_views_and_other_rules_parameters() -> None:
    w = np.arange(6.0).reshape(2, 3)
    model = {"w": w, "wT": w.T, "b": np.ones(2)}
    state = ost.setup(
        lambda path: ost.ScheduleFreeSGD(0.1) if path[0] != "b" else ost.Adam(0.1), model
    )
    for _ in range(3):
        state, model = ost.update(
            state, model, {"w": np.ones((2, 3)), "wT": np.ones((3, 2)), "b": np.ones(2)}
        )
    x = ost.eval_params(state, model)
    assert x["b"] is model["b"]
    assert x["wT"].base is x["w"]
    z, beta = state.states[1].z, 0.9  # parameters in order of first position: b, w
    np.testing.assert_allclose(x["w"], (model["w"] - (1 - beta) * z) / beta, rtol=1e-15)
    assert not np.shares_memory(x["w"], model["w"])


def test_eval_params_through_a_chain_matches_optax_and_runs_under_jit() -> None:
    rule = ost.OptimiserChain(ost.ClipGlobalNorm(1.0), ost.ScheduleFreeAdamW(0.05))
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.contrib.schedule_free_adamw(0.05))
    params, grads = draws(OPTAX_SHAPES, seed=3)
    state, model, history = run_ours(rule, "jax", params, grads)
    ref_state, ref, ref_history = run_optax(tx, params, grads)
    assert_steps_close(history, ref_history, params)
    with jax.enable_x64(True), jax.numpy_dtype_promotion("standard"):
        theirs = optax.contrib.schedule_free_eval_params(ref_state[1], ref)
        ours = ost.eval_params(state, model)
        jitted = jax.jit(ost.eval_params)(state, model)
    assert_close(ours, theirs, params)
    for k in ("w", "b", "s"):  # compiled arithmetic may round differently: an ulp or so
        np.testing.assert_allclose(np.asarray(jitted[k]), np.asarray(ours[k]), rtol=1e-14)
    # jit returns an array per output position: equal copies (ost.retie makes them one again)
    np.testing.assert_array_equal(np.asarray(jitted["wt"].parent), np.asarray(jitted["w"]))


def test_eval_params_of_a_float32_master_copy() -> None:
    """In ``MixedPrecision`` the evaluation point comes from the float32 copy, then is rounded."""
    model = {"w": jnp.asarray([1.0, 2.0], jnp.bfloat16)}
    state = ost.setup(ost.MixedPrecision(ost.ScheduleFreeSGD(0.3)), model)
    for g in ([1.0, -1.0], [0.5, 0.25]):
        state, model = ost.update(state, model, {"w": jnp.asarray(g, jnp.bfloat16)})
    x = ost.eval_params(state, model)["w"]
    master, z = state.states[0].master, state.states[0].inner.z
    assert x.dtype == jnp.bfloat16
    expected = ((master - 0.1 * z) / 0.9).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(expected, np.float32))


@dataclasses.dataclass(frozen=True)
class Passing(ost.Rule):
    """A container eval_params does not know."""

    rule: ost.Rule = member()  # noqa: RUF009  (a field declaration, as in the rules)

    def hyper(self) -> Any:
        return self.rule.hyper()

    def init(self, param: Any) -> Any:
        return self.rule.init(param)

    def apply(self, hyper: Any, state: Any, param: Any, grad: Any) -> Any:
        return self.rule.apply(hyper, state, param, grad)


def test_eval_params_errors_name_what_is_wrong() -> None:
    model = {"w": np.ones(3)}
    state = ost.setup(ost.ScheduleFreeSGD(), model)
    with pytest.raises(TypeError, match=r"eval_params\(state, model\)"):
        ost.eval_params(model, state)  # type: ignore[arg-type]
    with pytest.raises(ost.StructureError, match="positions missing from the model"):
        ost.eval_params(state, {"v": np.ones(3)})
    with pytest.raises(ValueError, match=r"model\['w'\] changed since setup"):
        ost.eval_params(state, {"w": np.ones(4)})
    inside = ost.setup(Passing(ost.ScheduleFreeSGD()), model)
    with pytest.raises(TypeError, match="inside Passing"):
        ost.eval_params(inside, model)


def test_a_schedule_free_state_round_trips_through_a_checkpoint(tmp_path: Any) -> None:
    w = np.arange(6.0).reshape(2, 3)
    model = {"w": w, "wt": ost.Transpose(w), "b": np.ones(3)}
    state = ost.setup(ost.ScheduleFreeAdamW(0.1, warmup_steps=2), model)
    for seed in range(3):
        g = np.random.default_rng(seed)
        grads = {"w": g.normal(size=(2, 3)), "wt": g.normal(size=(3, 2)), "b": g.normal(size=3)}
        state, model = ost.update(state, model, grads)
    ost.save(tmp_path / "sf.npz", state, model)
    loaded, again = ost.load(tmp_path / "sf.npz")
    assert loaded.plan == state.plan
    for k in ("w", "b"):
        np.testing.assert_array_equal(
            ost.eval_params(loaded, again)[k], ost.eval_params(state, model)[k]
        )


# -- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        (
            (3,),
            r"model\['b'\]: Muon orthogonalises matrices and takes 2-D parameters; this one "
            r"has shape \(3,\) \(1-D\)\. Give it another rule .*lambda path, x",
        ),
        ((2, 3, 4), r"model\['b'\]: .*shape \(2, 3, 4\) \(3-D\).*MuonDimensions"),
    ],
)
@pytest.mark.parametrize("backend", ["numpy", "jax"])
def test_muon_refuses_a_parameter_that_is_not_a_matrix_at_setup(
    shape: Any, message: str, backend: str
) -> None:
    to = np.asarray if backend == "numpy" else jnp.asarray
    model = {"a": to(np.ones((3, 4), np.float32)), "b": to(np.ones(shape, np.float32))}
    before = {k: np.array(v) for k, v in model.items()}
    with pytest.raises(ValueError, match=message):
        ost.setup(ost.Muon(), model)
    for k, v in model.items():
        np.testing.assert_array_equal(np.asarray(v), before[k])


def test_muon_refusal_names_the_parameter_in_setups_compiled_init() -> None:
    """Many same-shaped JAX parameters get their states from one compiled init; its refusal
    names a parameter too."""
    model = [jnp.ones(3) for _ in range(70)]
    with pytest.raises(ValueError, match=r"model\[0\]: Muon orthogonalises matrices"):
        ost.setup(ost.Muon(), model)


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: ost.Muon(ns_steps=0), ValueError, r"Muon\(ns_steps=\.\.\.\) must be an integer"),
        (lambda: ost.Muon(ns_steps=100), ValueError, r"from 1 to 99, got 100"),
        (lambda: ost.Muon(ns_steps=5.0), TypeError, r"Muon\(ns_steps=\.\.\.\)"),
        (lambda: ost.Muon(-0.1), ValueError, r"Muon\(lr=\.\.\.\) must be in \[0, inf\)"),
        (lambda: ost.Muon(momentum=-0.5), ValueError, r"Muon\(momentum=\.\.\.\)"),
        (lambda: ost.Muon(weight_decay=-1.0), ValueError, r"Muon\(weight_decay=\.\.\.\)"),
        (lambda: ost.Muon(eps=-1.0), ValueError, r"Muon\(eps=\.\.\.\)"),
        (lambda: ost.Muon(adjust_lr_fn="fast"), ValueError, r"Muon\(adjust_lr_fn=\.\.\.\)"),
        (lambda: ost.Muon(ns_coefficients=(1.0, 2.0)), TypeError, r"tuple of 3"),
        (lambda: ost.Muon(dimension_numbers="conv"), TypeError, r"MuonDimensions"),
        (lambda: ost.Muon(dimension_numbers=(0, "x")), TypeError, r"an axis must be an int"),
        (lambda: ost.ScheduleFreeSGD(beta=0.0), ValueError, r"ScheduleFreeSGD\(beta=\.\.\.\)"),
        (lambda: ost.ScheduleFreeAdamW(warmup_steps=0), ValueError, r"warmup_steps"),
        (lambda: ost.Prodigy(d0=0.0), ValueError, r"Prodigy\(d0=\.\.\.\) must be in \(0, inf\)"),
        (lambda: ost.Prodigy(beta3=1.0), ValueError, r"Prodigy\(beta3=\.\.\.\)"),
        (lambda: ost.Adopt(betas=(0.9, 1.0)), ValueError, r"Adopt\(betas=\.\.\.\)\[1\]"),
        (lambda: ost.AdEMAMix(alpha=-1.0), ValueError, r"AdEMAMix\(alpha=\.\.\.\)"),
    ],
)
def test_bad_options_are_refused_when_the_rule_is_made(make: Any, error: Any, match: str) -> None:
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize(
    ("dims", "match"),
    [
        (ost.MuonDimensions(0, 3), r"does not fit a parameter of shape \(3, 4\): axis 3"),
        (ost.MuonDimensions(0, 0), r"must be distinct"),
    ],
)
def test_dimension_numbers_that_do_not_fit_are_refused_at_setup(dims: Any, match: str) -> None:
    with pytest.raises(ValueError, match=r"model\['k'\]: .*" + match):
        ost.setup(ost.Muon(dimension_numbers=dims), {"k": np.ones((3, 4))})
    with pytest.raises(ValueError, match=r"model\['v'\]: Muon with dimension_numbers takes"):
        ost.setup(ost.Muon(dimension_numbers=ost.MuonDimensions()), {"v": np.ones(4)})


def test_eval_params_of_a_torch_module_is_its_parameter_dict() -> None:
    module = TiedLM()
    state = ost.setup(ost.ScheduleFreeAdamW(0.01), module)
    for step in range(3):
        lm_step(module, step)
        state, _ = ost.update_(state, module, ost.interop.torch.grad_totals(module))
    x = ost.eval_params(state, module)
    assert x["head.weight"] is x["emb.weight"]
    assert not x["emb.weight"].requires_grad
    k = list(dict(module.named_parameters())).index("emb.weight")
    y, z = module.emb.weight.detach(), state.states[k].z
    torch.testing.assert_close(x["emb.weight"], (y - 0.1 * z) / 0.9, rtol=1e-15, atol=1e-15)


def test_a_muon_state_with_dimension_numbers_round_trips(tmp_path: Any) -> None:
    rng = np.random.default_rng(6)
    model = {"k": rng.normal(size=(3, 3, 2, 4))}
    rule = ost.Muon(0.02, dimension_numbers=ost.MuonDimensions((0, 1, 2), 3))
    state, model = ost.update(ost.setup(rule, model), model, {"k": rng.normal(size=(3, 3, 2, 4))})
    ost.save(tmp_path / "muon.npz", state, model)
    loaded, again = ost.load(tmp_path / "muon.npz")
    assert loaded.plan == state.plan
    g = {"k": rng.normal(size=(3, 3, 2, 4))}
    np.testing.assert_array_equal(
        ost.update(loaded, again, g)[1]["k"], ost.update(state, model, g)[1]["k"]
    )
