"""``optstate.interop.torch.Optimizer`` against ``torch.optim`` (the oracle: Adam, AdamW, SGD with
the same scheduler on the same tied module), optax (rules torch lacks), and its own bad inputs."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from rules_under_test import RULES
from torch import nn
from torch.optim import lr_scheduler as sched
from torch_optimizer_cases import (
    DDP_STEPS,
    TiedLM,
    batch,
    ddp_scheduler,
    make_model,
    train_step,
)

import optstate as ost
from optstate.interop.torch import Optimizer

ROOT = Path(__file__).resolve().parents[1]


def assert_same_weights(a: nn.Module, b: nn.Module, tol: float) -> None:
    pa = dict(a.named_parameters(remove_duplicate=False))
    pb = dict(b.named_parameters(remove_duplicate=False))
    assert list(pa) == list(pb)
    for name in pa:
        torch.testing.assert_close(pa[name], pb[name], rtol=tol, atol=tol, msg=name)


TOL = {torch.float64: 1e-12, torch.float32: 1e-6}

# Each scheduler as a function of the optimiser; all of them edit only ``lr``.
SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer], Any]] = {
    "StepLR": lambda opt: sched.StepLR(opt, step_size=2, gamma=0.5),
    "CosineAnnealingLR": lambda opt: sched.CosineAnnealingLR(opt, T_max=5, eta_min=1e-4),
    "LambdaLR": lambda opt: sched.LambdaLR(opt, lambda epoch: 1.0 / (1 + epoch)),
    "OneCycleLR": lambda opt: sched.OneCycleLR(
        opt, max_lr=0.05, total_steps=8, cycle_momentum=False
    ),
    "CyclicLR": lambda opt: sched.CyclicLR(
        opt, base_lr=0.002, max_lr=0.05, step_size_up=3, cycle_momentum=False
    ),
    "PolynomialLR": lambda opt: sched.PolynomialLR(opt, total_iters=6, power=2.0),
    "LinearLR+SequentialLR": lambda opt: sched.SequentialLR(
        opt,
        [
            sched.LinearLR(opt, start_factor=0.25, total_iters=3),
            sched.ExponentialLR(opt, gamma=0.8),
        ],
        milestones=[3],
    ),
}

# (optstate rule, the same in torch.optim)
PAIRS: dict[str, tuple[Callable[[], ost.Rule], Callable[[Any], torch.optim.Optimizer]]] = {
    "Adam": (lambda: ost.Adam(0.02), lambda p: torch.optim.Adam(p, lr=0.02)),
    "AdamW": (
        lambda: ost.AdamW(0.02, weight_decay=0.1),
        lambda p: torch.optim.AdamW(p, lr=0.02, weight_decay=0.1),
    ),
    "SGD": (
        lambda: ost.Momentum(0.05, momentum=0.9),
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    ),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("pair", list(PAIRS))
@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_schedulers_match_torch_optim(scheduler: str, pair: str, dtype: torch.dtype) -> None:
    ours, theirs = make_model(dtype), make_model(dtype)
    rule, reference = PAIRS[pair]
    opt, ref = Optimizer(ours, rule()), reference(theirs.parameters())
    s_opt, s_ref = SCHEDULERS[scheduler](opt), SCHEDULERS[scheduler](ref)
    for i in range(8):
        train_step(ours, opt, i)
        train_step(theirs, ref, i)
        used = ost.hyperparams(opt.ost_state)["emb.weight"]["lr"]  # the lr of this step
        assert used == ref.param_groups[0]["lr"]
        s_opt.step()
        s_ref.step()
        assert opt.param_groups[0]["lr"] == ref.param_groups[0]["lr"]
        assert_same_weights(ours, theirs, TOL[dtype])
    assert ours.head.weight is ours.emb.weight


def test_one_cycle_with_momentum_cycles_betas() -> None:
    """OneCycleLR's default ``cycle_momentum`` writes ``betas`` too: a second hyper-parameter
    through the groups."""
    ours, theirs = make_model(), make_model()
    opt, ref = Optimizer(ours, ost.Adam(0.01)), torch.optim.Adam(theirs.parameters(), lr=0.01)
    s_opt = sched.OneCycleLR(opt, max_lr=0.05, total_steps=6)
    s_ref = sched.OneCycleLR(ref, max_lr=0.05, total_steps=6)
    for i in range(6):
        train_step(ours, opt, i)
        train_step(theirs, ref, i)
        s_opt.step()
        s_ref.step()
    assert opt.param_groups[0]["betas"] == ref.param_groups[0]["betas"]
    assert_same_weights(ours, theirs, 1e-12)


def test_closure_and_written_hyper_parameters() -> None:
    """``step(closure)`` as torch: the closure runs with gradients enabled and its loss comes back;
    values written into a group by hand are used at the next step."""
    ours, theirs = make_model(), make_model()
    opt = Optimizer(ours, ost.AdamW(0.01, weight_decay=0.1))
    ref = torch.optim.AdamW(theirs.parameters(), lr=0.01, weight_decay=0.1)
    for i in range(4):
        x, y = batch(i)
        for model, o in ((ours, opt), (theirs, ref)):

            def closure(
                model: nn.Module = model, o: torch.optim.Optimizer = o, x: Any = x, y: Any = y
            ) -> torch.Tensor:
                o.zero_grad()
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                return loss

            with torch.no_grad():
                loss = o.step(closure)
            assert loss.requires_grad  # computed under enable_grad
            if i == 1:
                o.param_groups[0].update(lr=0.03, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.0)
        assert_same_weights(ours, theirs, 1e-12)
    assert ost.hyperparams(opt.ost_state)["mix.weight"] == {
        "lr": 0.03,
        "betas": (0.8, 0.99),
        "eps": 1e-6,
        "weight_decay": 0.0,
    }


def test_per_path_rules_are_param_groups() -> None:
    """A rule per path: one param group per distinct rule, in the order torch.optim's groups take
    them; a scheduler scales each group's own lr."""
    ours, theirs = make_model(), make_model()

    def rule(path: tuple[str, ...]) -> ost.Rule:
        return ost.Adam(0.02) if path[0].startswith("mix.") else ost.Adam(0.005, betas=(0.8, 0.9))

    opt = Optimizer(ours, rule)
    assert [g["param_names"] for g in opt.param_groups] == [
        ["emb.weight"],
        ["mix.bias", "mix.weight"],  # in the order of the tree: names sorted
    ]
    ref = torch.optim.Adam(
        [
            {"params": [theirs.emb.weight], "lr": 0.005, "betas": (0.8, 0.9)},
            {"params": [theirs.mix.weight, theirs.mix.bias], "lr": 0.02},
        ]
    )
    s_opt, s_ref = sched.StepLR(opt, 1, gamma=0.7), sched.StepLR(ref, 1, gamma=0.7)
    for i in range(5):
        train_step(ours, opt, i)
        train_step(theirs, ref, i)
        s_opt.step()
        s_ref.step()
        assert_same_weights(ours, theirs, 1e-12)
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in ref.param_groups]


