"""Grading tests for the course's nine exercises (course/README.md). Each test grades one function
on its own, with seeded inputs, closed forms and properties; none compares with a copy of the
solution. A failure names the exercise and, where it can tell, the usual mistake behind it.

    python -m pytest -q course/test_exercises.py          # all nine, a few seconds on a 2-core CPU
    python -m pytest -q course/test_exercises.py -k ex3   # one exercise

On the student copy (python course/make_student_copy.py DIR) every test fails with its exercise's
NotImplementedError until the function is written. test_smoke.py runs these tests too.
"""
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository's scripts
import fid  # noqa: E402
import sample  # noqa: E402
import stage1  # noqa: E402
import stage2  # noqa: E402


def check(ok, exercise, why):
    """Fail with a message that names the exercise and the likely mistake."""
    assert ok, f"Exercise {exercise}: {why}"


def close(a, b, rtol=1e-5, atol=1e-6):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64), rtol=rtol, atol=atol)


def psd_sqrt(s):
    """The symmetric square root of a positive semi-definite matrix, from its eigenvalues."""
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def offdiag_corr(samples):
    """Largest |correlation| between two different columns of samples (N, k): about 1/sqrt(N) for
    independent noise, 1 when two columns share it."""
    c = torch.corrcoef(samples.T.double())
    return (c - torch.diag(torch.diag(c))).abs().max().item()


# ---------------------------------------------------------------------------------------------
# Exercise 1: stage1.gaussian_nll, eq. (8)

def test_ex1_gaussian_nll():
    g = torch.Generator().manual_seed(1)
    x, x_hat = torch.rand(6, 3, 5, 5, generator=g), torch.rand(6, 3, 5, 5, generator=g)  # d = 3 x 5 x 5, not 5 x 5
    loggamma = torch.tensor(-0.8)
    out = stage1.gaussian_nll(x, x_hat, loggamma)
    check(out.shape == (6,), 1, f"one value per example expected, shape (6,), got {tuple(out.shape)} "
          "(a mean or sum over the batch belongs in the loss, not here)")
    # the independent reference: the log-density of a Gaussian with standard deviation exp(loggamma)
    ref = -torch.distributions.Normal(x_hat, loggamma.exp()).log_prob(x).flatten(1).sum(1)
    d = 75
    if not close(out, ref):
        sq = (x - x_hat).square().flatten(1).sum(1)
        norm = d * (loggamma + 0.5 * math.log(2 * math.pi))
        variance = "gamma used as a variance where it is a standard deviation (exp(loggamma) vs exp(2 loggamma))"
        hints = {variance: sq * torch.exp(-loggamma) / 2 + norm,
                 variance + " ": sq * torch.exp(-loggamma) / 2 + d * (loggamma / 2 + 0.5 * math.log(2 * math.pi)),
                 "the constant d/2 log(2 pi) dropped": ref - d * 0.5 * math.log(2 * math.pi),
                 "a mean over pixels where eq. (8) sums them": ref / d,
                 "a mean over pixels in |x - x_hat|^2 where eq. (8) sums them": sq / d * torch.exp(-2 * loggamma) / 2 + norm,
                 "d counted as H x W, without the channels (d = C x H x W: x[0].numel())": ref - 50 * (loggamma + 0.5 * math.log(2 * math.pi)),
                 "d counted over the whole batch (x.numel()) where it is one example's pixels (x[0].numel())":
                     ref + 5 * d * (loggamma + 0.5 * math.log(2 * math.pi)),
                 "loggamma not multiplied by d (the normaliser is d/2 log(2 pi gamma^2) = d loggamma + d/2 log(2 pi))":
                     sq * torch.exp(-2 * loggamma) / 2 + loggamma + d * 0.5 * math.log(2 * math.pi),
                 "the 1/2 in |x - x_hat|^2 / (2 gamma^2) missing": sq * torch.exp(-2 * loggamma) + norm,
                 "twice the value: eq. (8) is -2 log p(x|z) (under an integral), and this function returns -log p, "
                 "half of eq. (8)'s integrand": 2 * ref}
        found = [h for h, v in hints.items() if close(out, v)]
        check(False, 1, f"-log N(x | x_hat, gamma^2 I) is off: {found[0].strip() if found else 'compare with eq. (8)'}")
    # at x = x_hat only the normaliser remains: d (loggamma + log(2 pi) / 2)
    check(close(stage1.gaussian_nll(x, x, loggamma), torch.full((6,), d * (-0.8 + 0.5 * math.log(2 * math.pi)))), 1,
          "with x = x_hat the value must be d * (loggamma + log(2 pi) / 2)")
    # Theorem 3's mechanism: for a fixed decoder the best gamma^2 is the mean squared error per pixel
    best = 0.5 * torch.log((x[0] - x_hat[0]).square().mean())
    lg = best.clone().requires_grad_()
    at_best = stage1.gaussian_nll(x[:1], x_hat[:1], lg)
    check(at_best.requires_grad, 1, "no gradient reaches loggamma: keep it a tensor (no .item() or float()), "
          "or gamma cannot be learned")
    at_best.sum().backward()
    check(abs(lg.grad.item()) < 1e-3, 1,
          "the loss must be stationary in loggamma at gamma^2 = mean squared pixel error (is loggamma used as log of a standard deviation?)")


