"""Stage 2 of the Two-Stage VAE (Dai & Wipf 2019, Section 4): a second VAE fitted to stage 1's
latents. Stage 1's aggregate posterior q(z) need not be N(0, I): its data x (d = 784 pixels for
MNIST) lie on a manifold of dimension r < d, and there the VAE learns the manifold but need not
learn how probability is spread over it (eq. (10)). But q(z) lives on all of R^kappa: each of its
Gaussians q(z|x) has full rank (the unused dimensions are filled with noise of sigma_z near 1), so
for stage 2's data r = d = kappa, the regime of Theorem 1 where a VAE CAN match the distribution
(Section 4, after step 3). So a second VAE, an MLP with latent u, learns q(z), and sampling goes
u -> z -> x (Section 4, step 3: sample.py). The stages are trained one after the other: Section 4
reports that joint training does not help.

    python stage2.py --data mnist --epochs 20  # CPU-sized (its time: README.md, "Quick start")
    python stage2.py --data mnist              # the authors' protocol (their demo.py; the paper gives no
                                               # budget): 800 epochs (cifar10: 2000, as the authors ran
                                               # Table 1's column), lr 1e-4 halved every 300, batch 64, Adam

Reads runs/<data>/mu_z.npy and sigma_z.npy (written by stage1.py, and checked against its
latents.json and stage1.pt, so that stage 2 never fits another run's latents) and writes
runs/<data>/stage2.pt and stage2.json (loggamma_z, the log of a standard deviation like stage 1's
loggamma_x, and, for Table 3, our estimate of the squared maximum mean discrepancy, MMD^2, of q(z)
and of q(u) to N(0, I): a kernel distance between two distributions, 0 only when they are equal;
the paper names no estimator; ours is unbiased, so it can dip below 0).
Each batch draws FRESH z = mu_z + sigma_z * eps, not one fixed sample per image: Section 4, step 1
reads like one z per image, the authors' demo.py draws new ones for every batch, and we follow the
code (docs/protocol.md, "Between the stages"; `--fixed-z` is the literal reading, as an experiment).
The training loop is stage1.fit. The authors' files cited below (demo.py, network/...) are in their
repository, github.com/daib13/TwoStageVAE.
"""
import argparse
import json
import os

import numpy as np
import torch
import torch.nn as nn

from stage1 import (CIFAR10_EPOCHS, HelpWithDefaults, common_flags, die, fit, gaussian_nll, kl_standard_normal,
                    load_checkpoint, make_optimizer, reparameterize, restore, save_atomic, start_or_resume)


class MLP(nn.Module):
    """Section 5's "small, 3-layer networks" of stage 2: depth x [dense width, ReLU], then the input
    concatenated back in before the output layer, as in the authors' build_encoder2 /
    build_decoder2 (network/two_stage_vae_model.py); the output layer gives `outputs` vectors of the
    input's size dim (outputs = 2 for the encoder: mu_u and log sigma_u; outputs = 1 for the
    decoder: z_hat). Dense layers start as TF's default
    (Glorot-uniform weights, zero biases), not PyTorch's; the encoder's mu_u and log sigma_u layers
    are one 2-kappa layer here, whose Glorot bound is 3 % smaller than two kappa layers'.
    "Small" is the paper's word for their role, not their size: with the authors' width 1024 the
    two MLPs hold about 4.5 M parameters, a third of the MNIST stage 1's 13.3 M, though a step costs
    far less (no convolutions; docs/protocol.md, "Stage 2")."""

    def __init__(self, dim, width, depth, outputs):
        super().__init__()
        layers, d = [], dim
        for _ in range(depth):
            layers += [nn.Linear(d, width), nn.ReLU()]
            d = width
        self.hidden = nn.Sequential(*layers)
        # on concat[input, h]: (B, dim + width) -> (B, outputs * dim); u and z both have kappa dimensions
        self.out = nn.Linear(dim + width, outputs * dim)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, t):
        return self.out(torch.cat([t, self.hidden(t)], dim=1))


