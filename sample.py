"""Draw images from a trained Two-Stage VAE (Dai & Wipf 2019, Section 4; docs/protocol.md, "Sampling").

    python sample.py --data mnist              # 2-stage: u ~ N(0, I), z = z_hat(u) + gamma_z eps, x = x_hat(z)
    python sample.py --data mnist --stage 1    # the baseline the paper beats: z ~ N(0, I), x = x_hat(z)
    python sample.py --data mnist --recon      # x_hat(z), z ~ q(z|x), for test images ('reconstruction FID'; stage 1 only)
    python fid.py --data mnist --samples runs/mnist/samples.npy

Writes to --out (default runs/<data>): samples.npy (2-stage), samples_stage1.npy (--stage 1),
samples_no_z_noise.npy (--no-z-noise) or recon.npy (--recon): float32 (N, C, H, W) in [0, 1], the
decoder MEAN (no pixel noise), plus a PNG grid of the first 100 beside each.
"""
import argparse
import os
import time

import numpy as np
import torch

import stage1
import stage2
from stage1 import DATA_ENV, die, load_checkpoint, save_atomic, save_grid


# Exercise 7: two-stage sampling u -> z -> x (Section 4, step 3)
@torch.inference_mode()
def generate(vae1, vae2, n, batch, device, z_noise=True):
    """n images (n, C, H, W) in [0, 1], batch by batch: u ~ N(0, I), z ~ p(z|u) = N(z_hat(u),
    gamma_z^2 I) with gamma_z = exp(vae2.loggamma_z) a standard deviation, x = x_hat(z), the decoder
    mean (the paper writes x ~ p(x|z); the authors take the mean: docs/protocol.md, "Sampling").
    vae2 None means one-stage sampling, z ~ N(0, I). z_noise False drops the gamma_z eps term
    (z = z_hat(u), the same u): a diagnostic, not the authors' rule. Returns one float tensor on
    the CPU. The models' parts: vae1.latent_dim (kappa), vae1.decoder(z) -> x_hat; vae2.decoder(u)
    -> z_hat, vae2.loggamma_z (a scalar tensor)."""
    kappa = vae1.latent_dim
    out = []
    for i in range(0, n, batch):
        b = min(batch, n - i)
        if vae2 is None:
            z = torch.randn(b, kappa, device=device)                      # z ~ N(0, I)
        else:
            u = torch.randn(b, kappa, device=device)                      # u ~ N(0, I)
            z_hat = vae2.decoder(u)
            eps = torch.randn_like(z_hat)  # drawn even without the noise, so both runs get the same u in every batch
            z = (z_hat + vae2.loggamma_z.exp() * eps) if z_noise else z_hat  # z ~ p(z|u) = N(z_hat, gamma_z^2 I)
        out.append(vae1.decoder(z).float().cpu())                         # x = x_hat(z)
    return torch.cat(out)


def load_model(path, build, device, script):
    """A trained model in evaluation mode from its checkpoint, and the checkpoint; script names the
    command that writes it, for the error when it is missing."""
    ckpt = load_checkpoint(path)
    if ckpt is None:
        die(f"{path} is missing; fix: run `python {script}.py --out {os.path.dirname(path)}` first")
    model = build(ckpt["config"]).to(device)
    model.load_state_dict(ckpt["model"])
    return model.eval(), ckpt