# ---------------------------------------------------------------------------------------------
# Exercise 2: stage1.kl_standard_normal, the KL term of eq. (2); 2 KL = eq. (9)'s left side

def test_ex2_kl_standard_normal():
    g = torch.Generator().manual_seed(2)
    mu, log_sigma = torch.randn(7, 4, generator=g), 0.7 * torch.randn(7, 4, generator=g)
    out = stage1.kl_standard_normal(mu, log_sigma)
    check(out.shape == (7,), 2, f"one value per example expected, shape (7,), got {tuple(out.shape)}")
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(mu, log_sigma.exp()),
                                            torch.distributions.Normal(0.0, 1.0)).sum(1)
    if not close(out, ref):
        negative = "; a KL divergence is never negative" if bool((out < 0).any()) else ""
        hints = {"the sign flipped": -ref,
                 "log_sigma read as a log-variance": ((mu ** 2 + log_sigma.exp() - log_sigma - 1) / 2).sum(1),
                 "a mean over latent dimensions where the KL sums them": ref / 4,
                 "the factor 1/2 missing": 2 * ref,
                 "the -1 per dimension (the constant -kappa) dropped": ref + 4 / 2,
                 "sigma where sigma^2 belongs": ((mu ** 2 + log_sigma.exp() - 2 * log_sigma - 1) / 2).sum(1)}
        found = [h for h, v in hints.items() if close(out, v)]
        check(False, 2, f"KL[N(mu, sigma^2) || N(0, 1)] is off: {found[0] if found else 'compare with eq. (9)'}{negative}")
    check(close(stage1.kl_standard_normal(torch.zeros(3, 5), torch.zeros(3, 5)), torch.zeros(3)), 2,
          "q(z|x) = N(0, I) is the prior itself: its KL must be 0")
    # eq. (9): 2 KL = trace(Sigma) + |mu|^2 - log|Sigma| - kappa, Sigma = diag(sigma^2)
    sigma2 = torch.exp(2 * log_sigma)
    check(close(2 * out, sigma2.sum(1) + mu.square().sum(1) - sigma2.log().sum(1) - 4), 2, "2 KL must equal eq. (9)'s left side")


# ---------------------------------------------------------------------------------------------
# Exercise 3: stage1.reparameterize

def test_ex3_reparameterize():
    torch.manual_seed(3)
    mu = torch.tensor([[1.0, -2.0, 0.5]]).repeat(20000, 1).requires_grad_()
    sigma = torch.tensor([[0.5, 2.0, 0.1]]).repeat(20000, 1).requires_grad_()
    z = stage1.reparameterize(mu, sigma)
    check(z.shape == mu.shape, 3, f"one draw per row expected, shape {tuple(mu.shape)}, got {tuple(z.shape)}")
    std = z.detach().std(0)
    check(not close(std, 0.0, atol=1e-6) or close(z, mu.detach()), 3, "every row got the same eps (noise of shape "
          "(kappa,)?): each row needs its own draw, eps of mu's shape (torch.randn_like(mu))")
    check(not close(std, 0.0, atol=1e-6), 3, "the draws have no noise: z = mu + sigma * eps, eps ~ N(0, I)")
    check(close(std, [0.5, 2.0, 0.1], rtol=0.03, atol=0), 3,
          f"the draws' standard deviation must be sigma (got {std.tolist()}; sigma^2 or sqrt(sigma) used?)")
    check(close(z.detach().mean(0), [1.0, -2.0, 0.5], atol=0.04, rtol=0), 3, "the draws' mean must be mu")
    check(z.requires_grad, 3, "z carries no gradient: the draw must be mu + sigma * eps, not torch.normal(mu, sigma) "
          "or a detached sample (the reparameterisation trick)")
    z.sum().backward()
    eps = ((z - mu) / sigma).detach()
    check(offdiag_corr(eps) < 0.05, 3, "the noise of different dimensions is correlated: eps ~ N(0, I) needs one "
          "independent value per entry (torch.randn_like(mu)), not one value per row")
    # the right mean and spread are not enough: the noise must be Gaussian. Of 60,000 N(0, 1) draws,
    # 4.55 % lie beyond 2 standard deviations (give or take 0.09 %); unit-variance uniform noise has none
    tail = (eps.abs() > 2).double().mean().item()
    check(abs(tail - 0.0455) < 0.006, 3, f"the noise is not Gaussian ({100 * tail:.2f} % of it beyond 2 standard deviations, "
          "N(0, 1) has 4.55 %): eps ~ N(0, I) is torch.randn_like(mu); rescaled uniform noise, say, has the "
          "right spread but not the shape")
    check(mu.grad is not None and bool(mu.grad.any()), 3, "no gradient reaches mu: torch.normal(mu, sigma) or a "
          "detached draw; write z = mu + sigma * eps (the reparameterisation trick)")
    check(close(mu.grad, torch.ones_like(mu)), 3, "dz/dmu must be 1")
    check(sigma.grad is not None and close(sigma.grad, eps), 3, "dz/dsigma must be the noise eps")
    z2 = stage1.reparameterize(mu, sigma)
    check(not torch.equal(z.detach(), z2.detach()), 3, "two calls gave the same draw: use fresh noise every call")


