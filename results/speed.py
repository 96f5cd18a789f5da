"""How fast is the training step, against a plain one and against this machine's floor?

    python results/speed.py              # stage 1 (MNIST, InfoGAN, kappa 64) and stage 2, batch 64
    python results/speed.py --stage 1    # one of them

Times one training step (batch 64, float32) three ways, the median of 30 steps after 5 warm-up steps:
  plain      the same network written the straightforward way: torch's own spectral_norm
             parametrization (with our u, v, so the numbers agree) and torch.optim.Adam at its
             defaults, in the process as Python starts it;
  ours       the step stage1.fit runs: stage1.SpectralNorm, fused Adam, reuse_freed_memory();
  plain+mem  plain again after reuse_freed_memory(), to show what that setting alone buys;
and against the step's floor: its matmul/conv FLOPs (torch.utils.flop_counter) at the float32 matmul
rate measured on a 2048 x 2048 product, plus Adam's minimal memory traffic (read p, grad, m, v;
write p, m, v) at the measured copy bandwidth. Both rates are measured in the same run and printed.
Run it on an idle machine: anything else running makes every number wrong. The measured tables and
what each speed change bought are in results/README.md, "Speed".
"""
import argparse
import copy
import os
import sys
import time

import numpy as np
import torch
from torch.nn.utils.parametrizations import spectral_norm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
import stage1  # noqa: E402
import stage2  # noqa: E402


def plain_model(model):
    """A copy of a stage-1 model with every stage1.SpectralNorm replaced by torch's own
    spectral_norm parametrization of the same layer, carrying our u and v: the same function and
    the same numbers, computed the straightforward way (W / sigma, then the layer)."""
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, stage1.SpectralNorm):
                layer = spectral_norm(child.layer, n_power_iterations=1)
                sn = layer.parametrizations.weight[0]
                sn._u.copy_(child.u)
                sn._v.copy_(child.v)
                setattr(parent, name, layer)
    return model


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def call_seconds(fn, device, reps, warmup=3):
    """Wall time of each of reps calls of fn, after warmup calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def machine_rates(device, n=2048, copy_mb=256):
    """(float32 matmul FLOP/s, memory bandwidth in bytes/s counting read + write) of this device:
    n x n matmuls, and copies of copy_mb MB (256: far beyond the caches)."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    flops = 2 * n ** 3 / min(np.mean(call_seconds(lambda: a @ b, device, reps=5)) for _ in range(3))
    x = torch.randn(copy_mb * 2 ** 18, device=device)  # float32: 2^18 per MB
    y = torch.empty_like(x)
    bandwidth = 2 * x.numel() * 4 / min(np.mean(call_seconds(lambda: y.copy_(x), device, reps=3)) for _ in range(5))
    return flops, bandwidth


def bench(title, model, loss_fn, batch, device, steps=30):
    """Print (variant, ms/step, examples/s, floor, ratios) for one training step of model done the
    three ways of the module docstring; return ({variant: seconds}, floor seconds). float32."""
    from torch.utils.flop_counter import FlopCounterMode
    rate, bandwidth = machine_rates(device)
    plain = plain_model(model)
    rows = {}
    for variant in ("plain", "ours", "plain+mem"):  # in this order: the allocator setting is for the process
        if variant == "ours":
            stage1.reuse_freed_memory()
        m = copy.deepcopy(model if variant == "ours" else plain).to(device).train()
        params = [p for p in m.parameters() if p.requires_grad]
        opt = stage1.make_optimizer(m, 1e-4) if variant == "ours" else torch.optim.Adam(params, lr=1e-4)

        def step():  # the body of stage1.fit's loop
            loss = loss_fn(m, batch)[0]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        rows[variant] = float(np.median(call_seconds(step, device, steps, warmup=5)))  # robust to the odd hiccup
        if variant == "ours":  # the floor is ours: its FLOPs and parameters
            with FlopCounterMode(display=False) as counter:
                loss_fn(m, batch)[0].backward()
            flops = counter.get_total_flops()
            n_params = sum(p.numel() for p in params)
    floor = flops / rate + 7 * 4 * n_params / bandwidth
    print(f"{title} | device {device}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"machine: float32 matmul {rate / 1e9:.0f} GFLOP/s, memory {bandwidth / 1e9:.1f} GB/s")
    print(f"step: {flops / 1e9:.2f} GFLOP (forward + backward matmul/conv), {n_params / 1e6:.2f} M parameters "
          f"-> floor {floor * 1e3:.1f} ms = {flops / rate * 1e3:.1f} ms arithmetic + {7 * 4 * n_params / bandwidth * 1e3:.1f} ms Adam traffic")
    print(f"{'variant':<10}{'ms/step':>10}{'examples/s':>12}{'floor ms':>10}{'x floor':>9}{'x plain':>9}")
    for variant, sec in rows.items():
        print(f"{variant:<10}{sec * 1e3:>10.1f}{len(batch) / sec:>12.0f}{floor * 1e3:>10.1f}"
              f"{sec / floor:>9.2f}{sec / rows['plain']:>9.2f}")
    return rows, floor


def main(argv=None):
    p = argparse.ArgumentParser(description="Time the training steps (results/README.md, 'Speed').",
                                formatter_class=stage1.HelpWithDefaults)
    p.add_argument("--stage", type=int, choices=[1, 2], help="only this stage (default: both)")
    p.add_argument("--data", default="mnist", choices=sorted(stage1.SHAPES), help="stage 1's data set")
    p.add_argument("--batch-size", type=int, default=64, help="batch size (the authors')")
    p.add_argument("--width", type=int, default=1024, help="stage 2's hidden units (the authors')")
    p.add_argument("--steps", type=int, default=30, help="timed steps per variant (the median is reported)")
    p.add_argument("--device", default=stage1.default_device(), help="cuda or cpu (default: cuda when present)")
    a = p.parse_args(argv)
    results = {}
    torch.manual_seed(0)
    if a.stage in (None, 1):  # random pixels of the right size: the step's speed does not depend on them
        c, s = stage1.SHAPES[a.data]
        cfg = {"data": a.data, "arch": "infogan", "latent_dim": 64, "loss": "learned-gamma"}
        x = torch.randint(0, 256, (a.batch_size, c, s, s), dtype=torch.uint8, device=a.device)
        results[1] = bench(f"stage 1 | {a.data} infogan learned-gamma, batch {a.batch_size}, kappa 64",
                           stage1.build_model(cfg), lambda m, x: stage1.stage1_loss(m, x.float() / 255), x, a.device, a.steps)
    if a.stage in (None, 2):  # random latents likewise
        z = torch.randn(a.batch_size, 64, device=a.device)
        results[2] = bench(f"stage 2 | 3 x {a.width} MLPs, batch {a.batch_size}, kappa 64",
                           stage2.Stage2VAE(64, a.width, 3), stage2.stage2_loss, z, a.device, a.steps)
    return results


if __name__ == "__main__":
    main()
