"""Stage 1 of the Two-Stage VAE (Dai & Wipf, "Diagnosing and Enhancing VAE Models", ICLR 2019).

A kappa-simple VAE (latent size kappa = 64) whose Gaussian decoder learns its own variance gamma
(Definition 1, Sections 2-3; the code learns its square root: Notation, below). At the optimum
gamma -> 0 (Theorem 3), and the VAE then reconstructs every x on the data manifold of dimension r
(d = pixels > r) from any z ~ q(z|x) (Theorem 4, eq. (7)); the encoder variances go to ~0 for the
r latent dimensions the decoder uses and ~1 for the rest (Section 3 after eq. (9), Figure 1b,
"Validation of Theorem 4"). But the measure on the manifold need not be learned, so the aggregate
posterior q(z) need not be even approximately N(0, I) (eq. (10); its symbol is "not approximately
equal", which text copies of the paper often lose), and sampling z ~ N(0, I) gives poor images.
Stage 2 (stage2.py) fixes that.

    python stage1.py --data mnist --epochs 10  # CPU-sized (its time: README.md, "Quick start")
    python stage1.py --data mnist              # the authors' protocol: 400 epochs (cifar10: 1000, as the
                                               # authors ran Table 1's column), batch 64, Adam 1e-4 halved every 150
    python stage1.py --data mnist --resume     # continue a killed run from runs/mnist/stage1.pt

Reads the training split from torchvision's files under --data-root (downloading them through
torchvision if absent). Writes to --out (default runs/<data>):
stage1.pt (the checkpoint, rewritten atomically after every epoch), mu_z.npy and sigma_z.npy
(q(z|x) for the whole training split, n x kappa float32, read by stage2.py), latents.json (the
checkpoint they come from, loggamma_x, and `active_dims`, the used latent dimensions: mean sigma_z^2
below 0.5, Section 3's r-hat) and stage1_recon.png (data above,
reconstructions below).

Reading order: data, model, loss (eq. (2), eq. (8), eq. (9)), the training loop, encoding for stage 2, main.
The defaults, STAGE1_DEFAULTS, and the flags (parse_args) follow main. Everything else the paper
does not describe is at the end, below a line of '=': die() (the one-line error every check uses),
checkpoints, RNG, atomic writes, progress lines, the flags shared with stage2.py, the data readers.
The authors' TensorFlow code, cited below by file name (demo.py, network/util.py, ...), is the public
repository github.com/daib13/TwoStageVAE; the protocol's details, with their sources: docs/protocol.md.

Notation: our gamma_x = exp(loggamma_x) is a STANDARD DEVIATION, as in the authors' code; the
paper's gamma (a variance: Definition 1's Sigma_x = gamma I) is gamma_x ** 2, so Figure 1a's
log gamma is 2 * loggamma_x. `# Exercise N` marks the functions course/ blanks out for students
(course/README.md).
"""
import argparse
import contextlib
import ctypes
import glob
import json
import math
import os
import platform
import shutil
import sys
import time
import uuid

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------
# Data: the whole split as one uint8 tensor (N, C, H, W); pixels become x = uint8 / 255 in [0, 1]
# only where the model reads them, a batch at a time (docs/protocol.md, "Data").

SHAPES = {"mnist": (1, 28), "fashion": (1, 28), "cifar10": (3, 32), "celeba": (3, 64)}  # (channels, side)
FOLDERS = {"mnist": "MNIST/raw", "fashion": "FashionMNIST/raw", "cifar10": "cifar-10-batches-py",
           "celeba": "celeba (img_align_celeba/ and the list_*.txt files)"}  # torchvision's, under the root
DATA_ENV = "TWOSTAGE_DATA"  # environment variable: the default --data-root


def load_images(data, root, train=True):
    """uint8 tensor (N, C, H, W) of a split, from torchvision's files under root: MNIST and
    Fashion-MNIST straight from their idx files (_idx_images, which says why), CIFAR-10 through
    torchvision's class (the raw arrays: the authors' preprocess.py round-trips every CIFAR-10 image
    through JPEG; docs/protocol.md, "Where this code departs from the authors'"), CelebA cropped as
    the authors did (_celeba). Local files first; if absent, torchvision's download; if that fails
    too (offline), one clear error."""
    if data not in SHAPES:
        die(f"unknown data set '{data}'; fix: use one of {', '.join(SHAPES)}")
    images = _idx_images(data, root, train)
    try:
        if images is None:
            images = _torchvision_images(data, root, train, download=False)
    except (RuntimeError, FileNotFoundError):
        try:
            images = _torchvision_images(data, root, train, download=True)
        except Exception as e:  # offline, or a host that is down: say where the files go
            die(f"{data} is not under --data-root {os.path.abspath(root)} and downloading it failed "
                f"({type(e).__name__}); fix: put torchvision's files in {os.path.join(root, FOLDERS[data])} "
                f"or pass --data-root DIR (or set {DATA_ENV}) to a folder that has them")
    channels, size = SHAPES[data]
    if images.shape[1:] != (channels, size, size):
        die(f"{data} images under {os.path.abspath(root)} are {tuple(images.shape[1:])}, not {(channels, size, size)}; "
            f"fix: point --data-root at the original files")
    return images.contiguous()


# ----------------------------------------------------------------------------------------------
# Model (docs/protocol.md, "Stage 1"): the 'InfoGAN' neutral architecture of Table 1, and the
# 'WAE' architecture of Table 2. Initialisation as the authors' network/util.py ('InfoGAN'; the
# 'WAE' networks use TF's layer defaults: glorot, below).

def init(layer):
    if isinstance(layer, nn.Conv2d):  # util.conv2d: TF's truncated normal, std 0.02, cut at 2 std
        nn.init.trunc_normal_(layer.weight, 0.0, 0.02, -0.04, 0.04)
    else:                             # util.linear and util.deconv2d: a plain normal(0, 0.02)
        nn.init.normal_(layer.weight, 0.0, 0.02)
    nn.init.zeros_(layer.bias)
    return layer


def glorot(layer):
    # the authors' 'Wae' class uses tf.layers with their defaults: Glorot-uniform weights, zero biases
    nn.init.xavier_uniform_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def bn(features, dims=2):
    # TF moving-average decay 0.999 == PyTorch momentum 0.001 (--bn-momentum); eps 1e-5 (authors' util.batch_norm).
    # Two small departures: TF's assign_moving_average zero-debiases the averages (ours keep a weight
    # 0.999^steps on the initial 0 / 1: 0.39 after one MNIST epoch, < 0.01 after five) and TF's
    # moving variance is the biased batch variance (PyTorch's: unbiased, x n/(n-1) for n values per
    # channel: 64/63 in the dense layers at batch 64, under 1.0004 in the conv layers).
    return (nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d)(features, eps=1e-5, momentum=0.001)