# ---------------------------------------------------------------------------------------------
# Exercise 4: stage1.stage1_loss, eq. (2) with eq. (8)'s decoder

class StubEncoder(nn.Module):
    """q(z|x) = N(mu, sigma^2) with mu a learnable vector and a fixed sigma, whatever x is."""

    def __init__(self, kappa, sigma):
        super().__init__()
        self.mu = nn.Parameter(torch.linspace(-1, 1, kappa))
        self.sigma = sigma
        self.calls = []

    def forward(self, x):
        self.calls.append({"training": self.training, "x": x.detach().clone()})
        mu = self.mu.expand(len(x), -1)
        sigma = torch.full_like(mu, self.sigma)
        return mu, sigma.log(), sigma


class StubDecoder(nn.Module):
    """x_hat = 0.25 + slope * (z_1 + ... + z_kappa) in every pixel: with slope 0 a fixed image, so the
    loss is known in closed form; with a slope the reconstruction term's gradient reaches mu_z only
    through z. Records the z it was given."""

    def __init__(self, shape, slope=0.0):
        super().__init__()
        self.shape, self.slope, self.seen, self.differentiable = shape, slope, [], []

    def forward(self, z):
        self.seen.append(z.detach().clone())
        self.differentiable.append(z.requires_grad)
        return 0.25 + self.slope * z.sum(1).view(-1, *[1] * len(self.shape)).expand(-1, *self.shape)


def stub_vae(kappa=3, sigma=0.5, shape=(1, 4, 4), loggamma=-0.3, slope=0.0):
    vae = nn.Module()
    vae.encoder, vae.decoder = StubEncoder(kappa, sigma), StubDecoder(shape, slope)
    vae.loggamma_x = nn.Parameter(torch.tensor(loggamma))
    vae.latent_dim = kappa
    return vae


def stub_terms(x, x_hat, mu):
    """The stub model's terms in closed form (stub_vae's defaults, gamma_x = exp(-0.3), sigma 0.5):
    -log p(x|z) per image, and the KL of q(z|x) = N(mu, 0.5^2 I), the same for every image."""
    rec = -torch.distributions.Normal(x_hat, math.exp(-0.3)).log_prob(x).flatten(1).sum(1)
    kl = torch.distributions.kl_divergence(torch.distributions.Normal(mu, 0.5), torch.distributions.Normal(0.0, 1.0)).sum()
    return rec, kl