def test_two_rules_and_a_lr_for_one_group() -> None:
    """Two rule structures (SGD and Adam) are two groups; an lr written to one changes only it."""
    ours, theirs = make_model(), make_model()
    opt = Optimizer(
        ours, lambda path: ost.Descent(0.1) if path[0] == "mix.bias" else ost.Adam(0.01)
    )
    ref_adam = torch.optim.Adam([theirs.emb.weight, theirs.mix.weight], lr=0.01)
    ref_sgd = torch.optim.SGD([theirs.mix.bias], lr=0.1)
    assert [g["param_names"] for g in opt.param_groups] == [
        ["emb.weight", "mix.weight"],
        ["mix.bias"],
    ]
    for i in range(4):
        x, y = batch(i)
        for o in (opt, ref_adam, ref_sgd):
            o.zero_grad()
        nn.functional.cross_entropy(ours(x), y).backward()
        nn.functional.cross_entropy(theirs(x), y).backward()
        opt.step()
        ref_adam.step()
        ref_sgd.step()
        if i == 1:
            opt.param_groups[1]["lr"] = ref_sgd.param_groups[0]["lr"] = 0.02
        assert_same_weights(ours, theirs, 1e-12)


def test_transposed_tie_in_a_tree() -> None:
    """A tree of tensors with a view: ``{"embed": W, "unembed": W.t()}`` is one parameter; the
    view sees each step. torch.optim.Adam on ``[W]`` is the reference."""
    torch.manual_seed(1)
    W = torch.randn(11, 6, dtype=torch.float64, requires_grad=True)
    V = W.detach().clone().requires_grad_(True)
    tree = {"embed": W, "unembed": W.t()}
    opt, ref = Optimizer(tree, ost.Adam(0.02)), torch.optim.Adam([V], lr=0.02)
    assert opt.param_groups[0]["params"] == [W]
    s_opt, s_ref = sched.CosineAnnealingLR(opt, 4), sched.CosineAnnealingLR(ref, 4)
    for i in range(4):
        x, y = batch(i)
        for t, o in ((tree, opt), (ref.param_groups[0]["params"][0], ref)):
            o.zero_grad()
            emb, unemb = (t["embed"], t["unembed"]) if isinstance(t, dict) else (t, t.t())
            nn.functional.cross_entropy(torch.tanh(emb[x]) @ unemb, y).backward()
            o.step()
        s_opt.step()
        s_ref.step()
        torch.testing.assert_close(W, V, rtol=1e-12, atol=1e-12)
    assert torch.equal(tree["unembed"], W.t())
    assert tree["embed"] is W