class SpectralNorm(nn.Module):
    """A layer whose weight W is divided by its largest singular value sigma (Miyato et al. 2018; a
    singular value, not the encoder's sigma_z), as the authors do on every encoder layer (not in the
    paper: their network/util.py; the decoder has none). sigma = u.W v, with u and v advanced by one
    power iteration per training step and none in evaluation mode (the authors' TF iterates while
    encoding too: docs/protocol.md, "Where this code departs from the authors'"), after 16 warm-up
    iterations (torch's choice of 15, plus one; the authors' TF has none: the same section); the
    gradient flows through sigma, as in torch and the authors' TF. The same numbers as torch's
    parametrizations.spectral_norm with the same u, v (test_smoke.py checks the two trajectories
    agree), but we divide the layer's OUTPUT by sigma instead of the weight, which spares the
    backward pass several passes over the dense weight (6.4M entries for MNIST; results/README.md,
    "Speed")."""

    def __init__(self, layer, warmup=16):
        super().__init__()
        self.layer = layer
        w = layer.weight.detach().flatten(1)  # (out, in * kh * kw)
        self.register_buffer("u", F.normalize(w.new_empty(w.shape[0]).normal_(0, 1), dim=0, eps=1e-12))
        self.register_buffer("v", F.normalize(w.new_empty(w.shape[1]).normal_(0, 1), dim=0, eps=1e-12))
        self.power_iteration(warmup)

    @torch.no_grad()
    def power_iteration(self, n):
        w = self.layer.weight.flatten(1)
        for _ in range(n):
            self.u.copy_(F.normalize(w @ self.v, dim=0, eps=1e-12))
            self.v.copy_(F.normalize(w.t() @ self.u, dim=0, eps=1e-12))

    def forward(self, x):
        if self.training:
            self.power_iteration(1)
        w, b = self.layer.weight, self.layer.bias
        if isinstance(self.layer, nn.Conv2d):
            sigma = self.u @ (w.flatten(1) @ self.v)
            y = F.conv2d(x, w, None, self.layer.stride, self.layer.padding)
            return y / sigma + b[:, None, None]
        # mathematically F.linear(x, w / sigma, b) with sigma = u.W v; computed so that
        # v rides along as one more input row, so one matmul gives both x W^T and W v (sigma = u.W v),
        # and its backward, g^T [x; v^T], folds sigma's rank-one gradient into the same pass over the
        # weight (6.4M entries for MNIST) instead of an outer product plus a sum of two weight-sized
        # gradients
        y = F.linear(torch.cat([x, self.v[None]]), w)  # (B + 1, out)
        sigma = self.u @ y[-1]
        return y[:-1] / sigma + b


class InfoganEncoder(nn.Module):
    """q(z|x) = N(mu_z, diag(sigma_z^2)); S = 28, 32 or 64."""

    def __init__(self, channels, size, latent_dim):
        super().__init__()
        s4 = size // 4
        sn = lambda layer: SpectralNorm(init(layer))
        self.net = nn.Sequential(
            sn(nn.Conv2d(channels, 64, 4, 2, 1)), nn.LeakyReLU(0.2),                   # (B, 64, S/2, S/2)
            sn(nn.Conv2d(64, 128, 4, 2, 1)), bn(128), nn.LeakyReLU(0.2),               # (B, 128, S/4, S/4)
            nn.Flatten(),                                                              # (B, 128 S/4 S/4)
            sn(nn.Linear(128 * s4 * s4, 1024)), bn(1024, dims=1), nn.LeakyReLU(0.2),   # (B, 1024)
            sn(nn.Linear(1024, 2 * latent_dim)),                                       # (B, 2 kappa)
        )

    def forward(self, x):  # (mu_z, log sigma_z, sigma_z): the log for the KL, sigma for the draw
        mu_z, s = self.net(x).chunk(2, dim=1)
        sigma_z = 1e-6 + F.softplus(s)  # the authors': keeps sigma_z > 0 without an exp that overflows
        return mu_z, sigma_z.log(), sigma_z


class InfoganDecoder(nn.Module):
    """x_hat(z) in [0, 1]: the mean of p(x|z) (or the Bernoulli probabilities)."""

    def __init__(self, channels, size, latent_dim):
        super().__init__()
        s4 = size // 4
        self.net = nn.Sequential(
            init(nn.Linear(latent_dim, 1024)), bn(1024, dims=1), nn.ReLU(),            # (B, 1024)
            init(nn.Linear(1024, 128 * s4 * s4)), bn(128 * s4 * s4, dims=1), nn.ReLU(),  # (B, 128 S/4 S/4)
            nn.Unflatten(1, (128, s4, s4)),                                            # (B, 128, S/4, S/4)
            init(nn.ConvTranspose2d(128, 64, 4, 2, 1)), bn(64), nn.ReLU(),             # (B, 64, S/2, S/2)
            init(nn.ConvTranspose2d(64, channels, 4, 2, 1)), nn.Sigmoid(),             # (B, C, S, S)
        )

    def forward(self, z):
        return self.net(z)


class WaeEncoder(nn.Module):
    """The 'WAE' network of Tolstikhin et al., which Table 2 uses (64x64 RGB only). Table 2 trained it
    for the WAE paper's epochs, on the WAE paper's crop (Section 5; docs/protocol.md, "Budgets beyond
    the defaults"): our defaults are Table 1's budget and the authors' 128x128 crop, so pass
    --epochs for Table 2's. As in the
    authors' code: no spectral norm, and sigma = exp(log sigma). PyTorch pads 5x5/2 convs
    symmetrically (2, 2) where TF 'same' pads (1, 2); the decoder's transposed convs are likewise
    shifted by one pixel against TF's (same shapes)."""

    def __init__(self, channels, size, latent_dim):
        super().__init__()
        def block(i, o, stride):
            return [glorot(nn.Conv2d(i, o, 5, stride, 2)), bn(o), nn.ReLU()]
        self.net = nn.Sequential(
            *block(channels, 128, 1),   # (B, 128, 64, 64)
            *block(128, 256, 2),        # (B, 256, 32, 32)
            *block(256, 512, 2),        # (B, 512, 16, 16)
            *block(512, 1024, 2),       # (B, 1024, 8, 8)
            nn.Flatten(),               # (B, 65536)
            glorot(nn.Linear(1024 * 8 * 8, 2 * latent_dim)),  # (B, 2 kappa): mu_z and log sigma_z
        )

    def forward(self, x):
        mu_z, log_sigma_z = self.net(x).chunk(2, dim=1)
        return mu_z, log_sigma_z, log_sigma_z.exp()