def test_ex4_stage1_loss(monkeypatch):
    # graded on its own: exercises 1-3, which this loss may call, are replaced by independent versions
    monkeypatch.setattr(stage1, "gaussian_nll", lambda x, x_hat, loggamma: -torch.distributions.Normal(
        x_hat, loggamma.exp()).log_prob(x).flatten(1).sum(1))
    monkeypatch.setattr(stage1, "kl_standard_normal", lambda mu, log_sigma: torch.distributions.kl_divergence(
        torch.distributions.Normal(mu, log_sigma.exp()), torch.distributions.Normal(0.0, 1.0)).sum(1))
    monkeypatch.setattr(stage1, "reparameterize", lambda mu, sigma: mu + sigma * torch.randn_like(mu))
    torch.manual_seed(4)
    x = torch.rand(8, 1, 4, 4, generator=torch.Generator().manual_seed(4))
    vae = stub_vae()
    out = stage1.stage1_loss(vae, x, "learned-gamma")
    check(isinstance(out, tuple) and len(out) == 3, 4, "return (loss, rec, kl)")
    loss, rec, kl = out
    check(loss.dim() == 0 and rec.dim() == 0 and kl.dim() == 0, 4, "loss, rec and kl must be scalars (means over the batch)")
    # independent closed forms, per image, then the batch mean
    rec_i, kl_i = stub_terms(x, 0.25, vae.encoder.mu.detach())
    check(not close(rec, rec_i.sum()), 4, "rec is summed over the batch: eq. (2) averages over the data (mean over the batch)")
    check(close(rec, rec_i.mean()), 4, "rec must be the batch mean of -log p(x|z), summed over pixels (eq. 8)")
    check(not close(kl, kl_i * 8), 4, "kl is summed over the batch: average it")
    kl_of_sigma_as_log = stage1.kl_standard_normal(vae.encoder.mu.detach()[None], torch.full((1, 3), 0.5))[0]
    check(not close(kl, kl_of_sigma_as_log), 4, "kl_standard_normal got sigma_z where it takes log sigma_z: the "
          "encoder returns (mu_z, log_sigma_z, sigma_z)")
    check(close(kl, kl_i), 4, "kl must be the batch mean of KL[q(z|x) || N(0, I)], summed over latent dimensions")
    check(close(loss, rec + kl), 4, "loss must be rec + kl (eq. 2)")
    z = vae.decoder.seen[-1]
    check(z.shape == (8, 3) and not torch.allclose(z, vae.encoder.mu.detach().expand(8, -1)), 4,
          "the decoder got mu_z itself: draw z ~ q(z|x) (mu + sigma eps)")
    check(vae.decoder.differentiable[-1], 4, "z carries no gradient to the encoder: reparameterise (mu + sigma eps)")
    loss.backward()
    check(vae.encoder.mu.grad is not None and vae.encoder.mu.grad.abs().sum() > 0, 4, "no gradient reaches the encoder")
    check(vae.loggamma_x.grad is not None, 4, "no gradient reaches loggamma_x: the decoder's gamma must be learned")
    # the reconstruction term's gradient must reach mu_z through z (dz/dmu = 1): the same loss, from
    # the z this call drew, rebuilt as mu + (z - mu) with the noise held fixed
    tilted = stub_vae(slope=0.1)
    stage1.stage1_loss(tilted, x, "learned-gamma")[0].backward()
    mu = tilted.encoder.mu.detach().clone().requires_grad_()
    z = mu + (tilted.decoder.seen[-1] - mu.detach())
    rec_ref, kl_ref = stub_terms(x, 0.25 + 0.1 * z.sum(1).view(-1, 1, 1, 1), mu)
    (rec_ref.mean() + kl_ref).backward()
    check(close(tilted.encoder.mu.grad, mu.grad, rtol=1e-4), 4, "the reconstruction term's gradient does not reach "
          "mu_z through z: draw z = mu + sigma * eps (reparameterise); torch.normal(mu, sigma) and detached "
          "draws pass no gradient to mu")
    # a large sample of z: mean mu, standard deviation sigma = 0.5
    big = stub_vae()
    stage1.stage1_loss(big, torch.rand(20000, 1, 4, 4), "learned-gamma")
    z_std = big.decoder.seen[-1].std(0)
    check(not close(z_std, [math.log(2)] * 3, rtol=0.03, atol=0), 4, "z's standard deviation is |log sigma_z|: "
          "reparameterize got log sigma_z where it takes sigma_z (the encoder returns (mu_z, log_sigma_z, sigma_z))")
    check(close(z_std, [0.5] * 3, rtol=0.03, atol=0), 4, "z's standard deviation must be sigma_z")
    # the baselines: fixed gamma = loggamma_x 0 in the same formula; cross-entropy with logs clamped at 1e-8
    fixed = stub_vae(loggamma=0.0)
    _, rec_fixed, _ = stage1.stage1_loss(fixed, x, "fixed-gamma")
    check(close(rec_fixed, (-torch.distributions.Normal(0.25, 1.0).log_prob(x).flatten(1).sum(1)).mean()), 4,
          "'fixed-gamma' is the same Gaussian term with gamma = 1")
    _, rec_ce, _ = stage1.stage1_loss(stub_vae(), x, "cross-entropy")
    ce = -(x * math.log(0.25) + (1 - x) * math.log(0.75)).flatten(1).sum(1).mean()
    check(close(rec_ce, ce), 4, "'cross-entropy' is the Bernoulli -log p(x|z), summed over pixels, mean over the batch")