def main(argv=None):
    p = argparse.ArgumentParser(description="Sample from a Two-Stage VAE.", formatter_class=stage1.HelpWithDefaults)
    p.add_argument("--data", choices=sorted(stage1.SHAPES), help="data set: picks the default --out, runs/<data> "
                   "(default: mnist; with --out: the run's)")
    p.add_argument("--out", default=None, help="run directory holding stage1.pt / stage2.pt (default: runs/<data>)")
    p.add_argument("--stage", type=int, default=2, choices=[1, 2], help="2: u -> z -> x; 1: z ~ N(0, I) -> x")
    p.add_argument("--recon", action="store_true", help="reconstruct test images with stage 1 instead of sampling (--stage is then unused)")
    p.add_argument("--no-z-noise", action="store_true", help="2-stage with z = z_hat(u), no gamma_z noise: a diagnostic "
                   "for an undertrained stage 2, whose large gamma_z noise also moves z along the used dimensions, where "
                   "q(z|x) is very narrow (the authors add the noise); writes samples_no_z_noise.npy")
    p.add_argument("--n", type=int, default=10000, help="number of images (the authors' FID: 10,000 against 10,000 test images)")
    p.add_argument("--batch-size", type=int, default=500, help="images per forward pass")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--device", default=stage1.default_device(), help="cuda or cpu (default: cuda when present)")
    p.add_argument("--data-root", default=os.environ.get(DATA_ENV, "./data"), help=f"for --recon (env {DATA_ENV})")
    args = p.parse_args(argv)
    if args.n < 1 or args.batch_size < 1:
        die(f"--n {args.n} and --batch-size {args.batch_size}: each must be at least 1")
    if args.no_z_noise and (args.recon or args.stage != 2):
        die("--no-z-noise is about 2-stage sampling; fix: drop it, or use --stage 2 without --recon")
    stage1.check_device(args.device)
    out = args.out or os.path.join("runs", args.data or "mnist")
    torch.manual_seed(args.seed)

    vae1, ck1 = load_model(os.path.join(out, "stage1.pt"), stage1.build_model, args.device, "stage1")
    if args.data and args.data != ck1["config"]["data"]:
        die(f"{out}/stage1.pt was trained on {ck1['config']['data']}, not --data {args.data}; "
            f"fix: pass --data {ck1['config']['data']}, or none")
    vae2 = None
    if args.recon:
        images = stage1.load_images(ck1["config"]["data"], args.data_root, train=False)
        if args.n > len(images):
            die(f"--n {args.n}: the {ck1['config']['data']} test split has only {len(images)} images to reconstruct; "
                f"fix: pass --n {len(images)} or fewer")
        images = images[torch.randperm(len(images))[:args.n]]  # a shuffled test subset, as the authors' demo.py (github daib13/TwoStageVAE)
        t0 = time.time()
        x = stage1.reconstruct(vae1, images, args.batch_size)
        name = "recon"
    else:
        if args.stage == 2:
            vae2, ck2 = load_model(os.path.join(out, "stage2.pt"), stage2.build_model, args.device, "stage2")
            stage1_source = {"run_id": ck1["config"]["run_id"], "epoch": ck1["epoch"], "data": ck1["config"]["data"]}
            if ck2["config"]["latent_dim"] != ck1["config"]["latent_dim"]:
                die(f"stage2.pt has kappa {ck2['config']['latent_dim']} but stage1.pt has {ck1['config']['latent_dim']}; "
                    f"fix: re-run `python stage2.py --out {out}` on this stage 1")
            if ck2["stage1"] != stage1_source:
                die(f"stage2.pt was fitted to stage-1 run {ck2['stage1']}, not to this stage1.pt {stage1_source}; "
                    f"fix: re-run `python stage2.py --out {out}` (delete the old stage2.pt first)")
        t0 = time.time()
        x = generate(vae1, vae2, args.n, args.batch_size, args.device, z_noise=not args.no_z_noise)
        name = "samples_stage1" if args.stage == 1 else "samples_no_z_noise" if args.no_z_noise else "samples"
    seconds = time.time() - t0
    path = os.path.join(out, f"{name}.npy")
    save_atomic(x.numpy().astype(np.float32), path)
    save_grid(x[:100], os.path.join(out, f"{name}.png"), nrow=10)
    models = f"stage 1 at epoch {ck1['epoch']}" + (f", stage 2 at epoch {ck2['epoch']}" if vae2 is not None else "") \
        + (" (fitted with --fixed-z, the experiment)" if vae2 is not None and ck2["config"].get("fixed_z") else "")
    print(f"wrote {path} {tuple(x.shape)} and {name}.png ({len(x) / seconds:.0f} images/s; {models})", flush=True)


if __name__ == "__main__":
    main()
