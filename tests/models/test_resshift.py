"""ResShift schedule maths, DDIM option, seeded sampling and a tiny overfit of the denoiser."""

from __future__ import annotations

import math

import pytest
import torch

from thinslice.diffusion.ddim import DDIMSchedule
from thinslice.diffusion.resshift import ResShiftConfig, ResShiftSchedule
from thinslice.diffusion.sampling import (
    Schedule,
    denoising_mse,
    diffusion_loss,
    make_schedule,
    reverse_process,
)
from thinslice.errors import ThinsliceError
from thinslice.models.control import IRControlNet
from thinslice.models.denoiser import LatentDenoiser
from thinslice.models.unet import LatentUNet3D
from thinslice.presets import load_preset


def reference_sqrt_etas(num_steps: int, min_noise: float, eta_end: float, kappa: float, power: float) -> list[float]:
    """The official ``get_named_eta_schedule('exponential')`` written out with plain floats."""
    start = min(min_noise / kappa, min_noise)
    increaser = math.exp(math.log(eta_end / start) / (num_steps - 1))
    return [start * increaser ** ((i / (num_steps - 1)) ** power * (num_steps - 1)) for i in range(num_steps)]


@pytest.mark.parametrize("cfg", [ResShiftConfig(), ResShiftConfig.fast()])
def test_schedule_matches_official_and_endpoints(cfg: ResShiftConfig) -> None:
    sched = ResShiftSchedule(cfg)
    ref = reference_sqrt_etas(cfg.num_steps, cfg.min_noise, cfg.eta_max_sqrt, cfg.kappa, cfg.power)
    assert sched.sqrt_etas.tolist() == pytest.approx(ref, rel=1e-12)
    assert float(sched.sqrt_etas[0]) == pytest.approx(min(cfg.min_noise / cfg.kappa, cfg.min_noise))
    assert float(sched.sqrt_etas[-1]) == pytest.approx(0.99)
    assert torch.all(sched.etas[1:] > sched.etas[:-1])
    assert torch.allclose(sched.etas, sched.sqrt_etas**2)


def test_paper_defaults_and_fast_preset() -> None:
    default, fast = ResShiftConfig(), ResShiftConfig.fast()
    assert (default.num_steps, default.kappa, default.power, default.min_noise) == (15, 2.0, 0.3, 0.04)
    assert (fast.num_steps, fast.min_noise) == (4, 0.2)
    assert float(ResShiftSchedule(default).sqrt_etas[0]) == pytest.approx(0.02)
    assert float(ResShiftSchedule(fast).sqrt_etas[0]) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        ResShiftConfig(prediction="velocity")


def test_q_sample_statistics() -> None:
    sched = ResShiftSchedule(ResShiftConfig())
    g = torch.Generator().manual_seed(0)
    n = 200_000
    x0, y = torch.full((n, 1), 0.3), torch.full((n, 1), -0.5)
    for step in (0, 7, 14):
        t = torch.full((n,), step)
        xt = sched.q_sample(x0, y, t, torch.randn(n, 1, generator=g))
        eta = float(sched.etas[step])
        assert xt.mean().item() == pytest.approx(0.3 + eta * (-0.8), abs=5 * 2 * math.sqrt(eta / n))
        assert xt.std().item() == pytest.approx(2.0 * math.sqrt(eta), rel=0.01)
    prior = sched.init_latent(y, torch.randn(n, 1, generator=g))
    assert prior.std().item() == pytest.approx(2.0 * 0.99, rel=0.01)