class Stage2VAE(nn.Module):
    """q(u|z) = N(mu_u, diag sigma_u^2), p(z|u) = N(z_hat(u), gamma_z^2 I) with gamma_z =
    exp(loggamma_z) a standard deviation (the paper's gamma, a variance, is gamma_z^2), learned from
    0 like stage 1's loggamma_x. No BatchNorm.

    How far gamma_z falls is measured, not derived: its pull toward 0 is weak. Theorem 3 covers d = r
    too (q(z) is not Gaussian, so the optimum still has gamma_z -> 0), but with fresh z, q(z) is a
    density on all of R^kappa, d = r = kappa, and the (d - r) log gamma term that drives stage 1's
    gamma down without bound is zero (Section 4): the loss is bounded below, by q(z)'s differential
    entropy (Section 2.1, after eq. (3); docs/protocol.md, "Stage 2"). Weak, not zero: in the used
    dimensions q(z)'s n Gaussians have sigma_z^2 of 10^-4.6 to 10^-1.3 (MNIST, 400 epochs:
    theory.ipynb, section 2), nearly a lower-dimensional set. With --fixed-z, n fixed points have
    r = 0, and the unbounded pull is back."""

    def __init__(self, latent_dim=64, width=1024, depth=3):
        super().__init__()
        self.encoder = MLP(latent_dim, width, depth, outputs=2)  # -> mu_u, log sigma_u
        self.decoder = MLP(latent_dim, width, depth, outputs=1)  # -> z_hat (linear output)
        self.loggamma_z = nn.Parameter(torch.zeros(()))  # log of a standard deviation, init 0

    def encode(self, z):
        """q(u|z) of a batch: (mu_u, log sigma_u), each (B, kappa). (stage1.encode is another thing:
        stage 1's q(z|x) of a whole data set, as numpy arrays for this script.)"""
        mu_u, log_sigma_u = self.encoder(z).chunk(2, dim=1)
        return mu_u, log_sigma_u


def build_model(config):
    return Stage2VAE(config["latent_dim"], config["width"], config["depth"])


# Exercise 6: a fresh z ~ q(z|x) for every stage-2 batch (the authors' demo.py, not one z per image)
def fresh_z(mu_z, sigma_z):
    """One new draw z = mu_z + sigma_z * eps for each row of a batch of stage 1's latents (B, kappa),
    sigma_z a standard deviation. The same draw as stage1.reparameterize; what matters here is
    WHEN it happens: for every batch, so stage 2 sees q(z), the average of q(z|x) over the n
    training images (eq. (10)'s integral, against the data's empirical measure), not one fixed z
    per image."""
    return mu_z + sigma_z * torch.randn_like(mu_z)


def stage2_loss(model, z):
    """The same negative ELBO as stage 1 (eq. (2)), with z in place of x and u in place of z:
    (loss, rec, kl), batch means of per-example sums."""
    mu_u, log_sigma_u = model.encode(z)
    u = reparameterize(mu_u, log_sigma_u.exp())
    z_hat = model.decoder(u)
    rec = gaussian_nll(z, z_hat, model.loggamma_z).mean()
    kl = kl_standard_normal(mu_u, log_sigma_u).mean()
    return rec + kl, rec, kl


# ----------------------------------------------------------------------------------------------
# Section 6, Table 3 and Figure 2: how far is each stage's aggregate posterior from N(0, I)?
# (Figure 2's singular values of these sample matrices: theory.ipynb, section 3.)
# The paper (citing Gretton et al. 2007) does not say which kernel or estimator its MMD used, so
# ours is written down here and its values are comparable with each other (stage 1 vs stage 2), not
# with the paper's digits: our kernel is at most 1, so our MMD^2 is at most 2, and Table 3's 2.85
# (MNIST, stage 1) cannot be a value of this estimator.