@pytest.mark.parametrize(
    "pair",
    [
        ("Lion", ost.Lion(0.01, weight_decay=0.1), optax.lion(0.01, weight_decay=0.1)),
        ("Lamb", ost.Lamb(0.02, weight_decay=0.01), optax.lamb(0.02, weight_decay=0.01)),
    ],
    ids=lambda p: p[0],
)
def test_rules_torch_lacks_match_optax(pair: tuple[str, ost.Rule, Any]) -> None:
    """Lion and Lamb through the Optimizer against optax on the same tied model (the tie as a
    shared JAX array, its gradient summed by ``jax.grad``)."""
    # optax is not strict-promotion clean
    with jax.enable_x64(True), jax.numpy_dtype_promotion("standard"):
        _against_optax(*pair[1:])


def _against_optax(rule: ost.Rule, transform: Any) -> None:
    model = make_model()
    opt = Optimizer(model, rule)
    params = {k: jnp.asarray(v.detach().numpy()) for k, v in model.state_dict().items()}
    params.pop("head.weight")
    opt_state = transform.init(params)

    def loss(p: dict[str, Any], x: Any, y: Any) -> Any:
        h = jnp.tanh(p["emb.weight"][x] @ p["mix.weight"].T + p["mix.bias"][None, :])
        logits = h @ p["emb.weight"].T
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    for i in range(5):
        train_step(model, opt, i)
        x, y = (jnp.asarray(t.numpy()) for t in batch(i))
        grads = jax.grad(loss)(params, x, y)
        updates, opt_state = transform.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        for name, value in params.items():
            np.testing.assert_allclose(
                model.get_parameter(name).detach().numpy(), np.asarray(value), rtol=1e-9, atol=1e-12
            )


def run(model: nn.Module, opt: Optimizer, s: Any, steps: range) -> None:
    for i in steps:
        train_step(model, opt, i)
        s.step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_state_dict_round_trip_resumes_bitwise(dtype: torch.dtype) -> None:
    """Save after 3 steps with ``torch.save``, read back with ``weights_only=True`` into a new
    Optimizer and scheduler on a fresh model: the next 4 steps equal the uninterrupted run
    bitwise. The rule mixes an optstate schedule (Adam's ``lr`` in a chain) and a torch scheduler
    on the other group."""

    def rule(path: tuple[str, ...]) -> ost.Rule:
        if path[0].startswith("mix."):
            return ost.AdamW(0.01, weight_decay=0.1)
        lr = ost.schedules.linear(0.02, 0.001, 6)
        return ost.OptimiserChain(ost.ClipGlobalNorm(1.0), ost.Adam(lr))

    whole = make_model(dtype)
    opt = Optimizer(whole, rule)
    s = sched.StepLR(opt, 2, gamma=0.5)
    run(whole, opt, s, range(3))
    buffer = io.BytesIO()
    torch.save(
        {"model": whole.state_dict(), "opt": opt.state_dict(), "sched": s.state_dict()}, buffer
    )
    run(whole, opt, s, range(3, 7))

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = make_model(dtype, seed=5)
    resumed.load_state_dict(saved["model"])
    opt2 = Optimizer(resumed, rule)
    opt2.load_state_dict(saved["opt"])
    s2 = sched.StepLR(opt2, 2, gamma=0.5)
    s2.load_state_dict(saved["sched"])
    run(resumed, opt2, s2, range(3, 7))
    for (name, a), (_, b) in zip(whole.named_parameters(), resumed.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    assert resumed.head.weight is resumed.emb.weight
    assert ost.hyperparams(opt2.ost_state) == ost.hyperparams(opt.ost_state)
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]