def test_posterior_matches_gaussian_conditioning() -> None:
    """q(x_{t-1} | x_t, x0, y) from the joint built with the Markov transition N(x_{t-1} + alpha_t (y-x0), k^2 a_t)."""
    cfg = ResShiftConfig()
    sched = ResShiftSchedule(cfg)
    k2 = cfg.kappa**2
    x0, y, xt = (torch.tensor([v], dtype=torch.float64) for v in (0.7, -0.4, 1.3))
    for step in range(cfg.num_steps):
        eta_prev = float(sched.etas[step - 1]) if step > 0 else 0.0
        eta = float(sched.etas[step])
        alpha = eta - eta_prev
        m_prev = x0 + eta_prev * (y - x0)  # marginal of x_{t-1}
        var_prev = k2 * eta_prev
        m_t = m_prev + alpha * (y - x0)  # x_t = x_{t-1} + alpha (y - x0) + N(0, k^2 alpha)
        var_t = var_prev + k2 * alpha
        cov = var_prev
        assert var_t == pytest.approx(k2 * eta)  # the Markov chain reproduces the marginal q(x_t | x0, y)
        direct_mean = m_prev + cov / var_t * (xt - m_t)
        direct_var = var_prev - cov**2 / var_t
        mean, var = sched.q_posterior_mean_variance(x0[None], xt[None], torch.tensor([step]))
        assert mean.item() == pytest.approx(direct_mean.item(), abs=1e-10)
        assert var.item() == pytest.approx(direct_var, abs=1e-12)
    assert float(sched.posterior_variance[0]) == 0.0


@pytest.mark.parametrize("prediction", ["x0", "residual", "noise"])
def test_prediction_conversions_are_consistent(prediction: str) -> None:
    sched = ResShiftSchedule(ResShiftConfig(prediction=prediction))
    g = torch.Generator().manual_seed(1)
    x0, y, noise = (torch.randn(5, 2, 3, 4, 4, generator=g) for _ in range(3))
    t = torch.tensor([0, 3, 7, 11, 14])
    xt = sched.q_sample(x0, y, t, noise)
    target = sched.training_target(x0, y, t, noise)
    assert torch.allclose(sched.x0_from_output(target, xt, y, t), x0, atol=1e-5)
    assert denoising_mse(sched, lambda x, tt, yy: target, x0, y, t, noise).item() == pytest.approx(0.0, abs=1e-12)