# ---------------------------------------------------------------------------------------------
# Exercise 5: stage1.encode, between the stages

def test_ex5_encode_with_batchnorm_in_evaluation_mode():
    torch.manual_seed(5)
    images = torch.randint(0, 256, (30, 1, 4, 4), dtype=torch.uint8)
    vae = stub_vae(kappa=3, sigma=0.4)
    mu_z, sigma_z = stage1.encode(vae, images, batch=7)
    check(isinstance(mu_z, np.ndarray) and isinstance(sigma_z, np.ndarray), 5, "return two numpy arrays (mu_z, sigma_z)")
    check(mu_z.shape == sigma_z.shape == (30, 3), 5, f"(n, kappa) = (30, 3) expected, got {mu_z.shape}, {sigma_z.shape}")
    check(mu_z.dtype == np.float32 and sigma_z.dtype == np.float32, 5, "float32 arrays expected (stage2.py reads them)")
    check(np.allclose(sigma_z, 0.4), 5, "sigma_z must be the standard deviation (not log sigma, not sigma^2)")
    check(np.allclose(mu_z, np.linspace(-1, 1, 3)[None].repeat(30, 0), atol=1e-6), 5, "mu_z must be the encoder's mean")
    calls = vae.encoder.calls
    check(len(calls) == 5, 5,
          f"encode in batches of `batch` (30 images in 5 batches of at most 7), got {len(calls)} calls")
    check(not any(c["training"] for c in calls), 5, "the encoder ran in training mode: call model.eval() first "
          "(BatchNorm must use its running statistics, so a code does not depend on the rest of its batch)")
    check(close(torch.cat([c["x"] for c in calls]), images.float() / 255), 5,
          "the encoder must see the images as in training: float pixels uint8 / 255, in their order")
    # a real stage-1 encoder with BatchNorm: an image's code must not depend on its batch
    real = stage1.VAE("infogan", 1, 28, latent_dim=4)
    with torch.no_grad():
        for m in real.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    digits = torch.randint(0, 256, (12, 1, 28, 28), dtype=torch.uint8)
    together, _ = stage1.encode(real, digits, batch=12)
    alone, _ = stage1.encode(real, digits[:3], batch=3)
    check(np.allclose(together[:3], alone, atol=1e-5), 5,
          "the same image got different codes in different batches: BatchNorm is in training mode")


# ---------------------------------------------------------------------------------------------
# Exercise 6: stage2.fresh_z, a fresh z ~ q(z|x) for every stage-2 batch

def test_ex6_fresh_z_for_every_batch(monkeypatch):
    # graded on its own: exercise 3's draw, which fresh_z may call, is replaced by an independent one
    for module in (stage1, stage2):
        monkeypatch.setattr(module, "reparameterize", lambda mu, sigma: mu + sigma * torch.randn_like(mu))
    torch.manual_seed(6)
    mu_z = torch.tensor([[2.0, -1.0], [0.0, 3.0]])
    sigma_z = torch.tensor([[0.5, 1.5], [0.01, 1.0]])
    z = stage2.fresh_z(mu_z, sigma_z)
    check(z.shape == (2, 2), 6, f"one draw per row expected, shape (2, 2), got {tuple(z.shape)}")
    check(not torch.equal(z, stage2.fresh_z(mu_z, sigma_z)), 6,
          "two calls gave the same z: stage 2 would be fitted on one fixed z per image; draw new noise every call")
    draws = torch.stack([stage2.fresh_z(mu_z, sigma_z) for _ in range(4000)])
    check(close(draws.mean(0), mu_z, atol=0.06, rtol=0), 6, "the draws' mean must be mu_z")
    check(close(draws.std(0), sigma_z, rtol=0.05, atol=1e-3), 6,
          f"the draws' standard deviation must be sigma_z (got {draws.std(0).tolist()}; sigma_z^2 or sqrt used?)")
    eps = ((draws - mu_z) / sigma_z).flatten(1)  # (4000, 4): both rows' noise, both dimensions
    check(offdiag_corr(eps) < 0.08, 6, "the noise is shared between rows or dimensions of a batch: each image "
          "needs its own eps (torch.randn_like(mu_z)), or stage 2 sees correlated z")


# ---------------------------------------------------------------------------------------------
# Exercise 7: sample.generate, two-stage sampling u -> z -> x (Section 4)

