"""Samplers on a Gaussian toy problem with a known exact flow, and a peer check of Euler/midpoint against Meta's
`flow_matching` ODESolver.

Data X_1 ~ N(μ, s²) per coordinate, noise X_0 ~ N(0, 1), X_t = α·X_1 + σ·X_0. Then X_t ~ N(α·μ, m²) with
m² = α²s² + σ², and the exact denoisers are linear in X_t:

    E[X_1 | X_t] = μ + (α·s² / m²)·(X_t − α·μ),     E[X_0 | X_t] = (σ / m²)·(X_t − α·μ)

The probability-flow ODE dX/dt = α'·E[X_1|X] + σ'·E[X_0|X] is solved by X_b − α_b·μ = (m_b / m_a)·(X_a − α_a·μ)
(differentiate: d/dt m = (α α' s² + σ σ')/m, which is the velocity's coefficient times m).

* Point mass (s = 0): X̂_1 = μ is constant along a trajectory, so DDIM, X_b = α_b·μ + σ_b·X̂_0 with
  X̂_0 = (X_a − α_a μ)/σ_a, is the exact solution at ANY step count (one step included), and on the flow-matching
  path the velocity μ + σ'·X̂_0 is constant along straight lines, so Euler is exact too.
* Gaussian (s > 0): one DDIM step multiplies X − α·μ by (α_b α_a s² + σ_b σ_a)/m_a², which by Cauchy-Schwarz is
  ≤ m_b/m_a with equality only at equal SNR: DDIM is NOT exact, it converges to the exact map at first order.
"""

from __future__ import annotations

import math

import pytest
import torch

from lightning_modules.generative import paths, solvers, timesteps


def exact_model(path: paths.AffinePath, mu: torch.Tensor, s: float, prediction: str):
    """The exact model output for data N(mu, s²) (hand formulas, not path.from_data_noise)."""

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, sg, da, dsg = path.expanded(t, x)
        var = a * a * s * s + sg * sg
        dev = x - a * mu
        data, noise = mu + a * s * s / var * dev, sg / var * dev
        outputs = {"data": data, "epsilon": noise, "velocity": da * data + dsg * noise, "v": a * noise - sg * data}
        return outputs[prediction]

    return model_fn


def exact_flow(path: paths.AffinePath, mu: torch.Tensor, s: float, x_a: torch.Tensor, t_a: float, t_b: float):
    """X_b = α_b μ + (m_b / m_a)(X_a − α_a μ): the ODE solution from t_a to t_b."""
    (a_a, s_a), (a_b, s_b) = ((path.alpha(t).item(), path.sigma(t).item()) for t in (t_a, t_b))
    m_a, m_b = math.sqrt(a_a**2 * s * s + s_a**2), math.sqrt(a_b**2 * s * s + s_b**2)
    return a_b * mu + (m_b / m_a) * (x_a - a_a * mu)