# Two warnings of torch's own internals, which plain Python hides: its import of torch.utils.mkldnn
# under torch.compile, and Dynamo probing the loss's .grad when it resumes after the graph break.
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning")
def test_compiled_training_step_equals_eager() -> None:
    """A training step under ``torch.compile`` with ``opt.step()`` inside: forward and backward
    are compiled, the step runs eagerly (a graph break), and the weights equal the eager run's to
    float32 rounding. With ``fullgraph=True`` the step is refused with optstate's reason."""

    def step(model: nn.Module, opt: torch.optim.Optimizer, x: Any, y: Any) -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss.detach()

    eager, compiled = make_model(torch.float32), make_model(torch.float32)
    opt_e, opt_c = Optimizer(eager, ost.AdamW(0.01)), Optimizer(compiled, ost.AdamW(0.01))
    compiled_step = torch.compile(step)
    for i in range(2):
        step(eager, opt_e, *batch(i))
        compiled_step(compiled, opt_c, *batch(i))
        assert_same_weights(eager, compiled, 1e-6)
    assert compiled.head.weight is compiled.emb.weight

    with pytest.raises(Exception, match=r"runs eagerly, outside torch\.compile"):
        torch.compile(lambda: opt_c.step(), fullgraph=True)()
    assert_same_weights(eager, compiled, 1e-6)  # nothing stepped


# -- bad input: a clear error, nothing changed ------------------------------------------------


def snapshot(model: nn.Module, opt: Optimizer) -> tuple[dict[str, torch.Tensor], Any, Any]:
    weights = {k: v.detach().clone() for k, v in model.named_parameters()}
    tensors = [x.clone() for x in jax.tree_util.tree_leaves(opt.ost_state)]
    return weights, tensors, ost.hyperparams(opt.ost_state)


def assert_unchanged(model: nn.Module, opt: Optimizer, before: Any) -> None:
    weights, tensors, hyper = snapshot(model, opt)
    assert weights.keys() == before[0].keys()
    assert all(torch.equal(weights[k], before[0][k]) for k in weights)
    assert len(tensors) == len(before[1])
    assert all(torch.equal(a, b) for a, b in zip(tensors, before[1], strict=True))
    assert hyper == before[2]


def trained(rule: ost.Rule, model: nn.Module | None = None) -> tuple[nn.Module, Optimizer]:
    model = make_model() if model is None else model
    opt = Optimizer(model, rule)
    train_step(model, opt, 0)
    return model, opt


def test_scheduler_writing_a_negative_lr_is_refused() -> None:
    model, opt = trained(ost.Adam(0.01))
    s = sched.LambdaLR(opt, lambda epoch: 1.0 if epoch < 1 else -0.5)
    train_step(model, opt, 1)
    s.step()  # lr = -0.005
    x, y = batch(2)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match=r"param_groups\[0\] .*lr=-0\.005.*\[0, inf\)"):
        opt.step()
    assert_unchanged(model, opt, before)
    opt.param_groups[0]["lr"] = "fast"
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['lr'\] must be a real number"):
        opt.step()
    assert_unchanged(model, opt, before)
    opt.param_groups[0]["lr"] = 0.001  # a valid value steps again
    opt.step()
    assert ost.hyperparams(opt.ost_state)["mix.weight"]["lr"] == 0.001


def test_add_param_group_is_refused() -> None:
    model, opt = trained(ost.Adam(0.01))
    groups = [dict(g) for g in opt.param_groups]
    extra = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="cannot take a param group after it is made"):
        opt.add_param_group({"params": [extra], "lr": 0.1})
    assert opt.param_groups == groups
    opt.param_groups.append({"params": [extra], "lr": 0.1})  # by hand: refused at the step
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match="param_groups has 2 groups, the optimizer made 1"):
        opt.step()
    assert_unchanged(model, opt, before)