@torch.inference_mode()
def aggregate_posterior_samples(model, mu_z, sigma_z, n, seed=0):
    """Sample matrices Z (n, kappa) from q(z) and U (n, kappa) from q(u), as for the paper's Figure 2:
    z = mu_z + sigma_z eps for n training images drawn at random, u ~ q(u|z) for each of those z. main:
    --mmd-n, default 10,000, our choice for time (Section 6's Z = {z(i)}, i = 1..n, reads as all n
    training images: for MNIST 36 times the pairs of 10,000)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(mu_z), generator=g)[:n]
    z = mu_z[idx] + sigma_z[idx] * torch.randn(len(idx), mu_z.shape[1], generator=g)
    device = next(model.parameters()).device
    mu_u, log_sigma_u = model.encode(z.to(device))
    u = mu_u.cpu() + log_sigma_u.exp().cpu() * torch.randn(len(idx), mu_z.shape[1], generator=g)
    return z, u


# Exercise 9: Table 3's MMD of a sample to N(0, I) (Section 6; Gretton et al. 2012)
def mmd_to_standard_normal(samples, seed=0, block=2000):
    """Unbiased MMD^2 between the rows x_i of `samples` (an (n, kappa) tensor or array) and n draws y_j ~
    N(0, I), returned as a Python float: the mean of k(x_i, x_j) over the n (n - 1) pairs i != j, plus
    the same for the y's, minus twice the mean of k(x_i, y_j) over all n^2 pairs (Gretton et al. 2012,
    JMLR, eq. 3; the paper cites their NIPS 2007 paper for the MMD). The kernel is the inverse
    multiquadric (IMQ) k(a, b) = C / (C + |a - b|^2), C = 2 kappa, the one the WAE paper (Tolstikhin et
    al. 2018) uses against a N(0, I) prior. The y's are torch.randn(n, kappa,
    generator=torch.Generator().manual_seed(seed), dtype=torch.float64), so one seed gives the same y's
    every call: main scores q(z) and q(u) against the same draws (seed 0), a paired comparison. The
    samples are cast to float64 (they may come as float32) and everything is computed in float64, in
    blocks of `block` rows, so that n = 10,000 needs no 800 MB matrix. Neither `samples` nor the global
    random state is changed."""
    x = torch.as_tensor(samples, dtype=torch.float64).cpu()
    n, kappa = x.shape
    y = torch.randn(n, kappa, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    c = 2.0 * kappa

    def kernel_sum(a, b):
        return sum((c / (c + torch.cdist(a[i:i + block], b) ** 2)).sum() for i in range(0, len(a), block))

    # the diagonal terms k(a_i, a_i) = 1 are left out of the within-sample means (the unbiased estimator)
    xx = (kernel_sum(x, x) - n) / (n * (n - 1))
    yy = (kernel_sum(y, y) - n) / (n * (n - 1))
    return float(xx + yy - 2 * kernel_sum(x, y) / (n * n))


# The authors' protocol as defaults (their demo.py; docs/protocol.md, "Stage 2"): flags that define a run.
STAGE2_DEFAULTS = {"epochs": 800, "lr": 1e-4, "lr_epochs": 300, "batch_size": 64, "seed": 0, "width": 1024, "depth": 3,
                   "fixed_z": False}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Stage 2: a VAE on stage 1's latents (Dai & Wipf 2019).",
                                formatter_class=HelpWithDefaults)
    common_flags(p, STAGE2_DEFAULTS, CIFAR10_EPOCHS[1])
    p.add_argument("--width", type=int, help="hidden units per dense layer (default: 1024, the authors')")
    p.add_argument("--depth", type=int, help="hidden dense layers in encoder and decoder (default: 3, the authors')")
    p.add_argument("--fixed-z", action="store_true", default=None,
                   help="an experiment: draw ONE z per image before training and fit stage 2 to those, Section 4's "
                        "step 1 read literally (the authors' code draws a fresh z for every batch) "
                        "(default: off; on --resume: the run's)")
    p.add_argument("--mmd-n", type=int, default=10000, help="samples per side for Table 3's MMD, computed after training")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.mmd_n < 2:
        die(f"--mmd-n {args.mmd_n}: the unbiased MMD needs at least 2 samples per side; fix: pass --mmd-n 2 or more")
    out = args.out or os.path.join("runs", args.data or "mnist")
    path = os.path.join(out, "stage2.pt")
    stage1_ckpt, mu_z, sigma_z = load_stage1_run(out, args.data)
    args.data = stage1_ckpt["config"]["data"]  # without --data: the stage-1 run's
    defaults = dict(STAGE2_DEFAULTS, epochs=CIFAR10_EPOCHS[1]) if args.data == "cifar10" else STAGE2_DEFAULTS
    ckpt = start_or_resume(args, path, defaults)
    cfg = ckpt["config"]
    cfg["latent_dim"] = mu_z.shape[1]
    # which stage-1 run these latents come from; sample.py refuses to mix runs
    stage1_run = {"run_id": stage1_ckpt["config"]["run_id"], "epoch": stage1_ckpt["epoch"], "data": stage1_ckpt["config"]["data"]}
    if ckpt["epoch"] > 0 and ckpt["stage1"] != stage1_run:
        die(f"{path} was trained on stage-1 run {ckpt['stage1']}, but {out} now holds {stage1_run}; "
            f"fix: start stage 2 afresh (delete {path}) after re-running stage 1")
    ckpt["stage1"] = stage1_run
    torch.manual_seed(cfg["seed"])

    mu_z, sigma_z = torch.from_numpy(mu_z).to(args.device), torch.from_numpy(sigma_z).to(args.device)
    print(f"stage 2 | latents {tuple(mu_z.shape)} from stage-1 epoch {stage1_run['epoch']} | {cfg['epochs']} epochs | "
          f"device {args.device} | out {out}", flush=True)
    model = build_model(cfg).to(args.device)
    opt = make_optimizer(model, cfg["lr"])
    restore(ckpt, model, opt)

    if not cfg.get("fixed_z"):  # the authors' code: fit hands each batch's rows of (mu_z, sigma_z) to the loss,
        # which draws a fresh z ~ q(z|x) for them at every step
        fit(model, opt, ckpt, (mu_z, sigma_z), lambda mu, sigma: stage2_loss(model, fresh_z(mu, sigma)), path, "loggamma_z")
    else:  # the experiment: one draw per image, the same at every epoch and on --resume
        # drawn on the CPU, so that a run resumed on another device keeps the same z
        g = torch.Generator().manual_seed(cfg["seed"])
        z = mu_z + sigma_z * torch.randn(mu_z.shape, generator=g).to(mu_z.device)
        fit(model, opt, ckpt, (z,), lambda z: stage2_loss(model, z), path, "loggamma_z")

    # Table 3: the MMD of q(z) (what 1-stage sampling wrongly assumes is N(0, I)) and of q(u) (what
    # 2-stage sampling assumes) to N(0, I); stage 2 should bring it close to 0.
    model.eval()
    z, u = aggregate_posterior_samples(model, mu_z.cpu(), sigma_z.cpu(), min(args.mmd_n, len(mu_z)))
    summary = {"epoch": ckpt["epoch"], "fixed_z": bool(cfg.get("fixed_z")), "loggamma_z": model.loggamma_z.item(), "stage1": stage1_run,
               "mmd_stage1": mmd_to_standard_normal(z), "mmd_stage2": mmd_to_standard_normal(u),
               "mmd_estimator": f"unbiased MMD^2, IMQ kernel C = 2 kappa, n = {len(z)}"}
    save_atomic(summary, os.path.join(out, "stage2.json"))
    print("done | " + json.dumps(summary), flush=True)


# ==============================================================================================
# Plumbing, not in the paper: the checks on stage 1's run before anything is trained.

def load_stage1_run(out, data):
    """(stage1_ckpt, mu_z, sigma_z) of the stage-1 run in `out`: its checkpoint's config and epoch (all
    stage 2 needs of it) and its latents, checked; --data, when given, must be the run's."""
    stage1_ckpt = load_checkpoint(os.path.join(out, "stage1.pt"), keys=("config", "epoch"))
    if stage1_ckpt is None:
        die(f"{os.path.join(out, 'stage1.pt')} is missing; fix: run `python stage1.py --out {out}` first")
    if data and data != stage1_ckpt["config"]["data"]:
        die(f"{out}/stage1.pt was trained on {stage1_ckpt['config']['data']}, not --data {data}; "
            f"fix: pass --data {stage1_ckpt['config']['data']}, or none")
    return (stage1_ckpt, *load_latents(out, stage1_ckpt))