def _data(seed: int = 0, batch: int = 4, dim: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(1, dim, generator=g, dtype=torch.float64) * 2
    z = torch.randn(batch, dim, generator=g, dtype=torch.float64)
    return mu, z


VP_PATHS = {
    "sd": lambda: paths.VPPath(),
    "cosine": lambda: paths.VPPath("cosine"),
    "sd_ztsnr": lambda: paths.VPPath(zero_terminal_snr=True),
    "linear_50": lambda: paths.VPPath("linear", 50, beta_start=1e-4, beta_end=0.02),
}


# -- DDIM -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(VP_PATHS))
@pytest.mark.parametrize("spacing,steps", [("trailing", 10), ("leading", 10), ("linspace", 7), ("trailing", 1)])
def test_ddim_is_exact_for_point_mass_data_at_every_step(case: str, spacing: str, steps: int) -> None:
    path = VP_PATHS[case]()
    mu, z = _data(1)
    grid = timesteps.schedule(spacing, steps, train_steps=path.num_train_steps, steps_offset=0)
    t0 = grid[0].item()
    for prediction in ("epsilon", "data", "v", "velocity"):
        if prediction == "epsilon" and path.alpha(t0).item() == 0.0:
            continue  # ε cannot give the data where α = 0 (zero terminal SNR); the v model is the one to use there
        states: list[torch.Tensor] = []
        out = solvers.ddim(exact_model(path, mu, 0.0, prediction), z, grid, path, prediction,
                           callback=lambda i, x, x1_hat, states=states: states.append(x))
        assert len(states) == steps
        for i, x in enumerate(states):
            expected = exact_flow(path, mu, 0.0, z, t0, grid[i + 1].item())
            assert torch.allclose(x, expected, rtol=0, atol=1e-9), (prediction, i)
        assert torch.allclose(out, mu.expand_as(z), rtol=0, atol=1e-9), prediction  # t = 1 is clean: on the data


def test_one_ddim_step_on_gaussian_data_contracts_by_the_hand_factor() -> None:
    path, s = paths.VPPath(zero_terminal_snr=True), 0.5
    mu, z = _data(2)
    t_a, t_b = 0.3, 0.7
    out = solvers.ddim(exact_model(path, mu, s, "v"), z, torch.tensor([t_a, t_b], dtype=torch.float64), path, "v")
    (a_a, s_a), (a_b, s_b) = ((path.alpha(t).item(), path.sigma(t).item()) for t in (t_a, t_b))
    m2 = a_a**2 * s * s + s_a**2
    factor = (a_b * a_a * s * s + s_b * s_a) / m2
    assert torch.allclose(out, a_b * mu + factor * (z - a_a * mu), rtol=0, atol=1e-12)
    exact = math.sqrt(a_b**2 * s * s + s_b**2) / math.sqrt(m2)
    assert factor < exact - 1e-3  # strictly less than the exact flow: DDIM is not exact for Gaussian data


def test_ddim_converges_to_the_exact_flow_and_the_right_distribution() -> None:
    """Zero terminal SNR + v-prediction (Lin et al.): X at t = 0 is exactly N(0, 1), so pure noise is the right
    start; the samples follow the exact map per sample with first-order error, and are N(μ, s²)."""
    path, s = paths.VPPath(zero_terminal_snr=True), 0.5
    mu, z = _data(3, batch=8)
    errors = []
    for steps in (25, 50, 100):
        grid = timesteps.schedule("trailing", steps)
        out = solvers.solve("ddim", exact_model(path, mu, s, "v"), z, grid, path, "v")
        errors.append((out - exact_flow(path, mu, s, z, 0.0, 1.0)).abs().max().item())
    assert errors[-1] < 0.05
    for coarse, fine in zip(errors[:-1], errors[1:]):
        assert 1.6 < coarse / fine < 2.5  # first order
    # distribution: many 1-D samples
    g = torch.Generator().manual_seed(4)
    mu1 = torch.tensor([[1.5]], dtype=torch.float64)
    noise = torch.randn(20000, 1, generator=g, dtype=torch.float64)
    samples = solvers.ddim(exact_model(path, mu1, s, "v"), noise, timesteps.schedule("trailing", 200), path, "v")
    assert samples.mean().item() == pytest.approx(1.5, abs=0.02)
    assert samples.std().item() == pytest.approx(s, abs=0.01)


def test_euler_on_vp_through_the_velocity_conversion_converges() -> None:
    """Checks the VP derivatives: Euler on u = φ'·v must approach the exact map (first order)."""
    path, s = paths.VPPath(zero_terminal_snr=True), 0.5
    mu, z = _data(5)
    exact = exact_flow(path, mu, s, z, 0.0, 1.0)
    errors = [(solvers.solve("euler", exact_model(path, mu, s, "v"), z, timesteps.uniform_schedule(n).double(),
                             path, "v") - exact).abs().max().item() for n in (50, 100, 200)]
    assert errors[-1] < 0.005
    for coarse, fine in zip(errors[:-1], errors[1:]):
        assert 1.6 < coarse / fine < 2.5
    # midpoint through ε (from t = 0.005, where α > 0); the VP path has kinks at its knots (every 1/N), so no clean
    # order here, only accuracy
    grid = timesteps.uniform_schedule(200).double()[1:]
    mid = (solvers.solve("midpoint", exact_model(path, mu, s, "epsilon"), z, grid, path, "epsilon")
           - exact_flow(path, mu, s, z, grid[0].item(), 1.0)).abs().max().item()
    assert mid < 1e-3


# -- flow matching --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sigma_min", [1e-5, 0.0, 0.1])
def test_euler_midpoint_ddim_are_exact_for_point_mass_on_the_flow_path(sigma_min: float) -> None:
    path = paths.FlowMatchingPath(sigma_min)
    mu, z = _data(6)
    grids = (torch.tensor([0.05, 0.1, 0.7, 1.0], dtype=torch.float64), timesteps.linear_quadratic_schedule(8, 100).double())
    for grid in grids:
        t0 = grid[0].item()
        expected = exact_flow(path, mu, 0.0, z, t0, 1.0)  # μ + σ_min·(z − t0 μ)/σ_{t0}
        for prediction in ("velocity", "data", "v") + (("epsilon",) if t0 > 0 else ()):
            for name in ("euler", "midpoint", "ddim"):
                out = solvers.solve(name, exact_model(path, mu, 0.0, prediction), z, grid, path, prediction)
                assert torch.allclose(out, expected, rtol=0, atol=1e-9), (name, prediction)


@pytest.mark.parametrize("sigma_min", [1e-5, 0.0])
def test_ddim_equals_euler_on_the_flow_path(sigma_min: float) -> None:
    """α, σ affine in t ⇒ α_b X̂_1 + σ_b X̂_0 = X_a + h·(α' X̂_1 + σ' X̂_0): DDIM and Euler are the same sampler."""
    path = paths.FlowMatchingPath(sigma_min)
    _, z = _data(7)
    model = lambda x, t: torch.tanh(2 * x) * (1 + paths.expand_time(t, x)) - 0.3 * x
    grid = timesteps.linear_quadratic_schedule(10, 200).double()
    ddim = solvers.ddim(model, z, grid, path, "velocity")
    assert torch.allclose(ddim, solvers.euler(model, z, grid), rtol=0, atol=1e-12)


def test_euler_first_and_midpoint_second_order_on_gaussian_data() -> None:
    path, s = paths.FlowMatchingPath(1e-5), 0.5
    mu, z = _data(8)
    exact = exact_flow(path, mu, s, z, 0.0, 1.0)  # X at t = 0 is exactly the noise: α_0 = 0, σ_0 = 1
    model = exact_model(path, mu, s, "velocity")
    err = {name: [(solvers.solve(name, model, z, timesteps.uniform_schedule(n).double()) - exact).abs().max().item()
                  for n in (10, 20, 40)] for name in ("euler", "midpoint")}
    for coarse, fine in zip(err["euler"][:-1], err["euler"][1:]):
        assert 1.6 < coarse / fine < 2.5
    for coarse, fine in zip(err["midpoint"][:-1], err["midpoint"][1:]):
        assert coarse / fine > 3.5  # at least second order (this linear field shows ≈ 8)
    assert err["midpoint"][-1] < err["euler"][-1] / 100


# -- dispatch -------------------------------------------------------------------------------------------------------
def test_solve_dispatch_callbacks_and_errors() -> None:
    _, z = _data(9)
    model = lambda x, t: -x + paths.expand_time(t, x)
    grid = torch.tensor([0.0, 0.4, 1.0], dtype=torch.float64)
    assert torch.equal(solvers.solve("euler", model, z, grid), solvers.euler(model, z, grid))
    assert torch.equal(solvers.solve("midpoint", model, z, grid), solvers.midpoint(model, z, grid))
    assert solvers.solver("midpoint") is solvers.midpoint
    seen: list[tuple[int, torch.Tensor]] = []
    vp = paths.VPPath()
    solvers.solve("ddim", model, z, grid, vp, "v", callback=lambda i, x, x1_hat: seen.append((i, x1_hat)))
    assert [i for i, _ in seen] == [0, 1]
    # callback's third argument is the data estimate at the step's input
    assert torch.allclose(seen[0][1], vp.to_data_noise(model(z, torch.zeros(4, dtype=torch.float64)), z, 0.0, "v")[0])
    with pytest.raises(ValueError, match="unknown solver 'heun'; choose one of euler, midpoint, ddim"):
        solvers.solve("heun", model, z, grid)
    with pytest.raises(ValueError, match="needs a path"):
        solvers.solve("ddim", model, z, grid)
    with pytest.raises(ValueError, match="needs a path"):
        solvers.solve("euler", model, z, grid, prediction="epsilon")
    with pytest.raises(ValueError, match="unknown prediction"):
        solvers.solve("euler", model, z, grid, vp, prediction="x0")
    with pytest.raises(ValueError, match="unknown solver"):
        solvers.solver("ddim")


# -- peer: flow_matching's ODESolver (torchdiffeq) ----------------------------------------------------------------
def test_peer_euler_and_midpoint_against_flow_matching_ode_solver() -> None:
    pytest.importorskip("flow_matching")
    pytest.importorskip("torchdiffeq")  # flow_matching's ODESolver integrates with torchdiffeq.odeint
    from flow_matching.solver import ODESolver

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # nonlinear in x and t; t scalar (theirs) or [B]
        t = torch.as_tensor(t, dtype=x.dtype)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        tt = paths.expand_time(t, x)
        return torch.sin(3 * x) * torch.cos(2 * tt) + x * tt**2 - 0.5

    _, z = _data(10, batch=5, dim=6)
    grids = (timesteps.linear_quadratic_schedule(8, 100).double(), torch.tensor([0.0, 0.1, 0.15, 0.6, 1.0]).double())
    for grid in grids:
        for method, ours in (("euler", solvers.euler), ("midpoint", solvers.midpoint)):
            theirs = ODESolver(velocity_model=lambda x, t: velocity(x, t)).sample(
                x_init=z, step_size=None, method=method, time_grid=grid, return_intermediates=False)
            assert (ours(velocity, z, grid) - theirs).abs().max().item() <= 1e-6, method


@pytest.mark.parametrize("grid", [torch.tensor([0.0]), torch.tensor([[0.0, 1.0]])])
def test_a_grid_that_is_not_s_plus_one_times_is_refused(grid: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="1-D tensor of S \\+ 1 >= 2 times"):
        solvers.solve("euler", lambda x, t: torch.zeros_like(x), torch.zeros(1, 2), grid)
