"""The custom rule that docs/rules.md ("Writing a rule") shows, taken from the page itself: it
works on NumPy, JAX (under jit) and torch, on a tied weight, and equals ``torch.optim.SGD`` with
momentum (heavy ball: ``v <- beta v + g; p <- p - lr v``) on the de-duplicated weight."""

import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import optstate as ost

PAGE = Path(__file__).resolve().parents[1] / "docs" / "rules.md"
LR, BETA, STEPS = 0.1, 0.8, 4


def heavy_ball() -> type:
    blocks = re.findall(r"^```python\n(.*?)^```", PAGE.read_text(), re.MULTILINE | re.DOTALL)
    (block,) = [b for b in blocks if "class HeavyBall" in b]
    namespace: dict[str, Any] = {"np": np, "ost": ost, "__name__": "docs_rules"}
    exec(compile(block, "rules.md[HeavyBall]", "exec"), namespace)
    return namespace["HeavyBall"]


def grads(step: int) -> tuple[np.ndarray, np.ndarray]:
    """Partial gradients at the two positions of the tied weight (the second transposed)."""
    rng = np.random.default_rng(step)
    return rng.normal(size=(2, 3)), rng.normal(size=(3, 2))


def reference() -> np.ndarray:
    w = torch.nn.Parameter(torch.tensor(np.arange(6.0).reshape(2, 3)))
    opt = torch.optim.SGD([w], lr=LR, momentum=BETA)
    for step in range(STEPS):
        g1, g2 = grads(step)
        w.grad = torch.tensor(g1 + g2.T)
        opt.step()
    return w.detach().numpy()


@pytest.mark.parametrize("backend", ["numpy", "jax-jit", "torch"])
def test_the_documented_custom_rule_runs_everywhere_on_a_tie(backend: str) -> None:
    rule = heavy_ball()(LR, BETA)
    w0 = np.arange(6.0).reshape(2, 3)
    if backend == "numpy":
        model: Any = {"a": w0, "b": w0.T}
        to = np.asarray
    elif backend == "torch":
        t = torch.tensor(w0)
        model, to = {"a": t, "b": t.t()}, torch.tensor
    else:
        with jax.enable_x64(True):
            w = jnp.asarray(w0)
        model, to = {"a": w, "b": ost.Transpose(w)}, jnp.asarray
    with jax.enable_x64(backend == "jax-jit"):
        state = ost.setup(rule, model)
        assert state.plan.n_ties == 1
        step = ost.jit(ost.update) if backend == "jax-jit" else ost.update
        for i in range(STEPS):
            g1, g2 = grads(i)
            gb = ost.Transpose(to(g2.T)) if backend == "jax-jit" else to(g2)
            state, model = step(state, model, {"a": to(g1), "b": gb})
        got = np.asarray(model["a"])
    np.testing.assert_allclose(got, reference(), rtol=1e-12, atol=1e-12)