class StubStage2(nn.Module):
    """z_hat(u) = 3 everywhere, gamma_z = 0.3; records the u it was given."""

    def __init__(self, kappa):
        super().__init__()
        self.loggamma_z = nn.Parameter(torch.tensor(math.log(0.3)))
        self.seen = []
        self.decoder = lambda u: self.seen.append(u.clone()) or torch.full_like(u, 3.0)


class ShowZ(nn.Module):
    """A stage-1 'decoder' that returns z itself as a (B, 1, 1, kappa) image, so x shows z."""

    def forward(self, z):
        return z.view(len(z), 1, 1, -1)


def test_ex7_two_stage_sampling():
    torch.manual_seed(7)
    kappa = 4
    vae1 = nn.Module()
    vae1.decoder, vae1.latent_dim = ShowZ(), kappa
    vae2 = StubStage2(kappa)
    x = sample.generate(vae1, vae2, 5000, 700, "cpu")
    check(isinstance(x, torch.Tensor) and x.device.type == "cpu", 7, f"return one torch tensor on the CPU "
          f"(torch.cat of the batches, each moved with .cpu()), got {type(x).__name__}")
    check(tuple(x.shape) == (5000, 1, 1, kappa), 7, f"n = 5000 images expected, got {tuple(x.shape)}")
    check(len(vae2.seen) > 0, 7, "stage 2's decoder was never called: z_hat = vae2.decoder(u) for u ~ N(0, I), "
          "then z ~ N(z_hat, gamma_z^2 I)")
    check([len(b) for b in vae2.seen] == [700] * 7 + [100], 7,
          f"u -> z -> x in batches of at most 700 (the last one smaller), got batches of {[len(b) for b in vae2.seen]}")
    z = x.flatten(1)
    u = torch.cat(vae2.seen)
    check(u.shape == (5000, kappa) and close(u.mean(), 0.0, atol=0.05) and close(u.std(), 1.0, rtol=0.03), 7,
          "stage 2's decoder must get u ~ N(0, I)")
    check(len(torch.unique(u, dim=0)) == 5000 and offdiag_corr(u) < 0.06, 7,
          "u must be a fresh, independent N(0, I) draw for every image and dimension (not reused across batches)")
    check(close(z.mean(), 3.0, atol=0.03), 7, "z must be centred on z_hat(u)")
    check(not close(z.std(), 0.0, atol=1e-3), 7, "z = z_hat(u) exactly: the sampling rule adds gamma_z * eps")
    # gamma_z = 0.3 makes each usual mistake's noise scale its own number
    slips = {0.09: "gamma_z^2, a variance, used as the standard deviation", 0.3 ** 0.5: "exp(loggamma_z / 2): "
             "loggamma_z read as a log-variance", -math.log(0.3): "loggamma_z used without exp", 1.0: "gamma_z left out"}
    slip = [why for scale, why in slips.items() if close(z.std(), scale, rtol=0.03)]
    check(close(z.std(), 0.3, rtol=0.03), 7, f"z's noise must have standard deviation gamma_z = exp(loggamma_z) = 0.3, "
          f"got {z.std().item():.3f}" + (f": {slip[0]}" if slip else ""))
    check(offdiag_corr(z) < 0.06, 7, "z's noise is shared between dimensions: gamma_z * eps needs eps ~ N(0, I)")
    eps = (z - 3.0) / 0.3  # z_hat(u) = 3 here, so this is the noise the sampler added
    check(offdiag_corr(torch.cat([eps, u], 1)) < 0.06, 7, "z's noise is correlated with u: z ~ N(z_hat(u), gamma_z^2 I) "
          "needs a new eps ~ N(0, I), drawn apart from u")
    # with and without the noise, the same seed gives the same u (the eps is drawn either way), so
    # sample.py --no-z-noise compares like with like
    vae2.seen.clear()
    torch.manual_seed(70)
    sample.generate(vae1, vae2, 600, 200, "cpu")
    with_noise = torch.cat(vae2.seen)
    vae2.seen.clear()
    torch.manual_seed(70)
    sample.generate(vae1, vae2, 600, 200, "cpu", z_noise=False)
    check(torch.equal(with_noise, torch.cat(vae2.seen)), 7, "z_noise=False drew other u than z_noise=True with the "
          "same seed: draw eps in both cases (and use it only with the noise), so the two modes share u")
    vae2.seen.clear()
    plain = sample.generate(vae1, vae2, 10, 4, "cpu", z_noise=False)
    check(torch.equal(plain, torch.full_like(plain, 3.0)), 7, "z_noise=False must give z = z_hat(u), no noise")
    one = sample.generate(vae1, None, 4000, 1000, "cpu").flatten(1)
    check(close(one.mean(), 0.0, atol=0.04) and close(one.std(), 1.0, rtol=0.03), 7, "vae2 None: one-stage sampling, z ~ N(0, I)")