class WaeDecoder(nn.Module):
    def __init__(self, channels, size, latent_dim):
        super().__init__()
        def block(i, o):
            return [glorot(nn.ConvTranspose2d(i, o, 5, 2, 2, output_padding=1)), bn(o), nn.ReLU()]
        self.net = nn.Sequential(
            glorot(nn.Linear(latent_dim, 1024 * 8 * 8)), nn.ReLU(),  # no BN here in the authors' code
            nn.Unflatten(1, (1024, 8, 8)),                         # (B, 1024, 8, 8)
            *block(1024, 512),                                     # (B, 512, 16, 16)
            *block(512, 256),                                      # (B, 256, 32, 32)
            *block(256, 128),                                      # (B, 128, 64, 64)
            glorot(nn.ConvTranspose2d(128, channels, 5, 1, 2)), nn.Sigmoid(),  # (B, 3, 64, 64)
        )

    def forward(self, z):
        return self.net(z)


class VAE(nn.Module):
    """Encoder, decoder and the decoder's scalar log standard deviation loggamma_x (init 0, no clamp:
    Theorem 3 says it should be free to go to -infinity)."""

    def __init__(self, arch="infogan", channels=1, size=28, latent_dim=64, loss="learned-gamma"):
        super().__init__()
        if arch == "wae" and (channels, size) != (3, 64):
            die(f"--arch wae is defined for 64x64 RGB images (celeba), not {channels}x{size}x{size}; fix: use --arch infogan")
        enc, dec = {"infogan": (InfoganEncoder, InfoganDecoder), "wae": (WaeEncoder, WaeDecoder)}[arch]
        self.latent_dim = latent_dim  # kappa
        self.encoder = enc(channels, size, latent_dim)
        self.decoder = dec(channels, size, latent_dim)
        # the fixed-gamma and cross-entropy baselines (Table 1) keep it at 0 and do not train it
        self.loggamma_x = nn.Parameter(torch.zeros(()), requires_grad=(loss == "learned-gamma"))


def build_model(config):
    channels, size = SHAPES[config["data"]]
    model = VAE(config["arch"], channels, size, config["latent_dim"], config["loss"])
    for layer in model.modules():  # --bn-momentum; runs saved before the flag existed have the authors' 0.001
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.momentum = config.get("bn_momentum", STAGE1_DEFAULTS["bn_momentum"])
    return model


# ----------------------------------------------------------------------------------------------
# Loss: the negative ELBO of eq. (2) for one image, its terms summed over pixels / latent
# dimensions, then averaged over the batch, as the authors' code does (docs/protocol.md, "Loss").

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


# Exercise 1: -log p(x|z) of the Gaussian decoder with a learned gamma (Definition 1, eq. (8))
def gaussian_nll(x, x_hat, loggamma):
    """-log N(x | x_hat, gamma_x^2 I) for each example of a batch, gamma_x = exp(loggamma) a STANDARD
    DEVIATION: |x - x_hat|^2 / (2 gamma_x^2) + d (loggamma + log(2 pi) / 2), d the number of values
    in one example (C x H x W: channels count, x[0].numel()).
    With the paper's gamma = gamma_x^2 (a variance) this is half of eq. (8)'s -2 log p(x|z), for one
    z: |x - x_hat|^2 / (2 gamma) + d/2 log(2 pi gamma). Not bounded below: as gamma -> 0 with the
    error shrinking along with it, it falls without limit (Theorems 2 and 3; with the error held
    fixed it would rise instead, footnote 4), so a negative loss is expected. Shapes: x, x_hat (B,
    ...), loggamma a scalar tensor -> (B,)."""
    d = x[0].numel()
    sq = (x - x_hat).square().flatten(1).sum(1)
    return sq * torch.exp(-2 * loggamma) / 2 + d * (loggamma + HALF_LOG_2PI)


def bernoulli_nll(x, x_hat):
    """Cross-entropy decoder of Table 1's first VAE row, "VAE (Cross-entr.)"; logs clamped at 1e-8 as in the authors' code."""
    eps = 1e-8
    return -(x * x_hat.clamp_min(eps).log() + (1 - x) * (1 - x_hat).clamp_min(eps).log()).flatten(1).sum(1)


# Exercise 2: the KL term of eq. (2) against N(0, I) (twice it is eq. (9)'s terms, minus kappa)
def kl_standard_normal(mu, log_sigma):
    """KL[N(mu, diag sigma^2) || N(0, I)] for each example: sum over dimensions of
    (mu^2 + sigma^2 - 2 log sigma - 1) / 2; twice it is eq. (9)'s trace[Sigma_z] + |mu_z|^2 -
    log|Sigma_z|, minus the constant kappa that eq. (9) drops. log_sigma is the log of the standard
    deviation, as the authors write it (the log-variance is 2 log_sigma; the same KL written in a
    log-variance gives the same number). Shapes: (B, kappa) -> (B,)."""
    return ((mu.square() + torch.exp(2 * log_sigma) - 2 * log_sigma - 1) / 2).sum(1)


# Exercise 3: the reparameterised draw z ~ N(mu, diag sigma^2) (Section 1; Kingma & Welling 2014)
def reparameterize(mu, sigma):
    """z = mu + sigma * eps, eps ~ N(0, I): one draw per row, differentiable in mu and sigma, so
    the gradient of eq. (2)'s expectation reaches the encoder. sigma a standard deviation, of
    mu's shape; z has that shape too."""
    return mu + sigma * torch.randn_like(mu)


