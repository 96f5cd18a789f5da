"""Stage 2 of the Two-Stage VAE (Dai & Wipf 2019, Section 4): a second VAE fitted to stage 1's
latents. Stage 1's aggregate posterior q(z) is not N(0, I) (eq. 10: with r < d the decoder does not
learn the ground-truth measure, so q(z) need not match the prior), but it lives on all of R^kappa
with r = d = kappa, the regime of Theorem 1 where a VAE CAN match the distribution. So a small VAE with latent u learns q(z), and sampling goes u -> z -> x (sample.py).

    python stage2.py --data mnist              # the paper's protocol: 800 epochs, batch 64, Adam 1e-4
    python stage2.py --data mnist --epochs 50  # a CPU-sized run
    python stage2.py --bench                   # time the training step (see README, "Speed")

Reads runs/<data>/mu_z.npy and sigma_z.npy (written by stage1.py) and writes runs/<data>/stage2.pt.
Each batch draws FRESH z = mu_z + sigma_z * eps, not one fixed sample per image (reference.md).
"""
import argparse
import json
import os

import numpy as np
import torch
import torch.nn as nn

from stage1 import (bench, common_flags, die, fit, gaussian_nll, kl_standard_normal, load_checkpoint,
                    make_optimizer, restore, start_or_resume)


class MLP(nn.Module):
    """depth x [dense width, ReLU], then the input concatenated back in before the output layers,
    as in the authors' build_encoder2 / build_decoder2. Dense layers start as TF's default
    (Glorot-uniform weights, zero biases), not PyTorch's; the encoder's mu_u and log sigma_u layers
    are one 2-kappa layer here, whose Glorot bound is 3 % smaller than two kappa layers'."""

    def __init__(self, dim, width, depth, outputs):
        super().__init__()
        layers, d = [], dim
        for _ in range(depth):
            layers += [nn.Linear(d, width), nn.ReLU()]  # (B, width)
            d = width
        self.hidden = nn.Sequential(*layers)
        self.out = nn.Linear(dim + width, outputs * dim)  # on concat[input, h]: (B, dim + width)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, t):
        return self.out(torch.cat([t, self.hidden(t)], dim=1))


class Stage2VAE(nn.Module):
    """q(u|z) = N(mu_u, diag sigma_u^2), p(z|u) = N(z_hat(u), gamma_z^2 I). No BatchNorm."""

    def __init__(self, latent_dim=64, width=1024, depth=3):
        super().__init__()
        self.encoder = MLP(latent_dim, width, depth, outputs=2)  # -> mu_u, log sigma_u
        self.decoder = MLP(latent_dim, width, depth, outputs=1)  # -> z_hat (linear output)
        # a standard deviation like stage 1's loggamma_x, init 0. Here d = r = kappa, so there is no
        # (d - r) log gamma term pushing it to -infinity (Section 4): it settles at a finite value.
        self.loggamma_z = nn.Parameter(torch.zeros(()))

    def encode(self, z):
        mu_u, log_sigma_u = self.encoder(z).chunk(2, dim=1)
        return mu_u, log_sigma_u


def build_model(config):
    return Stage2VAE(config["latent_dim"], config["width"], config["depth"])


def stage2_loss(model, z):
    """The same negative ELBO as stage 1 (eq. 2), with z in place of x and u in place of z."""
    mu_u, log_sigma_u = model.encode(z)
    u = mu_u + log_sigma_u.exp() * torch.randn_like(mu_u)
    z_hat = model.decoder(u)
    rec = gaussian_nll(z, z_hat, model.loggamma_z).mean()
    kl = kl_standard_normal(mu_u, log_sigma_u).mean()
    return rec + kl, rec, kl