def oracle(sched: ResShiftSchedule, x0: torch.Tensor):
    """A 'network' that knows x0 and returns what it is supposed to predict, from the *scaled* input."""

    def model_fn(x_scaled: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        eta = sched.etas[t].reshape(-1, 1, 1, 1, 1).float()
        xt = x_scaled * torch.sqrt(eta * sched.kappa**2 + 1)
        if sched.cfg.prediction == "x0":
            return x0
        if sched.cfg.prediction == "residual":
            return y - x0
        return (xt - eta * y - (1 - eta) * x0) / (sched.kappa * torch.sqrt(eta))

    return model_fn


@pytest.mark.parametrize("cfg", [ResShiftConfig(), ResShiftConfig.fast(prediction="noise"),
                                 ResShiftConfig(prediction="residual")])
def test_sampling_with_oracle_recovers_x0(cfg: ResShiftConfig) -> None:
    sched = ResShiftSchedule(cfg)
    g = torch.Generator().manual_seed(2)
    x0, y = torch.randn(2, 4, 4, 8, 8, generator=g), torch.randn(2, 4, 4, 8, 8, generator=g)
    states = reverse_process(sched, oracle(sched, x0), y, g, return_all=True)
    assert len(states) == cfg.num_steps + 1
    assert torch.allclose(states[-1], x0, atol=1e-4)
    assert not torch.allclose(states[-2], x0, atol=1e-2)  # the last step is what lands on x0


def test_resshift_sampling_is_seeded() -> None:
    sched = ResShiftSchedule(ResShiftConfig.fast())
    y = torch.randn(1, 4, 4, 8, 8)

    def model_fn(x, t, yy):
        return 0.5 * x + 0.1 * yy

    a = reverse_process(sched, model_fn, y, torch.Generator().manual_seed(3))
    b = reverse_process(sched, model_fn, y, torch.Generator().manual_seed(3))
    c = reverse_process(sched, model_fn, y, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_ddim_with_oracle_recovers_x0(prediction: str) -> None:
    sched = DDIMSchedule(ResShiftConfig(method="ddim", ddim_prediction=prediction))
    g = torch.Generator().manual_seed(5)
    x0, y = torch.randn(1, 4, 4, 8, 8, generator=g), torch.randn(1, 4, 4, 8, 8, generator=g)
    abar = sched.train_scheduler.alphas_cumprod

    def model_fn(xt, t, yy):
        a = abar[t].reshape(-1, 1, 1, 1, 1).float()
        eps = (xt - a.sqrt() * x0) / (1 - a).sqrt()
        return eps if prediction == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0

    out = reverse_process(sched, model_fn, y, g, steps=10)
    assert torch.allclose(out, x0, atol=1e-4)
    t = torch.tensor([500])
    noise = torch.randn_like(x0)
    xt = sched.q_sample(x0, y, t, noise)
    assert torch.allclose(xt, abar[500].sqrt() * x0 + (1 - abar[500]).sqrt() * noise, atol=1e-6)
    assert denoising_mse(sched, model_fn, x0, y, t, noise).item() == pytest.approx(0.0, abs=1e-8)


def tiny_denoiser(method: str = "resshift", seed: int = 0) -> LatentDenoiser:
    preset = load_preset("tiny")
    torch.manual_seed(seed)
    unet = LatentUNet3D(preset.unet)
    control = IRControlNet.from_unet(unet, preset.control)
    cfg = preset.diffusion if method == "resshift" else ResShiftConfig(method="ddim", ddim_sample_steps=3)
    return LatentDenoiser(unet, control, cfg)


def sample_latent(den: LatentDenoiser, y: torch.Tensor, seed: int, method: str | None = None,
                  steps: int | None = None) -> torch.Tensor:
    """The denoiser as a ``ModelFn`` through the schedule it was trained with, as ldm binds it."""
    return reverse_process(make_schedule(den.cfg, method), lambda x, t, yy: den.guided(x, t, yy, 3.0), y,
                           torch.Generator().manual_seed(seed), steps)


def test_sampling_a_denoiser_is_seeded_and_checks_method() -> None:
    den = tiny_denoiser().eval()
    for p in den.parameters():  # non-trivial outputs (zero-initialised layers would hide differences)
        torch.nn.init.normal_(p, std=0.05)
    y = torch.randn(1, 4, 4, 16, 16)
    a, b, c = sample_latent(den, y, 0), sample_latent(den, y, 0), sample_latent(den, y, 1)
    assert a.shape == y.shape and torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ThinsliceError, match="trained for the 'resshift' sampler"):
        sample_latent(den, y, 0, method="ddim")
    with pytest.raises(ThinsliceError, match="cannot sample with 7"):
        sample_latent(den, y, 0, steps=7)
    ddim = tiny_denoiser("ddim").eval()
    assert torch.equal(sample_latent(ddim, y, 0, steps=3), sample_latent(ddim, y, 0, steps=3))


def test_both_schedules_satisfy_the_protocol_and_an_x0_oracle_gives_x0_back() -> None:
    """The one contract: ResShift and DDIM are both a :class:`Schedule` (no alias methods needed), and the one
    reverse process with a model that returns the true x0 lands exactly on x0 for ResShift."""
    resshift, ddim = make_schedule(ResShiftConfig.fast()), make_schedule(ResShiftConfig(method="ddim"))
    assert isinstance(resshift, Schedule) and isinstance(ddim, Schedule)
    assert isinstance(resshift, ResShiftSchedule) and isinstance(ddim, DDIMSchedule)
    assert not isinstance(object(), Schedule)
    for name in ("add_noise", "prior_sample", "scale_input", "loss"):
        assert not hasattr(resshift, name) and not hasattr(ddim, name)
    g = torch.Generator().manual_seed(11)
    x0, y = torch.randn(1, 2, 4, 8, 8, generator=g), torch.randn(1, 2, 4, 8, 8, generator=g)
    out = reverse_process(resshift, lambda x, t, yy: x0, y, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=0)
    assert not torch.allclose(out, y, atol=0.1)


def test_tiny_denoiser_overfits_a_pair() -> None:
    """30 Adam steps on one (x0, y) pair lower the ResShift loss measured on fixed noise at every timestep."""
    torch.manual_seed(0)
    den = tiny_denoiser()
    sched = ResShiftSchedule(den.cfg)
    g = torch.Generator().manual_seed(7)
    x0 = torch.randn(1, 4, 4, 8, 8, generator=g)
    y = x0 + 0.5 * torch.randn(1, 4, 4, 8, 8, generator=g)
    eval_t = torch.arange(sched.num_steps)
    eval_noise = torch.randn(sched.num_steps, *x0.shape[1:], generator=g)
    xb, yb = x0.expand(sched.num_steps, -1, -1, -1, -1), y.expand(sched.num_steps, -1, -1, -1, -1)

    def model_fn(x, t, yy):
        return den(x, t, yy, 3.0)

    def eval_loss() -> float:
        with torch.no_grad():
            return denoising_mse(sched, model_fn, xb, yb, eval_t, eval_noise).item()

    before = eval_loss()
    opt = torch.optim.Adam(den.parameters(), lr=2e-3)
    for _ in range(30):
        t = sched.sample_timesteps(2, generator=g)
        loss = denoising_mse(sched, model_fn, x0.expand(2, -1, -1, -1, -1), y.expand(2, -1, -1, -1, -1), t,
                             torch.randn(2, *x0.shape[1:], generator=g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert after < 0.5 * before, (before, after)


def test_diffusion_loss_drops_only_the_network_condition() -> None:
    den = tiny_denoiser()
    for p in den.parameters():
        torch.nn.init.normal_(p, std=0.05)
    g = torch.Generator().manual_seed(0)
    x0, y = torch.randn(2, 4, 4, 8, 8, generator=g), torch.randn(2, 4, 4, 8, 8, generator=g)
    seen = []
    den.unet.register_forward_pre_hook(lambda mod, args: seen.append(args[2].clone()))
    sched = ResShiftSchedule(den.cfg)

    def model_fn(x, tt, yy, drop):
        return den(x, tt, yy, 3.0, drop_mask=drop)

    loss = diffusion_loss(sched, model_fn, x0, y, generator=torch.Generator().manual_seed(1), cfg_dropout=1.0)
    loss.backward()
    assert torch.isfinite(loss) and den.null_condition.grad is not None and den.null_condition.grad.abs().sum() > 0
    assert torch.equal(seen[-1], den.null_like(y).detach())  # the network saw the null latent ...
    again = diffusion_loss(sched, model_fn, x0, y, generator=torch.Generator().manual_seed(1), cfg_dropout=1.0)
    assert again.item() == pytest.approx(loss.item())  # ... and the loss is seeded
    # Same draws by hand: the forward process uses the original y, only the network's input is nulled.
    g1 = torch.Generator().manual_seed(1)
    t = sched.sample_timesteps(2, generator=g1)
    torch.rand(2, generator=g1)
    noise = torch.randn(x0.shape, generator=g1)
    mask = torch.ones(2, dtype=torch.bool)
    manual = denoising_mse(sched, lambda x, tt, yy: den(x, tt, yy, 3.0, drop_mask=mask), x0, y, t, noise)
    assert manual.item() == pytest.approx(loss.item(), rel=1e-6)
    ddim = tiny_denoiser("ddim")
    ddim_loss = diffusion_loss(make_schedule(ddim.cfg), lambda x, tt, yy, drop: ddim(x, tt, yy, 3.0, drop_mask=drop),
                               x0, y, cfg_dropout=ddim.cfg.cfg_dropout, generator=g)
    assert torch.isfinite(ddim_loss)