# Exercise 4: the stage-1 loss, eq. (2) with Definition 1's Gaussian decoder, averaged over a batch
def stage1_loss(model, x, loss="learned-gamma"):
    """(loss, rec, kl) for a float batch x in [0, 1], each a batch MEAN of per-image sums (rec over
    pixels, kl over latent dimensions); one z ~ q(z|x) per image. loss: 'learned-gamma' or
    'fixed-gamma' (the Gaussian decoder with model.loggamma_x), or 'cross-entropy'. The model's
    parts: model.encoder(x) -> (mu_z, log_sigma_z, sigma_z), each (B, kappa); model.decoder(z) ->
    x_hat, the decoder's mean, shaped as x."""
    mu_z, log_sigma_z, sigma_z = model.encoder(x)
    z = reparameterize(mu_z, sigma_z)
    x_hat = model.decoder(z)
    if loss == "cross-entropy":
        rec = bernoulli_nll(x, x_hat).mean()
    else:  # learned-gamma, or fixed-gamma where loggamma_x stays 0 (gamma = 1)
        rec = gaussian_nll(x, x_hat, model.loggamma_x).mean()
    kl = kl_standard_normal(mu_z, log_sigma_z).mean()
    return rec + kl, rec, kl


# ----------------------------------------------------------------------------------------------
# The training loop, shared with stage2.py (docs/protocol.md, "Optimisation"): Adam, a fresh
# permutation per epoch, the last partial batch dropped, the lr halved every --lr-epochs epochs,
# one log line and one atomic checkpoint per epoch, progress lines in between.

def lr_at(epoch, lr, lr_epochs):
    return lr * 0.5 ** (epoch // lr_epochs)  # authors' demo.py: halve every 150 (stage 1) / 300 (stage 2)


def make_optimizer(model, lr):
    params = [p for p in model.parameters() if p.requires_grad]
    # fused Adam: one kernel over all parameters instead of a Python loop per tensor (CPU and CUDA)
    return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=True)


def fit(model, opt, ckpt, data, batch_loss, path, loggamma_name, progress_every=15.0, forecast_after=5.0):
    """Train from ckpt['epoch'] to ckpt['config']['epochs'] epochs. data: a tuple of tensors whose
    first dimension indexes the examples; batch_loss(*batch) -> (loss, rec, kl) for one batch of
    each. Losses are summed on the device and read once per epoch: no host sync per step. After
    forecast_after seconds, one line says how long the run will take; then a progress line every
    progress_every seconds (wall time). loggamma_name: the model's parameter logged and checked
    each epoch ("loggamma_x" / "loggamma_z"). The bookkeeping (progress, checkpoints) is at the end."""
    reuse_freed_memory()  # speed only, no number changes (the plumbing at the end of this file)
    cfg = ckpt["config"]
    device = next(model.parameters()).device
    n, batch = len(data[0]), cfg["batch_size"]
    steps = n // batch
    if steps == 0:
        die(f"{n} examples is fewer than one batch of {batch}; fix: lower --batch-size"
            + (" or raise --limit" if cfg.get("limit") else ""))
    keep_start_snapshot(ckpt, path)
    progress = progress_printer(cfg, ckpt["epoch"], steps, device, progress_every, forecast_after)
    for epoch in range(ckpt["epoch"], cfg["epochs"]):
        t0 = time.time()
        for group in opt.param_groups:
            group["lr"] = lr_at(epoch, cfg["lr"], cfg["lr_epochs"])
        model.train()
        totals = torch.zeros(3, device=device)
        perm = torch.randperm(n, device=device)
        for i in range(steps):
            idx = perm[i * batch:(i + 1) * batch]
            loss, rec, kl = batch_loss(*(t[idx] for t in data))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            totals += torch.stack([loss.detach(), rec.detach(), kl.detach()])
            progress(epoch, i)
        means = (totals / steps).tolist()  # loss, rec, kl: the one host sync of the epoch
        end_epoch(model, opt, ckpt, path, loggamma_name, epoch, means, time.time() - t0, steps * batch)


# ----------------------------------------------------------------------------------------------
# Between the stages (docs/protocol.md, "Between the stages"): encode the whole training split
# once, BatchNorm in EVALUATION mode, and keep q(z|x) = N(mu_z, sigma_z^2) for stage 2.

# Exercise 5: the latents for stage 2, BatchNorm in evaluation mode (Section 4, step 1)
@torch.inference_mode()
def encode(model, images, batch=1000):
    """(mu_z, sigma_z) of uint8 images (N, C, H, W): two float32 numpy arrays (N, kappa), the
    encoder's q(z|x) with BatchNorm's running statistics, so an image's code does not depend on
    the other images of its batch (the authors' extract_posterior; Section 4 says nothing of
    BatchNorm). sigma_z a standard deviation. Section 4's step 1 draws z(i) ~ q(z|x(i)); we keep
    q(z|x) itself, so that stage 2 can draw a fresh z for every batch (stage2.fresh_z). The encoder
    takes floats in [0, 1] (uint8 / 255, as in training); `batch` images go through it at a time,
    which bounds memory and, in evaluation mode, changes no number. Images may be on the CPU, the
    model anywhere; the arrays come back on the CPU, the model left in evaluation mode.
    model.encoder(x) -> (mu_z, log_sigma_z, sigma_z), each (B, kappa)."""
    model.eval()
    device = next(model.parameters()).device
    mus, sigmas = [], []
    for i in range(0, len(images), batch):
        mu_z, _, sigma_z = model.encoder(images[i:i + batch].to(device).float() / 255)
        mus.append(mu_z.float().cpu())
        sigmas.append(sigma_z.float().cpu())
    return torch.cat(mus).numpy(), torch.cat(sigmas).numpy()