def test_state_dict_of_another_model_or_rule_is_refused() -> None:
    model, opt = trained(ost.Adam(0.01))
    before = snapshot(model, opt)
    groups = [dict(g) for g in opt.param_groups]
    _, lion = trained(ost.Lion(0.01))
    with pytest.raises(ost.CheckpointMismatchError, match=r"rules \['Lion.*has \['Adam"):
        opt.load_state_dict(lion.state_dict())

    class Wider(TiedLM):
        def __init__(self) -> None:
            super().__init__(width=7)

    torch.manual_seed(0)
    _, wider = trained(ost.Adam(0.01), Wider().double())
    with pytest.raises(
        ost.CheckpointMismatchError,
        match=r"shape \(11, 7\) at state_dict\['state'\]\[0\] \(model\['emb\.weight'\]\)"
        r"\['mu'\], expected torch\.float64 of shape \(11, 6\)",
    ):
        opt.load_state_dict(wider.state_dict())
    other = nn.ModuleDict({"emb": nn.Embedding(11, 6), "out": nn.Linear(6, 11)}).double()
    _, other_opt = trained_other(other)
    with pytest.raises(
        ost.CheckpointMismatchError,
        match=r"another model: it has model\['out\.bias'\] where this model has model\['head",
    ):
        opt.load_state_dict(other_opt.state_dict())
    ref = torch.optim.Adam(model.parameters())
    with pytest.raises(ost.CheckpointMismatchError, match=r"not one of optstate\.interop\.torch"):
        opt.load_state_dict(ref.state_dict())
    _, split = trained(lambda path: ost.Adam(0.1 if path[0].startswith("mix.") else 0.01))
    with pytest.raises(ost.CheckpointMismatchError, match=r"has 2 param groups, this .* has 1"):
        opt.load_state_dict(split.state_dict())
    bad = opt.state_dict()
    del bad["state"][1]["nu"]
    with pytest.raises(ost.CheckpointMismatchError, match=r"holds \['count', 'mu'\] at state"):
        opt.load_state_dict(bad)
    bad = opt.state_dict()
    bad["param_groups"][0]["lr"] = -1.0
    with pytest.raises(ValueError, match=r"state_dict\['param_groups'\]\[0\].*lr=-1\.0"):
        opt.load_state_dict(bad)
    assert_unchanged(model, opt, before)
    assert opt.param_groups == groups


def trained_other(model: nn.Module) -> tuple[nn.Module, Optimizer]:
    opt = Optimizer(model, ost.Adam(0.01))
    model.zero_grad()
    x, _ = batch(0)
    model["out"](model["emb"](x)).sum().backward()
    opt.step()
    return model, opt


def test_model_without_names_is_refused() -> None:
    model = make_model()
    with pytest.raises(TypeError, match=r"pass the module itself rather than model.parameters"):
        Optimizer(model.parameters(), ost.Adam())
    with pytest.raises(TypeError, match="holds no tensor"):
        Optimizer({"a": 1.0}, ost.Adam())


# -- several processes -------------------------------------------------------------------------


def test_ddp_two_processes(tmp_path: Path) -> None:
    """Two processes on localhost (gloo) under DistributedDataParallel, each on half of every
    batch: both ranks end with the same weights, equal to torch.optim.AdamW on the whole batch in
    one process (DDP averages the two halves' mean gradients: the whole batch's mean)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    if Path("/sys/class/net/lo").exists():  # gloo on the loopback device, no hostname lookup
        env["GLOO_SOCKET_IFNAME"] = "lo"
    logs = [open(tmp_path / f"rank{rank}.log", "w+") for rank in range(2)]  # noqa: SIM115
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "tests" / "torch_ddp_worker.py"),
                str(rank),
                str(port),
                str(tmp_path / f"rank{rank}.pt"),
            ],
            cwd=ROOT,
            env=env,
            stdout=logs[rank],
            stderr=subprocess.STDOUT,
        )
        for rank in range(2)
    ]
    deadline = time.monotonic() + 120
    try:  # a rank that fails leaves the other waiting for it: end both
        while any(w.poll() is None for w in workers) and time.monotonic() < deadline:
            if any(w.poll() not in (None, 0) for w in workers):
                break
            time.sleep(0.1)
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
            w.wait()
        for log in logs:
            log.close()
    for rank, w in enumerate(workers):
        assert w.returncode == 0, (tmp_path / f"rank{rank}.log").read_text()[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    reference = make_model()
    opt = torch.optim.AdamW(reference.parameters(), lr=0.02, weight_decay=0.1)
    schedule = ddp_scheduler(opt)
    for i in range(DDP_STEPS):
        train_step(reference, opt, i)
        schedule.step()
    expected = dict(reference.named_parameters(remove_duplicate=False))
    assert list(ranks[0]) == [f"module.{name}" for name in expected] or list(ranks[0]) == list(
        expected
    )
    for name, value in expected.items():
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        torch.testing.assert_close(ranks[0][name], value, rtol=1e-12, atol=1e-12, msg=name)


def test_fsdp2_dtensors_are_refused_clearly() -> None:
    """FSDP2's ``fully_shard`` turns the Parameters into DTensors (one process group of one
    process here, in a child so that this process keeps no process group): the Optimizer and
    ``setup`` refuse them with optstate's error, naming the parameter."""
    code = (
        "import os, torch, torch.distributed as dist\n"
        "from torch.distributed.fsdp import fully_shard\n"
        "import optstate as ost\n"
        "from optstate.interop.torch import Optimizer\n"
        "from torch_optimizer_cases import make_model\n"
        "os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=os.environ['PORT'])\n"
        "dist.init_process_group('gloo', rank=0, world_size=1)\n"
        "model = make_model()\n"
        "fully_shard(model)\n"
        "makers = (lambda: Optimizer(model, ost.Adam()), lambda: ost.setup(ost.Adam(), model))\n"
        "for make in makers:\n"
        "    try:\n"
        "        make()\n"
        "    except TypeError as err:\n"
        "        print(err)\n"
        "dist.destroy_process_group()\n"
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
        "PORT": str(port),
    }
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2
    for line in lines:
        assert line.startswith("model['emb.weight'] is a DTensor (placements (Shard(dim=0),))")
        assert "DistributedDataParallel" in line