# ---------------------------------------------------------------------------------------------
# Exercise 8: fid.frechet_distance (Heusel et al. 2017), the FID of Section 5

def test_ex8_frechet_distance():
    rng = np.random.default_rng(8)
    a = rng.normal(size=(6, 6))
    s = a @ a.T + 0.1 * np.eye(6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    d = fid.frechet_distance(mu1, s, mu1, s)
    root_of_trace = 2 * np.trace(s) - 2 * np.sqrt(np.trace(s @ s))  # a usual slip: sqrt(tr(S1 S2))
    check(abs(d) < 1e-6 * np.trace(s), 8, f"the distance of a Gaussian to itself must be 0, got {d} " + (
          "(sqrt(tr(S1 S2)), the root of the trace, where the formula has tr(sqrt(S1 S2)), the trace of the "
          "matrix square root)" if np.isclose(d, root_of_trace, rtol=1e-6) else
          "(tr(S1) + tr(S2) - 2 tr(sqrt(S1 S2)): the matrix square root, the factor 2, and S2 in the product?)"))
    check(np.isclose(fid.frechet_distance(mu1, s, mu2, s), np.sum((mu1 - mu2) ** 2), rtol=1e-6), 8,
          "with equal covariances the distance is |mu1 - mu2|^2 (a squared norm, not the norm)")
    # diagonal covariances: tr sqrt(S1 S2) = sum sqrt(a_i b_i), so FID = |dmu|^2 + sum (sqrt(a_i) - sqrt(b_i))^2
    va, vb = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(va) - np.sqrt(vb)) ** 2)
    got = fid.frechet_distance(mu1, np.diag(va), mu2, np.diag(vb))
    check(np.isclose(got, expected, rtol=1e-6), 8, f"diagonal covariances: expected {expected:.6f}, got {got:.6f} "
          "(the matrix square root of S1 S2, and the factor 2 in front of its trace?)")
    # 2 x 2 covariances that do not commute: tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)) for M = S1 S2
    for _ in range(5):
        b1, b2 = rng.normal(size=(2, 2)), rng.normal(size=(2, 2))
        s1, s2 = b1 @ b1.T + 0.05 * np.eye(2), b2 @ b2.T + 0.05 * np.eye(2)
        m = s1 @ s2
        expected = np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.trace(m) + 2 * np.sqrt(np.linalg.det(m)))
        got = fid.frechet_distance(np.zeros(2), s1, np.zeros(2), s2)
        roots = np.trace(s1) + np.trace(s2) - 2 * np.trace(psd_sqrt(s1) @ psd_sqrt(s2))  # a usual slip
        check(np.isclose(got, expected, rtol=1e-6, atol=1e-9), 8, f"non-commuting 2x2 covariances: expected {expected:.6f}, "
              f"got {got:.6f}" + (": tr(sqrt(S1) sqrt(S2)) is not tr(sqrt(S1 S2)) when S1 S2 != S2 S1; take the "
                                  "square root of the product" if np.isclose(got, roots, rtol=1e-6) else ""))
        check(np.isclose(fid.frechet_distance(np.zeros(2), s2, np.zeros(2), s1), got, rtol=1e-6), 8, "the distance must be symmetric")
    check(isinstance(got, float), 8, "return a Python float")
    # covariances of fewer samples than dimensions (a FID's case whenever images < 2048): rank 5 of 40.
    # With S2 = I, tr sqrt(S1 S2) = tr sqrt(S1) = the sum of S1's singular values' roots, here known: S1 is
    # built from its eigenvalues w. The zero eigenvalues come out of any eigensolver as +-1e-16.
    q, _ = np.linalg.qr(rng.normal(size=(40, 40)))
    w = np.concatenate([rng.uniform(0.5, 2, 5), np.zeros(35)])
    s1 = (q * w) @ q.T
    expected = w.sum() + 40 - 2 * np.sqrt(w).sum()
    got = fid.frechet_distance(np.zeros(40), s1, np.zeros(40), np.eye(40))
    check(np.isclose(got, expected, rtol=1e-6), 8, f"a rank-deficient covariance (5 samples in 40 dimensions): expected "
          f"{expected:.6f}, got {got}" + ("; eigenvalues that should be 0 come out slightly negative from rounding: clip them "
                                          "at 0 before the square root" if not np.isfinite(got) else ""))


# ---------------------------------------------------------------------------------------------
# Exercise 9: stage2.mmd_to_standard_normal, Table 3's MMD (Gretton et al. 2012)