@torch.inference_mode()
def reconstruct(model, images, batch=500):
    """x_hat(z), z ~ q(z|x), of uint8 images (N, C, H, W), BatchNorm in evaluation mode: Theorem 4
    says these approach x as gamma -> 0 whatever the draw; the images behind a 'reconstruction FID'
    (docs/protocol.md, "Sampling"). float (N, C, H, W) in [0, 1], CPU."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(images), batch):
        mu_z, _, sigma_z = model.encoder(images[i:i + batch].to(device).float() / 255)
        out.append(model.decoder(reparameterize(mu_z, sigma_z)).float().cpu())
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------
# main: train, then encode

def main(argv=None):
    args = parse_args(argv)
    out = args.out or os.path.join("runs", args.data or STAGE1_DEFAULTS["data"])
    path = os.path.join(out, "stage1.pt")
    defaults = dict(STAGE1_DEFAULTS, epochs=CIFAR10_EPOCHS[0]) if args.data == "cifar10" else STAGE1_DEFAULTS
    ckpt = start_or_resume(args, path, defaults)
    cfg = ckpt["config"]
    if cfg["batch_size"] < 2:  # training-mode BatchNorm divides by the batch's variance
        die(f"--batch-size {cfg['batch_size']}: BatchNorm needs at least 2 images a batch; fix: pass --batch-size 2 or more")
    if cfg["arch"] == "wae" and cfg["data"] != "celeba":  # before the data are read (VAE() checks the shape again)
        die(f"--arch wae is defined for 64x64 RGB images (celeba), not {cfg['data']}; fix: use --arch infogan")
    check_out_folder(out)
    torch.manual_seed(cfg["seed"])

    images = load_images(cfg["data"], args.data_root, train=True)
    if cfg["limit"]:
        images = images[:cfg["limit"]]
    images = images.to(args.device)  # the whole split on the device as uint8: 47 MB for MNIST
    print(f"stage 1 | {cfg['data']} {tuple(images.shape)} | {cfg['arch']} | {cfg['loss']} | kappa {cfg['latent_dim']} | "
          f"{cfg['epochs']} epochs | device {args.device} | out {out}", flush=True)

    model = build_model(cfg).to(args.device)
    opt = make_optimizer(model, cfg["lr"])
    restore(ckpt, model, opt)
    fit(model, opt, ckpt, (images,), lambda x: stage1_loss(model, x.float() / 255, cfg["loss"]), path, "loggamma_x")

    t0 = time.time()
    mu_z, sigma_z = encode(model, images)
    print(f"encoded {len(images)} images in {time.time() - t0:.1f} s", flush=True)
    save_atomic(mu_z, os.path.join(out, "mu_z.npy"))
    save_atomic(sigma_z, os.path.join(out, "sigma_z.npy"))
    save_reconstructions(model, images, os.path.join(out, "stage1_recon.png"))
    # Theorem 4's analysis (Section 3 after eq. (9), Figure 1b): an encoder variance near 0 marks a
    # dimension the decoder uses, near 1 one it ignores; their count estimates eq. (9)'s r-hat, which is
    # r at the optimum (text copies of the paper lose the hat); the 0.5 cut-off is ours.
    # Sigma_z is diagonal here, so Figure 1b's eigenvalues lambda_j are sigma_z^2, averaged over the split
    summary = {"run_id": cfg["run_id"], "epoch": ckpt["epoch"],
               "loggamma_x": None if cfg["loss"] == "cross-entropy" else model.loggamma_x.item(),  # no gamma there
               "active_dims": int((np.mean(sigma_z ** 2, 0) < 0.5).sum())}
    # latents.json says which checkpoint the latents come from: stage2.py refuses latents older than stage1.pt
    save_atomic(summary, os.path.join(out, "latents.json"))
    print("done | " + json.dumps(summary), flush=True)


# The authors' protocol (their demo.py) as defaults (docs/protocol.md): flags that define a run, fixed at its start.
STAGE1_DEFAULTS = {"data": "mnist", "epochs": 400, "lr": 1e-4, "lr_epochs": 150, "batch_size": 64, "seed": 0,
                   "arch": "infogan", "loss": "learned-gamma", "latent_dim": 64, "limit": 0, "bn_momentum": 0.001}
# The default (stage 1, stage 2) epochs for cifar10: Table 1's CIFAR-10 column trained longer than demo.py's
# 400 + 800 (the authors, on their issue tracker; docs/protocol.md, "Budgets beyond the defaults").
CIFAR10_EPOCHS = (1000, 2000)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Stage 1: the learned-gamma VAE (Dai & Wipf 2019).",
                                formatter_class=HelpWithDefaults)
    common_flags(p, STAGE1_DEFAULTS, CIFAR10_EPOCHS[0])
    p.add_argument("--data-root", default=os.environ.get(DATA_ENV, "./data"),
                   help=f"torchvision data root; files are downloaded there if absent (env {DATA_ENV})")
    p.add_argument("--arch", choices=["infogan", "wae"],
                   help="'infogan': Table 1's neutral architecture; 'wae': Table 2's, celeba only, trained there for "
                        "the WAE paper's epochs: pass --epochs (default: infogan)")
    p.add_argument("--loss", choices=["learned-gamma", "fixed-gamma", "cross-entropy"],
                   help="decoder likelihood: Table 1's rows 'VAE learned gamma', 'fixed gamma', 'cross-entropy' (default: learned-gamma)")
    p.add_argument("--latent-dim", type=int, help="kappa, the latent size (default: 64, the paper's for every data set)")
    p.add_argument("--limit", type=int, help="train on the first N training images only (default: 0, all)")
    p.add_argument("--bn-momentum", type=float,
                   help="BatchNorm's running averages, used to encode and to sample, forget with a time constant of "
                        "1/momentum steps; a short run at a high --lr needs a shorter memory, e.g. 0.01 (course/README.md) "
                        "(default: 0.001, the authors' TF decay 0.999)")
    return p.parse_args(argv)


# ==============================================================================================
# Plumbing, not in the paper: errors, memory, RNG, checkpoints, atomic writes, flags, files.

def die(msg):
    """A clear one-line error and a non-zero exit (every output here is written atomically, so a
    stop leaves no half-written file)."""
    raise SystemExit(f"{os.path.basename(sys.argv[0]) or 'twostage'}: error: {msg}")


def reuse_freed_memory():
    """glibc hands a freed block of more than 128 KB (up to 32 MB, adaptively) back to the OS, so the
    25 MB weight gradients that zero_grad(set_to_none=True) frees (MNIST's dense layer) come back as
    fresh pages every step.
    Raising the mmap and trim thresholds keeps freed blocks in the heap for reuse (the page faults
    and the time saved: results/README.md, "Speed").
    The same as MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=2147483647 in the environment.
    A no-op off glibc Linux; it changes no number, only where memory comes from."""
    if platform.system() != "Linux":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 << 20)       # M_MMAP_THRESHOLD: glibc's largest allowed, 32 MB
        libc.mallopt(-1, 2 ** 31 - 1)    # M_TRIM_THRESHOLD: never shrink the heap
    except (OSError, AttributeError):    # musl and other C libraries: leave them be
        pass


def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(name):
    """--device, refused in one line when torch does not know it or this machine cannot run it."""
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        die(f"--device {name} is not a device these scripts run on; fix: pass --device cpu or --device cuda")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        die(f"--device {name}: torch sees {torch.cuda.device_count()} CUDA GPU(s) on this machine; "
            f"fix: pass --device cpu{', or cuda:0 to cuda:' + str(torch.cuda.device_count() - 1) if torch.cuda.device_count() else ''}")
    return name


def check_out_folder(out):
    """--out, checked before the data are read, without making it (a run that stops at the data
    leaves nothing behind): a file in the way, or a folder this process cannot write into, is one
    line now rather than a traceback at the first checkpoint."""
    parent = os.path.abspath(out)
    while not os.path.exists(parent):  # the nearest part of the path that exists: the folders below it get made
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        die(f"cannot make the folder --out {out}: {parent} is a file; fix: pass another --out")
    if not os.access(parent, os.W_OK | os.X_OK):
        die(f"cannot write into {parent} for --out {out}; fix: pass another --out")


def rng_state():
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state["cuda"]:  # resumed on fewer GPUs: the ones there are
        torch.cuda.set_rng_state_all(state["cuda"][:torch.cuda.device_count()])


@contextlib.contextmanager
def atomic_write(path):
    """with atomic_write(path) as tmp: write to tmp; at the end of the block tmp is renamed to path,
    so a kill mid-write never leaves a broken file. Its folder is made if missing. A failed write
    leaves no temporary behind (a 160 MB checkpoint on a full disk) and stops in one line."""
    path = str(path)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        yield tmp
    except BaseException as e:  # a full disk, a read-only folder, a kill
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):
            die(f"cannot write {path} ({type(e).__name__}: {e}); fix: free disk space or choose another output folder")
        raise
    os.replace(tmp, path)


def save_atomic(obj, path):
    """obj to path through atomic_write. .json: a small record; .npz: a dict of arrays (np.savez); a
    numpy array: .npy; anything else: torch.save."""
    path = str(path)
    with atomic_write(path) as tmp:
        if path.endswith(".json"):
            with open(tmp, "w") as f:
                json.dump(obj, f, indent=1)
        elif path.endswith(".npz"):
            with open(tmp, "wb") as f:  # a file object, or np.savez would append ".npz" to the name
                np.savez(f, **obj)
        elif isinstance(obj, np.ndarray):
            with open(tmp, "wb") as f:
                np.save(f, obj)
        else:
            torch.save(obj, tmp)


def copy_atomic(src, dst):
    """A copy of src through atomic_write: a kill never leaves half a file to trip the next run."""
    with atomic_write(dst) as tmp:
        shutil.copyfile(src, tmp)


def link_atomic(src, dst):
    """dst becomes a second name of the file src (a hard link; a copy where the file system has
    none), through a temporary name. Safe because nothing here writes into an existing file:
    save_atomic writes a new one and renames it, so the next checkpoint leaves src as it was."""
    tmp = f"{dst}.{os.getpid()}.link"
    if os.path.lexists(tmp):  # left by a kill right here: another name of an older file, never write into it
        os.remove(tmp)
    try:
        os.link(src, tmp)
    except OSError:  # FAT, some network shares
        copy_atomic(src, dst)
        return
    os.replace(tmp, dst)


def versions():
    return {"torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version()}


def fmt_time(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def snapshot_path(path, epoch):
    return f"{os.path.splitext(path)[0]}_e{epoch:04d}.pt"  # kept copies of a checkpoint, e.g. for FID against epochs


def snapshot_epochs(cfg):
    return {int(e) for e in cfg.get("snapshots", "").split(",") if e.strip()}


def keep_start_snapshot(ckpt, path):
    """A snapshot epoch listed (--snapshots on --resume) only after that epoch was trained: copy it now."""
    cfg, start = ckpt["config"], ckpt["epoch"]
    if 0 < start < cfg["epochs"] and start in snapshot_epochs(cfg) and not os.path.exists(snapshot_path(path, start)):
        copy_atomic(path, snapshot_path(path, start))


def progress_printer(cfg, start, steps, device, progress_every, forecast_after):
    """progress(epoch, i), called after step i: once, after forecast_after seconds, the whole run's
    forecast; then a line every progress_every seconds. Wall time only, no sync (on a GPU it runs
    ahead by its queue); rates count from the end of an epoch's first step (allocations, kernel
    choices make it slow)."""
    batch, state = cfg["batch_size"], {"forecast_said": False}

    def progress(epoch, i):
        now = time.time()
        if i == 0:
            state["t1"] = state["last_print"] = now
            return
        if now - state["last_print"] < (progress_every if state["forecast_said"] else forecast_after) or i >= steps - 1:
            return
        state["last_print"] = now
        rate = i / max(now - state["t1"], 1e-9)  # steps per second in this epoch, after its first step
        if not state["forecast_said"]:
            state["forecast_said"] = True
            total, left = (cfg["epochs"] - start) * steps / rate, cfg["epochs"] - start
            print(f"speed: {rate * batch:.0f} img/s, so an epoch takes about {fmt_time(steps / rate)} and "
                  f"{'these ' + str(left) + ' epochs' if left > 1 else 'the run'} about {fmt_time(total)} on {device.type}"
                  + ("; for a shorter run pass --epochs N" if total > 3600 else ""), flush=True)
        else:
            run_left = (steps - i - 1 + (cfg["epochs"] - epoch - 1) * steps) / rate
            print(f"  epoch {epoch + 1}/{cfg['epochs']} | step {i + 1}/{steps} | {rate * batch:.0f} img/s | "
                  f"epoch ETA {fmt_time((steps - i - 1) / rate)} | run ETA {fmt_time(run_left)}", flush=True)
    return progress


def end_epoch(model, opt, ckpt, path, loggamma_name, epoch, means, seconds, images):
    """After an epoch: refuse a diverged run (the checkpoint keeps the last good epoch), record the
    epoch's mean loss terms, write the snapshot (if listed) and then the checkpoint, both
    atomically, and print the epoch's line."""
    cfg, (loss, rec, kl), loggamma = ckpt["config"], means, getattr(model, loggamma_name)
    if not all(math.isfinite(v) for v in means) or not torch.isfinite(loggamma).item():
        kept = f"{path} still holds epoch {ckpt['epoch']}" if ckpt["epoch"] else "nothing was saved"
        die(f"training diverged in epoch {epoch + 1} (loss {loss}, {loggamma_name} {loggamma.item()}); "
            f"{kept}; fix: start afresh in a new --out with a lower --lr or another --seed")
    ckpt["history"].append({"epoch": epoch + 1, "loss": loss, "rec": rec, "kl": kl,
                            loggamma_name: loggamma.item(), "lr": opt.param_groups[0]["lr"], "seconds": seconds})
    ckpt.update(epoch=epoch + 1, model=model.state_dict(), optimizer=opt.state_dict(), rng=rng_state())
    if epoch + 1 in snapshot_epochs(cfg):  # the snapshot first (a kill in between must not lose it), then
        save_atomic(ckpt, snapshot_path(path, epoch + 1))  # the checkpoint as a link to it: one write
        link_atomic(snapshot_path(path, epoch + 1), path)
    else:
        save_atomic(ckpt, path)
    gamma = {"fixed-gamma": f"{loggamma_name} 0 (fixed)", "cross-entropy": "no gamma (cross-entropy)"}.get(
        cfg.get("loss"), f"{loggamma_name} {loggamma.item():.4f}")  # stage 2 has no --loss: learned
    print(f"epoch {epoch + 1}/{cfg['epochs']} | loss {loss:.2f} | rec {rec:.2f} | kl {kl:.2f} | "
          f"{gamma} | {images / seconds:.0f} img/s | "
          f"ETA {fmt_time(seconds * (cfg['epochs'] - epoch - 1))}", flush=True)


