"""Sharded parameters (``jax.sharding``), the data-parallel and multi-process examples, and a
smoke run of the benchmark.

The sharding checks run twice: on the suite's 2 devices in this process, and on 4 simulated CPU
devices in a subprocess (``XLA_FLAGS`` must be set before JAX starts, and conftest.py has already
asked for 2). Both run ``sharded_facts``, which builds a tied model on a ``("data", "model")``
mesh, steps it eagerly, under ``jax.jit`` and with donation, and reports what it saw; the values
are compared with optax on the model written with the weight once.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from rules_under_test import instances

import optstate as ost
from optstate._setup import _COMPILED_INIT_MIN_GROUP

ROOT = Path(__file__).resolve().parents[1]
DATA_PARALLEL = ROOT / "examples" / "data_parallel.py"
MULTIPROCESS = ROOT / "examples" / "multiprocess.py"
LR = 1e-2


def run(command: list[str], *, devices: int | None, timeout: float) -> str:
    """Run ``command`` in a fresh process with ``devices`` simulated CPU devices (``None``: leave
    ``XLA_FLAGS`` unset, as a user's shell would) and return its standard output."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    if devices is not None:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    result = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


# -- sharded parameters ------------------------------------------------------------------------


def make_mesh() -> Mesh:
    """All devices as ``("data", "model")``, 2 along "model"."""
    return Mesh(np.array(jax.devices()).reshape(-1, 2), ("data", "model"))


def make_model(mesh: Mesh) -> dict[str, Any]:
    """A weight sharded over both mesh axes at three positions (itself, a ``Transpose``, the
    same array again), a bias sharded over "model" and a replicated one."""
    rng = np.random.default_rng(0)
    w = jax.device_put(
        rng.normal(size=(8, 6)).astype(np.float32), NamedSharding(mesh, P("data", "model"))
    )
    b = jax.device_put(np.zeros(6, np.float32), NamedSharding(mesh, P("model")))
    c = jax.device_put(np.zeros(8, np.float32), NamedSharding(mesh, P()))
    return {"enc": {"w": w, "b": b}, "dec": {"w": ost.Transpose(w), "b": c}, "again": w}


def loss_fn(model: dict[str, Any], x: jax.Array) -> jax.Array:
    h = jnp.tanh(x @ model["enc"]["w"] + model["enc"]["b"][None, :])
    y = h @ model["dec"]["w"] + model["dec"]["b"][None, :]
    return jnp.mean((y - x) ** 2) + jnp.sum(jnp.sin(model["again"]))


GRAD = jax.jit(jax.grad(loss_fn))


def batch(mesh: Mesh, seed: int) -> jax.Array:
    x = np.random.default_rng(seed).normal(size=(16, 8)).astype(np.float32)
    return jax.device_put(x, NamedSharding(mesh, P("data", None)))


def placement(tree: Any) -> list[tuple[Any, int]]:
    return [(x.sharding, x.ndim) for x in jax.tree.leaves(tree)]


def same_placement(a: Any, b: Any) -> bool:
    """Every array of ``a`` is laid out over the devices as the matching one of ``b``."""
    pa, pb = placement(a), placement(b)
    return len(pa) == len(pb) and all(
        s.is_equivalent_to(t, n) for (s, n), (t, _) in zip(pa, pb, strict=True)
    )


def moments(state: ost.State) -> list[Any]:
    return [m for s in state.states for m in (s.mu, s.nu)]


def unique_params(model: dict[str, Any]) -> list[Any]:
    """The parameters in the order of their first positions (the order of ``State.states``)."""
    return [model["again"], model["dec"]["b"], model["enc"]["b"]]


def moments_like_params(state: ost.State, model: dict[str, Any]) -> bool:
    """Adam's mu and nu of every parameter have that parameter's sharding."""
    params = unique_params(model)
    return all(
        m.sharding.is_equivalent_to(p.sharding, p.ndim)
        for s, p in zip(state.states, params, strict=True)
        for m in (s.mu, s.nu)
    )


def scalars(state: ost.State) -> list[Any]:
    return [x for x in jax.tree.leaves(state) if x.ndim == 0]


def on_mesh(x: jax.Array, mesh: Mesh) -> bool:
    return x.sharding.is_fully_replicated and x.sharding.device_set == set(mesh.devices.flat)


def max_diff(a: Any, b: Any) -> float:
    return max(
        float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def optax_reference(model: dict[str, Any], grads: list[dict[str, Any]]) -> dict[str, Any]:
    """optax.adam on the model written with the weight once, its three gradients summed by hand,
    on host arrays: the sharded runs must give these values."""
    params = {k: np.asarray(v) for k, v in single(model).items()}
    tx = optax.adam(LR)
    opt_state = tx.init(params)
    with jax.numpy_dtype_promotion("standard"):  # optax is not strict-promotion clean
        for g in grads:
            summed = {
                "w": np.asarray(g["enc"]["w"] + g["dec"]["w"].parent + g["again"]),
                "b": np.asarray(g["enc"]["b"]),
                "c": np.asarray(g["dec"]["b"]),
            }
            updates, opt_state = tx.update(summed, opt_state, params)
            params = optax.apply_updates(params, updates)
    return params


def single(model: dict[str, Any]) -> dict[str, Any]:
    return {"w": model["enc"]["w"], "b": model["enc"]["b"], "c": model["dec"]["b"]}


def sharded_facts() -> dict[str, Any]:
    """Step a sharded tied model eagerly, under jit and with donation; report what was seen."""
    mesh = make_mesh()
    model = make_model(mesh)
    state = ost.setup(ost.Adam(LR), model)
    facts: dict[str, Any] = {
        "devices": len(jax.devices()),
        "weight_spec": list(model["enc"]["w"].sharding.spec),
        "setup_moments_like_params": moments_like_params(state, model),
        "setup_scalars_replicated": all(x.sharding.is_fully_replicated for x in scalars(state)),
    }

    # Eager: two steps, each a compiled program run by update itself.
    g1 = GRAD(model, batch(mesh, 1))
    s1, m1 = ost.update(state, model, g1)
    g2 = GRAD(m1, batch(mesh, 2))
    s2, m2 = ost.update(s1, m1, g2)
    reference = optax_reference(model, [g1, g2])
    facts |= {
        "eager_params_kept": same_placement(m2, model),
        "eager_moments_kept": same_placement(moments(s2), moments(state)),
        "eager_moments_like_params": moments_like_params(s2, m2),
        "eager_tie_one_object": m2["dec"]["w"].parent is m2["enc"]["w"] is m2["again"],
        "eager_counters_on_mesh": all(
            on_mesh(x, mesh) for x in jax.tree.leaves(s2.states) if x.ndim == 0
        ),
        "eager_vs_optax": max_diff(single(m2), reference),
    }

    # Under the user's jit: the same values, shardings kept, the tie as equal copies until retie.
    step = jax.jit(ost.update)
    j1, n1 = step(state, model, g1)
    j2, n2 = step(j1, n1, g2)
    copies = n2["dec"]["w"].parent is not n2["enc"]["w"]
    n2 = ost.retie(j2, n2)
    facts |= {
        "jit_params_kept": same_placement(n2, model),
        "jit_moments_kept": same_placement(moments(j2), moments(state)),
        "jit_tie_copies_before_retie": copies,
        "jit_tie_one_object_after_retie": n2["dec"]["w"].parent is n2["enc"]["w"] is n2["again"],
        "jit_vs_eager": max(max_diff(n2, m2), max_diff(j2.states, s2.states)),
    }

    # A whole training step under jit: sharded batch in, gradient, update.
    @jax.jit
    def train_step(state: ost.State, model: Any, x: jax.Array) -> tuple[ost.State, Any]:
        return ost.update(state, model, jax.grad(loss_fn)(model, x))

    t1, u1 = train_step(state, model, batch(mesh, 1))
    facts["train_step_params_kept"] = same_placement(u1, model)
    facts["train_step_moments_kept"] = same_placement(moments(t1), moments(state))
    facts["train_step_vs_eager"] = max_diff(ost.retie(t1, u1), m1)

    # Donation, from a fresh setup: each tied weight's one buffer is donated once.
    fresh = make_model(mesh)
    d0 = ost.setup(ost.Adam(LR), fresh)
    d1, f1 = ost.update(d0, fresh, g1, donate=True)
    d2, f2 = ost.update(d1, f1, g2, donate=True)
    facts |= {
        "donate_old_deleted": fresh["enc"]["w"].is_deleted() and f1["again"].is_deleted(),
        "donate_params_kept": same_placement(f2, model),
        "donate_moments_kept": same_placement(moments(d2), moments(state)),
        "donate_tie_one_object": f2["dec"]["w"].parent is f2["enc"]["w"] is f2["again"],
        "donate_vs_eager": max(max_diff(f2, m2), max_diff(d2.states, s2.states)),
    }
    return facts


SUBPROCESS = f"""
import importlib.util, json, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})  # the tests' shared modules
spec = importlib.util.spec_from_file_location("test_sharding", {str(Path(__file__))!r})
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
print(json.dumps(module.sharded_facts()))
"""


@pytest.fixture(scope="module", params=[2, 4], ids=["2-devices-in-process", "4-devices-subprocess"])
def facts(request: pytest.FixtureRequest) -> dict[str, Any]:
    if request.param == len(jax.devices()):
        return sharded_facts()
    out = run([sys.executable, "-c", SUBPROCESS], devices=request.param, timeout=120)
    found: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    assert found["devices"] == request.param
    return found


def test_facts_ran_on_the_mesh(facts: dict[str, Any]) -> None:
    assert facts["devices"] in (2, 4)
    assert facts["weight_spec"] == ["data", "model"]


def test_setup_gives_each_moment_its_parameters_sharding(facts: dict[str, Any]) -> None:
    assert facts["setup_moments_like_params"]
    # The step counters (0-d int32) and hyper-parameters start on one device: replicated scalars.
    assert facts["setup_scalars_replicated"]


def test_eager_update_keeps_shardings_and_the_tie(facts: dict[str, Any]) -> None:
    assert facts["eager_params_kept"]
    assert facts["eager_moments_kept"]
    assert facts["eager_moments_like_params"]
    assert facts["eager_tie_one_object"]
    assert facts["eager_counters_on_mesh"]  # after a step: replicated over the mesh
    assert facts["eager_vs_optax"] < 1e-6


def test_jitted_update_keeps_shardings_and_retie_restores_the_tie(facts: dict[str, Any]) -> None:
    assert facts["jit_params_kept"]
    assert facts["jit_moments_kept"]
    assert facts["jit_tie_copies_before_retie"]
    assert facts["jit_tie_one_object_after_retie"]
    assert facts["jit_vs_eager"] < 1e-6


def test_jitted_training_step_on_a_sharded_batch(facts: dict[str, Any]) -> None:
    assert facts["train_step_params_kept"]
    assert facts["train_step_moments_kept"]
    assert facts["train_step_vs_eager"] < 1e-6


def test_donating_update_on_a_sharded_tied_model(facts: dict[str, Any]) -> None:
    assert facts["donate_old_deleted"]
    assert facts["donate_params_kept"]
    assert facts["donate_moments_kept"]
    assert facts["donate_tie_one_object"]
    assert facts["donate_vs_eager"] < 1e-6


RULES = instances()  # the one list of rules under test, each as a Rule


def muon_adamw(path: Any, x: Any) -> ost.Rule:
    return ost.Muon(0.02) if x.ndim == 2 else ost.AdamW()


# The model on the mesh has biases, which Muon refuses: there it runs as Muon+AdamW.
MESH_RULES: list[Any] = [r for r in RULES if not isinstance(r, ost.Muon)] + [muon_adamw]


@pytest.mark.parametrize(
    "rule",
    MESH_RULES,
    ids=[r.name() if isinstance(r, ost.Rule) else "Muon+AdamW" for r in MESH_RULES],
)
def test_every_rule_keeps_state_on_the_mesh(rule: Any) -> None:
    """Every state array shaped like its parameter has the parameter's sharding from setup on;
    after a step, every state array (moments of another shape and counters too) lives on the
    mesh, and the parameters keep their shardings."""
    mesh = make_mesh()
    model = make_model(mesh)
    params = unique_params(model)
    state = ost.setup(rule, model)

    def param_shaped_like_params(state: ost.State) -> bool:
        return all(
            x.sharding.is_equivalent_to(p.sharding, p.ndim)
            for rule_state, p in zip(state.states, params, strict=True)
            for x in jax.tree.leaves(rule_state)
            if x.shape == p.shape
        )

    assert param_shaped_like_params(state)
    grads = GRAD(model, batch(mesh, 1))
    state, new = ost.update(state, model, grads)
    assert param_shaped_like_params(state)
    assert same_placement(new, model)
    devices = set(mesh.devices.flat)
    assert all(x.sharding.device_set == devices for x in jax.tree.leaves(state.states))


@pytest.mark.parametrize("rule", RULES, ids=[r.name() for r in RULES])
def test_a_compiled_init_equals_the_rules_own_init(rule: ost.Rule) -> None:
    """Many same-shaped parameters get their states from one compiled ``init`` (setup's fast path
    for models of many leaves): each state is what ``rule.init`` gives it eagerly, the same arrays
    (values, dtypes) with the same shardings: the parameter's, or replicated on its devices."""
    mesh = make_mesh()
    rng = np.random.default_rng(1)
    sharded = NamedSharding(mesh, P("data", "model"))
    n = _COMPILED_INIT_MIN_GROUP + 3  # a compiled init of a full chunk, one of the other three
    model = [
        jax.device_put(rng.normal(size=(4, 6)).astype(np.float32), sharded) for _ in range(n)
    ] + [jnp.asarray(rng.normal(size=(3, 2)), jnp.float32) for _ in range(n)]
    state = ost.setup(rule, model)
    for got, p in zip(state.states, model, strict=True):
        want = rule.init(p)
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            assert (g.shape, g.dtype) == (w.shape, w.dtype)
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
            assert g.sharding.device_set == p.sharding.device_set
            if g.shape == p.shape:
                assert g.sharding.is_equivalent_to(p.sharding, p.ndim)


def test_adafactor_statistics_start_with_the_natural_sharding() -> None:
    """A factored statistic is split like its parameter on the axes it keeps, from setup on (no
    resharding in the first step), and stays so."""
    mesh = make_mesh()
    w = jax.device_put(np.ones((8, 6), np.float32), NamedSharding(mesh, P("data", "model")))
    state = ost.setup(ost.Adafactor(min_dim_size_to_factor=2), {"w": w})
    # optax's convention: the larger axis (8) is the column, so the statistics are (8, 1), (1, 6).
    natural = {
        (8, 1): NamedSharding(mesh, P("data", None)),
        (1, 6): NamedSharding(mesh, P(None, "model")),
    }

    def as_natural(state: ost.State) -> bool:
        stats = state.states[0][:2]
        assert sorted(x.shape for x in stats) == sorted(natural)
        return all(x.sharding.is_equivalent_to(natural[x.shape], 2) for x in stats)

    assert as_natural(state)
    state, _ = ost.update(state, {"w": w}, {"w": jnp.ones_like(w)})
    assert as_natural(state)


# -- the examples ------------------------------------------------------------------------------


def load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None, path
    assert spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_data_parallel_example_imports_quietly(capsys: pytest.CaptureFixture[str]) -> None:
    flags = os.environ.get("XLA_FLAGS")
    load(DATA_PARALLEL)
    assert capsys.readouterr().out == ""
    assert os.environ.get("XLA_FLAGS") == flags  # only the script sets the device count


def test_data_parallel_example_in_process() -> None:
    figures = load(DATA_PARALLEL).main(["--steps", "30", "--quiet", "--batch", "64"])
    assert figures["devices"] == len(jax.devices())
    assert figures["final_loss"] < 0.5 * figures["initial_loss"]
    assert figures["tie_drift"] == 0.0
    assert figures["tied_after_retie"] is True
    assert figures["param_shardings_kept"] is True
    assert figures["moment_shardings_kept"] is True


def test_data_parallel_example_script_on_4_devices(tmp_path: Path) -> None:
    """As a user runs it (no XLA_FLAGS), with the weight also split over a "model" axis."""
    out_json = tmp_path / "figures.json"
    command = [sys.executable, str(DATA_PARALLEL), "--steps", "40", "--json", str(out_json)]
    out = run([*command, "--model-axis", "2"], devices=None, timeout=120)
    figures = json.loads(out_json.read_text())
    assert "4 cpu devices" in out  # the script asked for them: XLA_FLAGS was not set
    assert figures["mesh"] == {"data": 2, "model": 2}
    assert figures["final_loss"] < 0.5 * figures["initial_loss"]
    assert figures["tie_drift"] == 0.0
    assert figures["tied_after_retie"] is True
    assert figures["param_shardings_kept"] is True
    assert figures["moment_shardings_kept"] is True
    assert figures["weight_spec"] == str(P(None, "model"))


def test_multiprocess_example_on_localhost(tmp_path: Path) -> None:
    out_json = tmp_path / "figures.json"
    command = [sys.executable, str(MULTIPROCESS), "--steps", "20", "--timeout", "90"]
    run([*command, "--json", str(out_json)], devices=None, timeout=150)
    figures = json.loads(out_json.read_text())
    assert figures["processes"] == 2
    assert figures["global_devices"] == 4
    assert figures["local_devices"] == [2, 2]
    assert figures["final_loss"] < 0.5 * figures["initial_loss"]
    assert figures["same_loss_everywhere"] is True
    assert figures["same_weights_everywhere"] is True
    assert figures["tied_after_retie"] is True
    assert figures["tie_drift"] == 0.0