def test_ex9_mmd_to_standard_normal():
    g = torch.Generator().manual_seed(9)
    x = torch.randn(30, 3, generator=g, dtype=torch.float64) * 0.5 + 0.3
    keep, state = x.clone(), torch.get_rng_state()
    got = stage2.mmd_to_standard_normal(x, seed=5)
    check(isinstance(got, float), 9, f"return a Python float (float(...)), got {type(got).__name__}")
    check(torch.equal(x, keep), 9, "the samples were changed in place")
    check(torch.equal(torch.get_rng_state(), state), 9, "the global random state changed (torch.manual_seed or a "
          "global draw?): draw the y's from their own torch.Generator().manual_seed(seed)")
    check(got == stage2.mmd_to_standard_normal(x, seed=5), 9, "two calls with one seed gave different values: draw the "
          "y's from torch.Generator().manual_seed(seed), not from the global random state")
    # the reference: eq. 3 of Gretton et al. written out pair by pair, on the y's the docstring names
    y = torch.randn(30, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    def mean_k(a, b, c=6.0, pairs="i != j", square=True):  # the mean of c / (c + |a_i - b_j|^2) over the pairs
        terms = [c / (c + float(((a[i] - b[j]) ** 2).sum()) ** (1 if square else 0.5))
                 for i in range(len(a)) for j in range(len(b)) if pairs == "all" or i != j]
        return sum(terms) / len(terms)

    expected = mean_k(x, x) + mean_k(y, y) - 2 * mean_k(x, y, pairs="all")
    slips = {  # what the usual mistakes give on these numbers
        "the diagonal terms k(x_i, x_i) = 1 kept in the within-sample means (the biased estimator): leave out i = j":
            mean_k(x, x, pairs="all") + mean_k(y, y, pairs="all") - 2 * mean_k(x, y, pairs="all"),
        "C = kappa where the kernel has C = 2 kappa":
            mean_k(x, x, 3.0) + mean_k(y, y, 3.0) - 2 * mean_k(x, y, 3.0, pairs="all"),
        "|a - b| where the kernel has the squared distance |a - b|^2":
            mean_k(x, x, square=False) + mean_k(y, y, square=False) - 2 * mean_k(x, y, pairs="all", square=False),
        "the cross term's sum divided by n (n - 1): it is a mean over all n^2 pairs, divide by n^2":
            mean_k(x, x) + mean_k(y, y) - 2 * mean_k(x, y, pairs="all") * 30 / 29,
        "the cross term over the pairs i != j only: it is a mean over all n^2 pairs":
            mean_k(x, x) + mean_k(y, y) - 2 * mean_k(x, y),
    }
    why = next((w for w, v in slips.items() if math.isclose(got, v, rel_tol=1e-8)),
               "close, but off by more than float64 rounding: compute in float64" if math.isclose(got, expected, rel_tol=1e-4)
               else "compare with the docstring's formula, and check the y's: exactly torch.randn(n, kappa, "
               "generator=torch.Generator().manual_seed(seed), dtype=torch.float64)")
    check(math.isclose(got, expected, rel_tol=1e-10), 9, f"expected {expected:.10f}, got {got:.10f}: {why}")
    check(math.isclose(stage2.mmd_to_standard_normal(x, seed=5, block=7), got, rel_tol=1e-12), 9,
          "block=7 changed the value: the blocks of rows must cover every row once")
    check(math.isclose(stage2.mmd_to_standard_normal(x.float(), seed=5), stage2.mmd_to_standard_normal(x.float().double(), seed=5),
                       rel_tol=1e-12), 9, "float32 samples gave another value than the same numbers in float64: compute in float64")
    # unbiased: samples that ARE N(0, I) score about 0, below 0 about half the time (a biased estimate never is)
    same = [stage2.mmd_to_standard_normal(torch.randn(200, 4, generator=g), seed=s) for s in range(10)]
    check(min(same) < 0 < max(same) and abs(np.mean(same)) < 2e-3, 9,
          f"N(0, I) samples must score about 0, some below 0 (unbiased), got {[round(v, 5) for v in same]}")
    # and clearly above 0 for q(z)-like samples: most dimensions squeezed toward 0 (Section 3's used dimensions)
    squeezed = torch.randn(400, 8, generator=g) * torch.tensor([1.0] * 2 + [0.1] * 6)
    got = stage2.mmd_to_standard_normal(squeezed)
    check(got > 0.05, 9, f"samples with 6 of 8 dimensions squeezed to standard deviation 0.1 must score clearly above 0, got {got:.5f}")