def load_checkpoint(path, keys=None):
    """The checkpoint dict, on the CPU (RNG states must stay CPU tensors; load_state_dict moves the
    rest to the model's device), or None if there is none. With keys (e.g. ("config", "epoch")):
    only those entries, read through a memory map of the file instead of reading it whole, so a
    look at a stage-1 checkpoint's config, epoch or history costs milliseconds instead of 160 MB
    (stage2.py, results/table1.py, course/experiments.py); the map goes with the rest of the dict."""
    if not os.path.exists(path):
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=keys is not None)
    except Exception as e:
        # a kept snapshot saves the epochs up to it (not the same file: at a snapshot epoch the checkpoint is its link)
        snapshots = [s for s in sorted(glob.glob(f"{os.path.splitext(path)[0]}_e[0-9]*.pt")) if not os.path.samefile(s, path)]
        keep = f"copy its newest snapshot, {snapshots[-1]}, over it to continue from there (--resume), or " if snapshots else ""
        die(f"cannot read checkpoint {path} ({type(e).__name__}: {e}); fix: {keep}delete it and start again without --resume")
    if not isinstance(ckpt, dict) or not all(k in ckpt for k in keys or ()):
        what = "is not a dict" if not isinstance(ckpt, dict) else f"has no {', '.join(k for k in keys if k not in ckpt)} entry"
        die(f"{path} {what}: not a checkpoint of this version of these scripts; fix: pass the --out of a run they "
            f"wrote, or start a new run in another --out")
    return ckpt if keys is None else {k: ckpt[k] for k in keys}