def load_latents(out, stage1_ckpt):
    """mu_z, sigma_z from stage 1, checked: a clear error names the file and the command that makes it."""
    # stage1.pt exists here, so stage1.py needs --resume; on a finished run it only encodes again
    fix_cmd = f"run `python stage1.py --out {out} --resume` (it writes the latents when training ends)"
    record = os.path.join(out, "latents.json")
    epoch, epochs = stage1_ckpt["epoch"], stage1_ckpt["config"]["epochs"]
    if not os.path.exists(record):
        unfinished = (f"stage 1 is at epoch {epoch} of {epochs}: wait for it to finish, or, if it was stopped, "
                      f"`python stage1.py --out {out} --resume`") if epoch < epochs else fix_cmd
        die(f"{record} is missing: stage 1 writes it with the latents when training ends; fix: {unfinished}")
    try:
        with open(record) as f:
            latents_record = json.load(f)
    except (OSError, ValueError) as e:
        die(f"{record} is not readable JSON ({type(e).__name__}); fix: {fix_cmd}")
    if not isinstance(latents_record, dict) or ([latents_record.get("run_id"), latents_record.get("epoch")]
                                                != [stage1_ckpt["config"]["run_id"], epoch]):
        die(f"{record} says the latents come from {latents_record}, not from stage1.pt (epoch {epoch}); "
            f"fix: finish the stage-1 run: `python stage1.py --out {out} --resume`")
    arrays = []
    for name in ("mu_z", "sigma_z"):
        path = os.path.join(out, f"{name}.npy")
        if not os.path.exists(path):
            die(f"{path} is missing; fix: {fix_cmd}")
        try:
            a = np.load(path)
        except Exception as e:
            die(f"{path} is not a readable .npy ({type(e).__name__}); fix: {fix_cmd}")
        if a.ndim != 2 or a.shape[0] < 2 or not np.issubdtype(a.dtype, np.floating):
            die(f"{path} has shape {a.shape} and dtype {a.dtype}, expected float (n, kappa); fix: {fix_cmd}")
        if not np.isfinite(a).all():
            die(f"{path} holds NaN or inf; fix: {fix_cmd}")
        arrays.append(a.astype(np.float32))
    mu_z, sigma_z = arrays
    if mu_z.shape != sigma_z.shape:
        die(f"mu_z {mu_z.shape} and sigma_z {sigma_z.shape} in {out} do not match; fix: {fix_cmd}")
    if (sigma_z <= 0).any():
        die(f"{os.path.join(out, 'sigma_z.npy')} has sigma_z <= 0; fix: {fix_cmd}")
    return mu_z, sigma_z


if __name__ == "__main__":
    main()