def load_latents(out, stage1):
    """mu_z, sigma_z from stage 1, checked: a clear error names the file and the command that makes it."""
    make = f"run `python stage1.py --out {out}` first (it writes them when training ends)"
    record = os.path.join(out, "latents.json")
    source = json.load(open(record)) if os.path.exists(record) else None
    if source != {"run_id": stage1["config"]["run_id"], "epoch": stage1["epoch"]}:
        die(f"{record} says the latents come from {source}, not from stage1.pt (epoch {stage1['epoch']}); "
            f"fix: finish the stage-1 run: `python stage1.py --out {out} --resume`")
    arrays = []
    for name in ("mu_z", "sigma_z"):
        path = os.path.join(out, f"{name}.npy")
        if not os.path.exists(path):
            die(f"{path} is missing; fix: {make}")
        try:
            a = np.load(path)
        except Exception as e:
            die(f"{path} is not a readable .npy ({type(e).__name__}); fix: {make}")
        if a.ndim != 2 or a.shape[0] < 2 or not np.issubdtype(a.dtype, np.floating):
            die(f"{path} has shape {a.shape} and dtype {a.dtype}, expected float (n, kappa); fix: {make}")
        if not np.isfinite(a).all():
            die(f"{path} holds NaN or inf; fix: {make}")
        arrays.append(a.astype(np.float32))
    mu_z, sigma_z = arrays
    if mu_z.shape != sigma_z.shape:
        die(f"mu_z {mu_z.shape} and sigma_z {sigma_z.shape} in {out} do not match; fix: {make}")
    if (sigma_z <= 0).any():
        die(f"{os.path.join(out, 'sigma_z.npy')} has sigma_z <= 0; fix: {make}")
    return mu_z, sigma_z


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Stage 2: a VAE on stage 1's latents (Dai & Wipf 2019).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common_flags(p, epochs=800, lr_epochs=300)
    p.add_argument("--width", type=int, default=1024, help="hidden units per dense layer (the authors': 1024)")
    p.add_argument("--depth", type=int, default=3, help="hidden dense layers in encoder and decoder (the authors': 3)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.bench:  # random latents of the right size: the step's speed does not depend on them
        cfg = {"latent_dim": 64, "width": args.width, "depth": args.depth}
        z = torch.randn(args.batch_size, 64, device=args.device)
        return bench(f"stage 2 | {args.depth} x {args.width} MLPs, batch {args.batch_size}, kappa 64",
                     lambda plain: build_model(cfg), stage2_loss, z, args.device)
    out = args.out or os.path.join("runs", args.data)
    path = os.path.join(out, "stage2.pt")
    stage1 = load_checkpoint(os.path.join(out, "stage1.pt"))
    if stage1 is None:
        die(f"{os.path.join(out, 'stage1.pt')} is missing; fix: run `python stage1.py --out {out}` first")
    mu_z, sigma_z = load_latents(out, stage1)
    ckpt = start_or_resume(args, path, defaults_epochs=800)
    cfg = ckpt["config"]
    cfg["latent_dim"] = mu_z.shape[1]
    # which stage-1 run these latents come from; sample.py refuses to mix runs
    source = {"run_id": stage1["config"]["run_id"], "epoch": stage1["epoch"], "data": stage1["config"]["data"]}
    if ckpt["epoch"] > 0 and ckpt["stage1"] != source:
        die(f"{path} was trained on stage-1 run {ckpt['stage1']}, but {out} now holds {source}; "
            f"fix: start stage 2 afresh (delete {path}) after re-running stage 1")
    ckpt["stage1"] = source
    torch.manual_seed(cfg["seed"])

    mu_z, sigma_z = torch.from_numpy(mu_z).to(args.device), torch.from_numpy(sigma_z).to(args.device)
    print(f"stage 2 | latents {tuple(mu_z.shape)} from stage-1 epoch {source['epoch']} | {cfg['epochs']} epochs | "
          f"device {args.device} | out {out}", flush=True)
    model = build_model(cfg).to(args.device)
    opt = make_optimizer(model, cfg["lr"])
    restore(ckpt, model, opt)

    def step(idx):
        z = mu_z[idx] + sigma_z[idx] * torch.randn_like(mu_z[idx])  # a fresh z ~ q(z|x) every batch
        return stage2_loss(model, z)

    fit(model, opt, ckpt, len(mu_z), step, path, "loggamma_z")
    print("done | " + json.dumps({"epoch": ckpt["epoch"], "loggamma_z": model.loggamma_z.item()}), flush=True)


if __name__ == "__main__":
    main()