def restore(ckpt, model, opt):
    """Model, optimiser and RNG exactly as they were after ckpt['epoch'] epochs: a resumed CPU run
    ends with the same parameters as an uninterrupted one (test_smoke.py checks it)."""
    if ckpt["epoch"] > 0:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        set_rng_state(ckpt["rng"])
        print(f"resumed at epoch {ckpt['epoch']}", flush=True)


def start_or_resume(args, path, defaults):
    """The checkpoint dict to train from: a fresh one (the flags, the protocol's defaults where a flag
    is not given), or the one in --out when --resume. A resumed run keeps its own settings: a flag
    that would change one of them is refused, not silently ignored. --epochs and --snapshots may change."""
    ckpt = load_checkpoint(path) if args.resume else None
    if args.resume and ckpt is None:
        die(f"--resume: no checkpoint at {path}; fix: run without --resume to start, or pass the right --out")
    if ckpt is None:
        if os.path.exists(path):
            die(f"{path} exists; fix: pass --resume to continue it, or another --out (or delete it) to start afresh")
        config = {k: v for k, v in vars(args).items() if k not in ("resume", "device")}
        config.update({k: v for k, v in defaults.items() if config.get(k) is None})
        config["run_id"] = uuid.uuid4().hex  # lets stage 2 and sampling check they belong to this run
        ckpt = {"config": config, "epoch": 0, "history": [], "versions": versions()}
    else:
        cfg = ckpt["config"]
        # a key a run older than its flag lacks: that run had the default
        changed = [f"--{k.replace('_', '-')} {getattr(args, k)} (the run's: {cfg.get(k, defaults[k])})" for k in defaults
                   if k != "epochs" and getattr(args, k, None) is not None and getattr(args, k) != cfg.get(k, defaults[k])]
        if changed:
            die(f"--resume keeps the run's settings, but {', '.join(changed)} would change them; "
                f"fix: drop {'those flags' if len(changed) > 1 else 'that flag'}, or start a new run in another --out")
        if args.epochs is not None and args.epochs < ckpt["epoch"]:
            die(f"--epochs {args.epochs} is below the {ckpt['epoch']} epochs {path} has already trained; "
                f"fix: pass --epochs {ckpt['epoch']} or more (or use its snapshots stage<k>_eNNNN.pt, if kept)")
        if args.epochs is not None:  # extending a run: the lr schedule depends on the epoch only
            cfg["epochs"] = args.epochs
        if args.snapshots:
            cfg["snapshots"] = args.snapshots
    cfg = ckpt["config"]
    for k in ("epochs", "batch_size", "lr_epochs", "latent_dim", "width", "depth"):  # width, depth: stage 2's MLP
        if k in cfg and cfg[k] < 1:
            die(f"--{k.replace('_', '-')} {cfg[k]}: must be at least 1")
    if not cfg["lr"] > 0:
        die(f"--lr {cfg['lr']}: must be above 0")
    if cfg.get("limit", 0) < 0:
        die(f"--limit {cfg['limit']}: must be 0 (all images) or more")
    if not 0 < cfg.get("bn_momentum", 0.001) <= 1:
        die(f"--bn-momentum {cfg['bn_momentum']}: must be in (0, 1] (the authors': 0.001)")
    check_device(args.device)
    return ckpt