@pytest.mark.parametrize("name", list(RULES))
def test_every_rule_resumes_bitwise_through_state_dict(name: str) -> None:
    """Every rule of the shared list through the Optimizer on the tied float32 model: a run
    checkpointed after 2 steps (``torch.save``, ``weights_only=True``) and resumed in a fresh
    model and Optimizer equals the uninterrupted run bitwise, and the tie is kept."""
    rule = RULES[name][0]
    whole = make_model(torch.float32)
    opt = Optimizer(whole, rule)
    for i in range(2):
        train_step(whole, opt, i)
    buffer = io.BytesIO()
    torch.save({"model": whole.state_dict(), "opt": opt.state_dict()}, buffer)
    for i in range(2, 4):
        train_step(whole, opt, i)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = make_model(torch.float32, seed=9)
    resumed.load_state_dict(saved["model"])
    opt2 = Optimizer(resumed, rule)
    opt2.load_state_dict(saved["opt"])
    for i in range(2, 4):
        train_step(resumed, opt2, i)
    for (key, a), (_, b) in zip(whole.named_parameters(), resumed.named_parameters(), strict=True):
        assert torch.equal(a, b), key
    assert resumed.head.weight is resumed.emb.weight


def test_a_computed_tensor_is_refused() -> None:
    W = torch.randn(3, 2, requires_grad=True)
    with pytest.raises(ValueError, match=r"model\['w'\] is not a leaf tensor"):
        Optimizer({"w": W * 2.0}, ost.Adam())


def test_an_optstate_schedule_shows_in_its_group_until_overwritten() -> None:
    """``lr`` as an optstate schedule (linear from 0.1 to 0 over 4 steps): the group shows the
    value of the next step, 0.1 * (1 - t / 4); a value written over it replaces the schedule."""
    model = make_model()
    opt = Optimizer(model, ost.Adam(ost.schedules.linear(0.1, 0.0, 4)))
    assert opt.param_groups[0]["lr"] == 0.1
    for t in (1, 2):
        train_step(model, opt, t)
        assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * (1 - t / 4), rel=1e-15)
    opt.param_groups[0]["lr"] = 0.3
    for t in (3, 4):
        train_step(model, opt, t)
        assert opt.param_groups[0]["lr"] == 0.3
        assert ost.hyperparams(opt.ost_state)["mix.bias"]["lr"] == 0.3


def test_state_dict_hooks_run_as_in_torch_optim() -> None:
    _, opt = trained(ost.Adam(0.01))
    calls: list[str] = []
    opt.register_state_dict_pre_hook(lambda o: calls.append("pre"))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "extra": 1})
    opt.register_load_state_dict_pre_hook(
        lambda o, sd: {k: v for k, v in sd.items() if k != "extra"}
    )
    opt.register_load_state_dict_post_hook(lambda o: calls.append("loaded"))
    saved = opt.state_dict()
    assert saved["extra"] == 1
    opt.load_state_dict(saved)
    assert calls == ["pre", "loaded"]