def _idx_images(data, root, train):
    """MNIST's or Fashion-MNIST's images where torchvision keeps them (<root>/MNIST/raw/
    train-images-idx3-ubyte, t10k-... for the test split), or None if the file is not there. The idx
    format: magic 2051 (unsigned bytes, 3 dimensions), then N, rows, columns as big-endian int32,
    then the pixels, row by row. The same tensor as torchvision's MNIST(...).data (test_smoke.py),
    without importing torchvision: that takes 2-3 s on a 2-core CPU, much of it torch._dynamo, which
    a training run's optimizer imports anyway, but sample.py and fid.py do not."""
    if data not in ("mnist", "fashion"):
        return None
    path = os.path.join(root, FOLDERS[data], f"{'train' if train else 't10k'}-images-idx3-ubyte")
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        header = f.read(16)
        pixels = np.fromfile(f, np.uint8)
    magic, n, rows, cols = map(int, np.frombuffer(header, ">i4")) if len(header) == 16 else (0, 0, 0, 0)
    if magic != 2051 or pixels.size != n * rows * cols:
        die(f"{path} is not a whole idx image file ({len(header) + pixels.size} bytes); "
            f"fix: delete it, and torchvision downloads it again")
    return torch.from_numpy(pixels.reshape(n, 1, rows, cols))


def _torchvision_images(data, root, train, download):
    import torchvision.datasets as tvd
    if data == "celeba":
        if download:  # torchvision fetches CelebA from Google Drive; then we crop and resize it
            tvd.CelebA(root, split="train" if train else "test", target_type=[], download=True)
        return torch.from_numpy(_celeba(root, train)).permute(0, 3, 1, 2)
    cls = {"mnist": tvd.MNIST, "fashion": tvd.FashionMNIST, "cifar10": tvd.CIFAR10}[data]
    ds = cls(root, train=train, download=download)
    if data == "cifar10":  # numpy (N, 32, 32, 3)
        return torch.from_numpy(ds.data).permute(0, 3, 1, 2)
    return ds.data.unsqueeze(1)  # MNIST / Fashion: torch uint8 (N, 28, 28) -> (N, 1, 28, 28)


def _celeba(root, train):
    """The authors' CelebA (their preprocess.py): crop rows 45:173, cols 25:153 (128x128) of the
    aligned 178x218 image, resize to 64x64 bilinearly. Decoding 160k JPEGs takes minutes, so the
    result is cached once as .npy beside the images."""
    from PIL import Image
    from torchvision.datasets import CelebA
    split = "train" if train else "test"
    ds = CelebA(root, split=split, target_type=[], download=False)
    cache = os.path.join(root, "celeba", f"twostage_crop128_64x64_{split}.npy")
    if os.path.exists(cache):
        return np.load(cache)
    images = np.empty((len(ds.filename), 64, 64, 3), np.uint8)
    for i, name in enumerate(ds.filename):  # JPEG decoding is per file: no way around a loop here
        jpeg = os.path.join(root, "celeba", "img_align_celeba", name)
        try:
            with Image.open(jpeg) as im:
                images[i] = np.asarray(im.convert("RGB").crop((25, 45, 153, 173)).resize((64, 64), Image.BILINEAR))
        except OSError as e:  # PIL's error for a truncated or corrupt file
            die(f"cannot decode {jpeg} ({e}); fix: fetch CelebA's img_align_celeba again")
    save_atomic(images, cache)
    return images


def save_grid(images, path, nrow=16):
    """images: float (N, C, H, W) in [0, 1] -> a PNG of nrow images a row, 1-pixel black lines
    around each, as torchvision's save_image(..., padding=1) draws it (test_smoke.py) without the
    2-3 s import of torchvision; one channel stays grey. Written through atomic_write."""
    from PIL import Image  # Pillow: torchvision's dependency
    n, c, h, w = images.shape
    rows, cols = -(-n // min(nrow, n)), min(nrow, n)
    pixels = images.float().cpu().mul(255).add(0.5).clamp(0, 255).to(torch.uint8)  # save_image's rounding
    if n == 1:  # torchvision's make_grid: one image, no lines
        grid = pixels[0]
    else:
        grid = torch.zeros(c, rows * (h + 1) + 1, cols * (w + 1) + 1, dtype=torch.uint8)
        for i in range(n):
            y, x = divmod(i, cols)
            grid[:, 1 + y * (h + 1):(y + 1) * (h + 1), 1 + x * (w + 1):(x + 1) * (w + 1)] = pixels[i]
    with atomic_write(path) as tmp:
        Image.fromarray(grid[0].numpy() if c == 1 else grid.permute(1, 2, 0).numpy()).save(tmp, format="PNG")


def save_reconstructions(model, images, path, n=16):
    x = images[:n]  # fewer than n with a small --limit: one row of data above one of reconstructions
    save_grid(torch.cat([x.float().cpu() / 255, reconstruct(model, x)]), path, nrow=len(x))


def epoch_list(text):
    if not all(e.strip().isdigit() and int(e) >= 1 for e in text.split(",") if e.strip()):
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of epochs; fix: e.g. --snapshots 5,10,20")
    return text


class HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """--help appends each flag's default, unless its help already says it."""

    def _get_help_string(self, action):
        return action.help if "(default" in (action.help or "") else super()._get_help_string(action)


def common_flags(p, defaults, cifar10_epochs):
    """Flags both stages share. Those that define a run default to None here and take the paper's
    value (defaults) when a run starts, so that --resume can tell a flag given from one left out."""
    d = defaults
    p.add_argument("--data", choices=sorted(SHAPES), help="data set (default: mnist; on --resume: the run's)")
    p.add_argument("--out", default=None, help="run directory (default: runs/<data>)")
    p.add_argument("--epochs", type=int, help=f"total epochs (default: {d['epochs']}, the authors'; {cifar10_epochs} "
                   "for cifar10, as in Table 1; on --resume: the run's)")
    p.add_argument("--lr", type=float, help=f"Adam learning rate (default: {d['lr']:g}, the authors')")
    p.add_argument("--lr-epochs", type=int, help=f"halve the lr every this many epochs (default: {d['lr_epochs']}, the authors')")
    p.add_argument("--batch-size", type=int, help=f"batch size (default: {d['batch_size']}, the authors')")
    p.add_argument("--seed", type=int, help=f"random seed; a CPU run with the same seed is repeatable (default: {d['seed']})")
    p.add_argument("--device", default=default_device(), help="cuda or cpu (default: cuda when present)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its checkpoint, with its own settings: only --epochs and "
                        "--snapshots may change (other run-defining flags are refused)")
    p.add_argument("--snapshots", default="", type=epoch_list,
                   help="comma-separated epochs after which to keep a copy of the checkpoint as stage<k>_e<epoch>.pt "
                        "(default: none; with --resume: replaces the run's list)")


if __name__ == "__main__":
    main()
