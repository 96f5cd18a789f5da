"""FID as the paper reports it (the TensorFlow FID of TTUR, Heusel et al.'s code at github.com/bioinf-jku/TTUR:
the paper's footnote 7), in PyTorch, with no scipy or torchvision model.

    python fid.py --data mnist --split test --n 10000              # compute + cache reference stats
    python fid.py --data mnist --samples runs/mnist/samples.npy    # FID of samples -> samples.fid.json
    python fid.py --data mnist --samples runs/mnist/samples.npy --authors-minmax   # -> samples.fid-authors-minmax.json
    python fid.py gen.npy real.npy                                 # two arrays, the first counts as generated

Protocol (docs/protocol.md, "FID"; bioinf-jku/TTUR's fid.py, the authors' fid_score.py): the 2015-12-05
Inception graph, 2048-d pool_3 features; images as float in [0, 255] at native size, grey
replicated to 3 channels, LEGACY TensorFlow bilinear resize to 299x299, then (x - 128) / 128;
mean and covariance in float64; FID = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr(sqrt(S1 S2)).
Reference set: the first n of a seeded permutation of the TEST split (10,000 in the authors' code).
Either array of the two-array form may be a .npz of (mu, sigma) this script cached.

Image arrays: uint8 in [0, 255] is used as is; float32/float64 in [0, 1] becomes x * 255, scaled
and NOT rounded to uint8 (the authors feed their float samples * 255 the same way). Shapes
(N, H, W), (N, C, H, W) or (N, H, W, C) with C in {1, 3}. Two conventions for GENERATED images:
  standard        x * 255 (the default: TTUR's own, so numbers compare across papers)
  authors-minmax  (x - min) / (max - min) * 255 per image (the authors' fid_score.py; real images
                  are never rescaled): the one to set a number beside the paper's Table 1.
Every printed number names its convention.

Weights (pytorch-fid's state_dict layout), looked up in order: --inception PATH, $TWOSTAGE_INCEPTION,
torch.hub.get_dir()/checkpoints/pt_inception-2015-12-05-6726825d.pth, then a download of pytorch-fid's
file into that place (skipped when $TWOSTAGE_NO_DOWNLOAD=1). Data root: --data-root, $TWOSTAGE_DATA, ./data.
"""
import argparse
import datetime
import functools
import hashlib
import os
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from stage1 import DATA_ENV, HelpWithDefaults, check_device, default_device, fmt_time, load_images, reuse_freed_memory, save_atomic, versions  # the project's data loader and helpers

# -----------------------------------------------------------------------------
# config
WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"  # pytorch-fid's port of TTUR's graph (+ fc.*)
WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_NAME
WEIGHTS_HASH = "6726825d"  # sha256 prefix torch.hub checks after the download
REF_SEED = 0               # seed of the permutation that picks the reference images
PREPROC = "ttur-v1"        # name of the pipeline below; part of every cache key: change it if the pipeline changes
STANDARD = "standard: x*255, TF legacy resize"
AUTHORS = "authors-minmax: generated (x-min)/(max-min)*255 per image, TF legacy resize"
DATASETS = ("mnist", "fashion", "cifar10", "celeba")
DATA_ROOT = os.environ.get(DATA_ENV, "./data")  # torchvision root of the reference images

# -----------------------------------------------------------------------------
# the method: pool_3 features -> (mu, sigma) in float64 -> Frechet distance. Then what the samples
# are compared with (the reference statistics), the input pipeline and the Inception network that
# features() calls, and the weights.

@torch.inference_mode()
def features(images, model, batch_size=50, device="cpu", authors_minmax=False, progress=True):
    """pool_3 features (N, 2048) float32 of an image array (module docstring), batch by batch, on
    `device`, which must be the model's. On a GPU the convolutions run in full float32: torch's
    default lets cuDNN round their inputs to TF32 (a 10-bit mantissa) on Ampere and later GPUs, far
    coarser than the 1e-4 to which this network's features are tested (test_smoke.py, on the CPU)."""
    images = as_nchw(images)
    n = len(images)
    out = np.empty((n, 2048), np.float32)
    t0 = time.perf_counter()
    conv_precision, torch.backends.cudnn.conv.fp32_precision = torch.backends.cudnn.conv.fp32_precision, "ieee"
    try:
        for b, i in enumerate(range(0, n, batch_size)):
            batch = torch.from_numpy(np.array(images[i:i + batch_size])).to(device)  # a copy: mmap is read-only
            x = preprocess(batch, authors_minmax).contiguous(memory_format=torch.channels_last)
            out[i:i + len(batch)] = model(x).float().cpu().numpy()
            done = i + len(batch)
            if progress and (b % 10 == 9 or done == n):
                rate = done / max(time.perf_counter() - t0, 1e-6)
                print(f"\rfid: {done}/{n} images, {rate:.1f} images/s, {fmt_time((n - done) / rate)} left",
                      end="\n" if done == n else "", file=sys.stderr, flush=True)
    finally:  # the caller's setting back (stage1.py trains with torch's default)
        torch.backends.cudnn.conv.fp32_precision = conv_precision
    return out


def statistics(feats):
    """Mean and covariance (np.cov, rowvar=False: 1/(N-1)) in float64, as TTUR and pytorch-fid."""
    f = np.asarray(feats, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"need a (N >= 2, D) feature array, got shape {f.shape}; fix: pass more images")
    return f.mean(axis=0), np.cov(f, rowvar=False)


# Exercise 8: the Frechet distance of two Gaussians: the FID of the paper's Section 5, defined by Heusel et al. 2017
def frechet_distance(mu1, s1, mu2, s2, eps=1e-6):
    """FID = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr(sqrt(S1 S2)), float, for means (D,) and
    covariances (D, D) (docs/protocol.md, "FID"; TTUR's fid.py).

    tr(sqrt(S1 S2)) = sum_i sqrt(lambda_i), lambda = eigenvalues of S1 S2, computed as those of
    B^T S1 B, where S2 = B B^T (_product_eigenvalues; no scipy here, numpy's eigh only). Eigenvalues
    that should be 0 (fewer images than features) come out of any eigensolver at about +-1e-16:
    the negative ones count as 0.
    TTUR and pytorch-fid retry with eps * I added to both covariances when scipy's sqrtm returns
    non-finite values, and raise when the root's diagonal has an imaginary part above 1e-3. Here:
    retry when an eigenvalue is non-finite or below -1e-6 (a root with an imaginary part above
    1e-3), raise ValueError if the retry still gives one. Rare either way: B^T S1 B is PSD by
    construction."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(s1, np.float64)), np.atleast_2d(np.asarray(s2, np.float64))
    d = len(mu1)
    if mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}; "
                         "fix: compare features of the same network layer")
    if not all(np.isfinite(t).all() for t in (mu1, mu2, s1, s2)):
        raise ValueError("statistics contain NaN or inf; fix: check the images / features")

    def bad(lam):
        return not np.isfinite(lam).all() or lam.min() < -1e-6

    lam = _product_eigenvalues(s1, s2)
    if bad(lam):  # said every time (a warning would be said once per process), on stderr: into results/table1.py's log.txt
        print(f"fid: S1 S2 is near-singular; adding {eps} to the diagonal of both covariances (as TTUR)", file=sys.stderr, flush=True)
        lam = _product_eigenvalues(s1 + eps * np.eye(d), s2 + eps * np.eye(d))
        if bad(lam):
            what = ("non-finite eigenvalues" if not np.isfinite(lam).all()
                    else f"an imaginary part {np.sqrt(-np.min(lam)):.3g} > 1e-3")
            raise ValueError(f"sqrt(S1 S2) has {what} even with eps added; fix: use more images than feature dimensions")
    diff = mu1 - mu2
    # traces of the ORIGINAL covariances, as TTUR and pytorch-fid (eps only enters the square root)
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(lam, 0, None)).sum())


_reference_factor = {}  # {sha1 of S2: its factor}: one eigh per reference set and process, not one per FID


def _product_eigenvalues(s1, s2):
    """The eigenvalues of S1 S2 for tr(sqrt(S1 S2)), without a matrix square root: S1 S2 has those of
    B^T S1 B where S2 = B B^T (eig(XY) = eig(YX)). B^T S1 B is symmetric PSD, so eigvalsh gives what
    TTUR takes from scipy.linalg.sqrtm(S1 S2), the trace of the root, without scipy. S2 is the
    reference: it is the same in every FID of a run (results/table1.py: every FID it scores), so its
    eigh, the one costly step, is done once; each FID then needs only the eigenvalues of B^T S1 B.
    With fewer reference images than dimensions B has few columns and the product is small."""
    key = hashlib.sha1(np.ascontiguousarray(s2).tobytes()).hexdigest()
    if key not in _reference_factor:
        _reference_factor.clear()  # keep one: a 2048 x 2048 factor is 34 MB
        _reference_factor[key] = _factor(s2)
    b = _reference_factor[key]
    if b.shape[1] == 0:
        return np.zeros(1)  # S2 = 0: S1 S2 = 0
    a = b.T @ s1 @ b
    return np.linalg.eigvalsh((a + a.T) / 2)


def _factor(s):
    """B with S = B B^T, from S = V W V^T: B = V sqrt(W) on S's nonzero directions only (the rest add
    nothing to the trace in frechet_distance; S is PSD, so smaller W are rounding noise). (D, 0) if S = 0.
    Features that never vary over the set (zero rows and columns of S: the test suite's block-mean
    stand-in for the Inception on blank digit borders, say) are left out of the eigh, whose cost is
    cubic in its size; B B^T still equals S (and B is unchanged when every feature varies)."""
    varies = np.flatnonzero(np.diag(s) > 0)
    if not len(varies):
        return np.zeros((len(s), 0))
    w, v = np.linalg.eigh(s[np.ix_(varies, varies)])
    keep = w > max(w.max(), 0) * len(s) * np.finfo(np.float64).eps  # numpy's matrix_rank tolerance, for all of S
    b = np.zeros((len(s), keep.sum()))
    b[varies] = v[:, keep] * np.sqrt(w[keep])
    return b


# -----------------------------------------------------------------------------
# reference statistics: the first n of a seeded permutation of a split, cached as .npz

def load_reference_images(data, split, root):
    """uint8 (N, H, W, C) images of a split, read by stage1.py's loader: the same torchvision files,
    download rule and CelebA crop (rows 45:173, cols 25:153, 64x64) as training."""
    return load_images(data, root, train=(split == "train")).permute(0, 2, 3, 1).numpy()


def reference_path(data, split, n, cache_dir):
    """Where reference_stats caches the statistics of these reference images."""
    return Path(cache_dir) / f"{data}-{split}-n{n}-seed{REF_SEED}-{PREPROC}.npz"


def reference_stats(data, split, n, root, cache_dir, model, batch_size=50, device="cpu", progress=True):
    """(mu, sigma) of the reference set, from cache_dir if present (key fields checked), else computed."""
    key = {"data": data, "split": split, "n": int(n), "seed": REF_SEED, "preproc": PREPROC}
    path = reference_path(data, split, n, cache_dir)
    if path.exists():
        with np.load(path) as z:
            stored = {k: (z[k].item() if k in z.files else None) for k in key}
            if stored != key:
                raise ValueError(f"stats file {path} holds {stored}, expected {key}; fix: delete it to recompute")
            return z["mu"], z["sigma"]
    images = load_reference_images(data, split, root)
    if not 2 <= n <= len(images):
        raise ValueError(f"--n {n} but {data} {split} has {len(images)} images; fix: 2 <= n <= {len(images)}")
    # the authors' code scores against 10,000 shuffled TEST images (docs/protocol.md, "FID"); a fixed
    # seed keeps the set the same across runs
    idx = np.random.default_rng(REF_SEED).permutation(len(images))[:n]
    mu, sigma = statistics(features(images[idx], model, batch_size, device, progress=progress))
    save_atomic({"mu": mu, "sigma": sigma, **key, **versions()}, path)  # whole or not at all
    return mu, sigma


def fid_of_samples(samples, data, split="test", n_ref=10000, root=DATA_ROOT, cache_dir="runs/fid_stats",
                   model=None, batch_size=50, device="cpu", authors_minmax=False, progress=True):
    """FID of generated samples against the cached reference stats, with everything needed to report it."""
    as_nchw(samples)  # fail on bad samples before spending minutes on the reference set
    if model is None:
        model = load_inception(device=device)
    mu_r, s_r = reference_stats(data, split, n_ref, root, cache_dir, model, batch_size, device, progress)
    mu_g, s_g = statistics(features(samples, model, batch_size, device, authors_minmax, progress))
    return {"fid": frechet_distance(mu_g, s_g, mu_r, s_r), "n": len(samples),
            "reference": {"data": data, "split": split, "n": n_ref, "seed": REF_SEED},
            "convention": AUTHORS if authors_minmax else STANDARD, "preproc": PREPROC,
            "inception": getattr(model, "weights_file", None), "versions": versions(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}

# -----------------------------------------------------------------------------
# input pipeline (TTUR): [0, 255] floats -> TF legacy bilinear 299x299 -> grey to RGB -> (x - 128) / 128

def as_nchw(images):
    """Check an image array (module docstring) and return an (N, C, H, W) VIEW, dtype kept. The
    float [0, 255] copy is made batch by batch in features(), so 70,000 images cost no extra memory."""
    a = images
    if not isinstance(a, np.ndarray) or a.dtype not in (np.uint8, np.float32, np.float64):
        raise ValueError(f"images must be a uint8, float32 or float64 numpy array, got "
                         f"{getattr(a, 'dtype', type(a).__name__)}; fix: save uint8 in [0, 255] or float in [0, 1]")
    if a.ndim == 3 and a.shape[2] not in (1, 3):
        a = a[:, None]  # (N, H, W) grey
    elif a.ndim == 4 and (a.shape[1] in (1, 3)) != (a.shape[3] in (1, 3)):
        a = a if a.shape[1] in (1, 3) else a.transpose(0, 3, 1, 2)  # NHWC -> NCHW view
    else:
        raise ValueError(f"cannot tell the layout of images of shape {a.shape}; fix: pass (N, H, W), "
                         "(N, C, H, W) or (N, H, W, C) with exactly one axis of size C in {1, 3}")
    if len(a) < 2:
        raise ValueError(f"FID needs at least 2 images (a covariance), got {len(a)}; fix: pass more images")
    if a.dtype != np.uint8:
        lo, hi = float(a.min()), float(a.max())  # NaN propagates through min/max: no full-size temporary
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise ValueError("images contain NaN or inf; fix: check the sampler's output")
        if lo < 0 or hi > 1:
            raise ValueError(f"float images must lie in [0, 1], got [{lo:.4g}, {hi:.4g}]; "
                             "fix: pass x in [0, 1] (or uint8 in [0, 255])")
    return a


def to_float255(batch, authors_minmax=False):
    """uint8 (kept) or [0, 1] float (x * 255, not rounded) tensor -> float32 on [0, 255]."""
    x = batch.to(torch.float32)
    if batch.dtype != torch.uint8:
        x = x * 255
    if authors_minmax:  # authors' fid_score.py: (x - min) / (max - min) per GENERATED image, then * 255
        lo, hi = x.amin(dim=(1, 2, 3), keepdim=True), x.amax(dim=(1, 2, 3), keepdim=True)
        x = (x - lo) / (hi - lo).clamp_min(1e-12) * 255  # a constant image becomes 0 (the authors' gives NaN)
    return x


def legacy_resize_matrix(n_in, n_out, device=None):
    """(n_out, n_in) matrix of TF's legacy bilinear resize along one axis (align_corners=False,
    half_pixel_centers=False): source = dst * in / out (no half-pixel shift, unlike F.interpolate),
    left = floor(source), right = min(left + 1, in - 1), weights 1 - frac and frac."""
    scale = torch.tensor(n_in / n_out, dtype=torch.float32)  # TF computes the scale and coordinates in float32
    src = torch.arange(n_out, dtype=torch.float32) * scale
    left = src.floor().long()
    right = (left + 1).clamp(max=n_in - 1)
    frac = src - left
    m = torch.zeros(n_out, n_in)
    m[torch.arange(n_out), left] += 1 - frac
    m[torch.arange(n_out), right] += frac  # two statements: at the right edge left == right, weights sum to 1
    return m.to(device)


def tf_legacy_resize(x, size=299):
    """(N, C, H, W) -> (N, C, size, size): one interpolation matrix per axis, applied by matmul."""
    mh = legacy_resize_matrix(x.shape[2], size, x.device)
    mw = legacy_resize_matrix(x.shape[3], size, x.device)
    return mh @ x @ mw.T  # (size, H) @ (N, C, H, W) @ (W, size)


def inception_input(x255):
    """(N, 1 or 3, H, W) float on [0, 255] -> (N, 3, 299, 299) on [-1, 127/128], as TTUR's graph does it."""
    x = tf_legacy_resize(x255)                # resize first: grey needs 1 channel resized, not 3
    x = x.expand(-1, 3, -1, -1)               # grey replicated to RGB (no-op for RGB)
    return (x - 128) / 128                    # TTUR's graph: Sub 128, Mul 1/128


def preprocess(batch, authors_minmax=False):
    """uint8 / [0, 1] float (N, C, H, W) tensor -> Inception input."""
    return inception_input(to_float255(batch, authors_minmax))


# -----------------------------------------------------------------------------
# the FID Inception-v3: torchvision's Inception3 layout and names (so pytorch-fid's state_dict loads
# as is), with the TF 2015-12-05 graph's differences tagged "# TF:" where they happen.

class BasicConv2d(nn.Module):
    def __init__(self, cin, cout, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)  # eps as TF (and torchvision); TF has no BN scale: bn.weight = 1

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def avg_pool_tf(x):
    # TF: the 3x3 'SAME' average pool divides by the number of real pixels, not 9 (torchvision counts the zeros)
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):  # Mixed_5b/c/d, 35x35
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x),
                          self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(avg_pool_tf(x))], 1)  # TF: count_include_pad=False


class InceptionB(nn.Module):  # Mixed_6a, 35x35 -> 17x17 (same as torchvision)
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):  # Mixed_6b/c/d/e, 17x17, factorised 7x7 convolutions
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7d = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            b7d = conv(b7d)
        return torch.cat([self.branch1x1(x), b7, b7d,
                          self.branch_pool(avg_pool_tf(x))], 1)  # TF: count_include_pad=False


class InceptionD(nn.Module):  # Mixed_7a, 17x17 -> 8x8 (same as torchvision)
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):  # Mixed_7b (pool='avg', pytorch-fid's E_1) and Mixed_7c (pool='max', E_2), 8x8
    def __init__(self, cin, pool):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        if self.pool == "avg":
            pooled = avg_pool_tf(x)  # TF: count_include_pad=False
        else:
            pooled = F.max_pool2d(x, 3, stride=1, padding=1)  # TF: the last block pools with MAX, not average
        return torch.cat([self.branch1x1(x),
                          self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(b3d), self.branch3x3dbl_3b(b3d),
                          self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """(N, 3, 299, 299) in [-1, 127/128] (inception_input) -> (N, 2048) pool_3 features. torchvision's Inception3 minus
    transform_input, AuxLogits, dropout and fc (TF: FID stops at pool_3; the file's fc.* is ignored)."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)  # (N, 32, 149, 149)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)           # (N, 32, 147, 147)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)  # (N, 64, 147, 147), max pool -> 73x73
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)           # (N, 80, 73, 73)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)          # (N, 192, 71, 71), max pool -> 35x35
        self.Mixed_5b = InceptionA(192, pool_features=32)     # (N, 256, 35, 35)
        self.Mixed_5c = InceptionA(256, pool_features=64)     # (N, 288, 35, 35)
        self.Mixed_5d = InceptionA(288, pool_features=64)     # (N, 288, 35, 35)
        self.Mixed_6a = InceptionB(288)                       # (N, 768, 17, 17)
        self.Mixed_6b = InceptionC(768, c7=128)               # (N, 768, 17, 17)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)                       # (N, 1280, 8, 8)
        self.Mixed_7b = InceptionE(1280, pool="avg")          # (N, 2048, 8, 8)
        self.Mixed_7c = InceptionE(2048, pool="max")          # (N, 2048, 8, 8)

    def forward(self, x):
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, "Mixed_" + name)(x)
        return x.mean(dim=(2, 3))  # pool_3: TF's 8x8 VALID average pool = global mean, (N, 2048)


# -----------------------------------------------------------------------------
# the weights: found on disk or downloaded once, loaded, BatchNorms folded (plumbing)

def find_weights(path=None):
    """The weights file, in the order the module docstring gives; SystemExit with the fix if none."""
    for given, origin in ((path, "--inception"), (os.environ.get("TWOSTAGE_INCEPTION"), "$TWOSTAGE_INCEPTION")):
        if given:
            if not Path(given).is_file():
                raise SystemExit(f"fid.py: error: {origin} {given} is not a file; fix: point it at {WEIGHTS_NAME}")
            return Path(given)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_NAME
    if cached.is_file():
        return cached
    fix = (f"fix: put pytorch-fid's {WEIGHTS_NAME} (from {WEIGHTS_URL}) at {cached}, "
           "or pass --inception PATH, or set TWOSTAGE_INCEPTION=PATH")
    if os.environ.get("TWOSTAGE_NO_DOWNLOAD") == "1":
        raise SystemExit(f"fid.py: error: no FID Inception weights and downloads are off; {fix}")
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        # writes <dst>.<uuid>.partial and moves it into place only after the sha256 prefix matched: atomic
        torch.hub.download_url_to_file(WEIGHTS_URL, str(cached), hash_prefix=WEIGHTS_HASH)
    except Exception as e:  # offline, proxy, bad hash: one line, not a traceback
        raise SystemExit(f"fid.py: error: no FID Inception weights, download failed "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); {fix}")
    return cached


def load_inception(path=None, device="cpu"):
    """FIDInceptionV3 in eval mode with the TF 2015-12-05 weights (pytorch-fid key layout)."""
    return _load_inception(find_weights(path), device)


@functools.lru_cache(maxsize=2)  # results/table1.py computes several FIDs in one process: load once
def _load_inception(weights, device):
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated download, another file format: one line, not a traceback
        raise ValueError(f"{weights} is not a readable torch state_dict ({type(e).__name__}); fix: use {WEIGHTS_NAME}") from None
    if not isinstance(state, dict):
        raise ValueError(f"{weights} holds a {type(state).__name__}, not a state_dict; fix: use {WEIGHTS_NAME}")
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}  # classifier not needed for pool_3
    model = FIDInceptionV3()
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a tensor of another shape: the weights of another network
        raise ValueError(f"{weights} is not pytorch-fid's FID Inception state_dict ({str(e).splitlines()[-1].strip()}); "
                         f"fix: use {WEIGHTS_NAME}") from None
    if missing or unexpected:  # strict, with a readable message
        raise ValueError(f"{weights} is not pytorch-fid's FID Inception state_dict (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}); fix: use {WEIGHTS_NAME}")
    model.weights_file = str(weights)
    fold_batchnorm(model)
    # channels_last (NHWC) lets oneDNN / cuDNN pick their fast convolutions (the gain: results/README.md,
    # "Speed"); the features are the same to float rounding
    return model.eval().requires_grad_(False).to(device, memory_format=torch.channels_last)


@torch.no_grad()
def fold_batchnorm(model):
    """Inference only: each BasicConv2d's BatchNorm (fixed statistics) becomes the conv's scale and
    bias, w' = w s, b = beta - mean s, s = gamma / sqrt(var + eps): the same function, one pass
    over the activations fewer. Features within 1.3e-5 of the test fixture's on its 32 digits, against
    4.3e-6 unfolded (the fixture's: the TF graph's pool_3 of TF-resized digits, computed by the
    TorchScript copy of that graph from which these weights were converted; the gain:
    results/README.md, "Speed")."""
    for m in model.modules():
        if isinstance(m, BasicConv2d):
            conv, bn = m.conv, m.bn
            s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            folded = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=True)
            folded.weight.copy_(conv.weight * s[:, None, None, None])
            folded.bias.copy_(bn.bias - bn.running_mean * s)
            m.conv, m.bn = folded, nn.Identity()

# -----------------------------------------------------------------------------
# command line

def _load_array_or_stats(path):
    """An .npy image array (checked now, read batch by batch later) or an .npz with mu and sigma."""
    if str(path).endswith(".npz"):  # precomputed (mu, sigma), e.g. a file from the reference cache
        with np.load(path) as z:
            if "mu" not in z.files or "sigma" not in z.files:
                raise ValueError(f"{path} has no mu/sigma; fix: pass an .npy image array or a fid.py stats .npz")
            return z["mu"], z["sigma"]
    images = np.load(path, mmap_mode="r", allow_pickle=False)  # mmap: 70,000 images stay on disk
    try:
        as_nchw(images)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return images


def main(argv=None):
    p = argparse.ArgumentParser(description="TTUR-style FID (see the module docstring for the commands).",
                                formatter_class=HelpWithDefaults)
    p.add_argument("arrays", nargs="*", help="two .npy image arrays (or stats .npz) to compare; "
                   "with --authors-minmax the FIRST is treated as generated (default: none, for --data)")
    p.add_argument("--data", choices=DATASETS, help="reference data set, one of the paper's four "
                   "(default: none, for two arrays)")
    p.add_argument("--split", choices=("test", "train"), help="reference split (default: test, as the authors)")
    p.add_argument("--n", type=int, help="reference images (default: 10000, the authors')")
    p.add_argument("--samples", help="generated images .npy; the FID goes beside it, x.npy -> x.fid.json "
                   "(x.fid-authors-minmax.json with --authors-minmax) (default: none, for two arrays)")
    p.add_argument("--authors-minmax", action="store_true", help="rescale each GENERATED image by its own "
                   "min/max before *255, as the authors' fid_score.py (default: off, the standard x*255)")
    p.add_argument("--inception", help="weights .pth (default: $TWOSTAGE_INCEPTION, then the torch hub cache, "
                   "then pytorch-fid's download)")
    p.add_argument("--cache", default="runs/fid_stats", help="reference stats cache dir (default: runs/fid_stats)")
    p.add_argument("--data-root", default=DATA_ROOT,
                   help="torchvision data root (default: $TWOSTAGE_DATA, else ./data)")
    p.add_argument("--batch-size", type=int, help="images per Inception pass (default: 50 on a GPU, as TTUR; "
                   "5 on the CPU: faster there, the same features)")
    p.add_argument("--device", default=default_device(),
                   help="cuda or cpu (default: cuda if available, else cpu)")
    args = p.parse_args(argv)
    if len(args.arrays) not in (0, 2) or (args.arrays and args.samples) or (not args.arrays and not args.data):
        p.error("pass either two arrays (a.npy b.npy) or --data [--samples PATH]")
    if args.arrays and (args.data or args.split or args.n):
        p.error("--data, --split and --n choose a reference set, but with two arrays the second is the reference; "
                "fix: drop them, or pass --data with --samples instead of two arrays")
    if args.authors_minmax and not (args.arrays or args.samples):
        p.error("--authors-minmax rescales generated images, and the reference set is never rescaled; "
                "fix: pass --samples PATH, or drop the flag")
    args.split, args.n = args.split or "test", 10000 if args.n is None else args.n
    check_device(args.device)
    if args.batch_size is None:
        # On the CPU, batches of 5 keep every activation (the largest: 5 x 64 x 147 x 147 floats, 28 MB)
        # under glibc's 32 MB mmap threshold, so with reuse_freed_memory() no page is faulted in afresh
        # each batch (the gain: results/README.md, "Speed").
        # The features do not depend on the batch (the network is in eval mode).
        args.batch_size = 50 if torch.device(args.device).type == "cuda" else 5
    if args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    reuse_freed_memory()
    try:
        model = load_inception(args.inception, args.device)
        convention = AUTHORS if args.authors_minmax else STANDARD
        if args.arrays:
            loaded = [_load_array_or_stats(path) for path in args.arrays]  # both checked before the slow part
            if args.authors_minmax and isinstance(loaded[0], tuple):
                raise ValueError(f"--authors-minmax rescales the generated images, but {args.arrays[0]} holds statistics; "
                                 "fix: pass the generated .npy images first")
            stats = [x if isinstance(x, tuple) else  # the second array is the real set: never min-max rescaled
                     statistics(features(x, model, args.batch_size, args.device, args.authors_minmax and i == 0))
                     for i, x in enumerate(loaded)]
            sizes = ["stats" if isinstance(x, tuple) else f"n={len(x)}" for x in loaded]
            print(f"FID {frechet_distance(*stats[0], *stats[1]):.2f} ({convention}; "
                  f"{args.arrays[0]} {sizes[0]} vs {args.arrays[1]} {sizes[1]})")
        elif args.samples:
            samples = _load_array_or_stats(args.samples)
            if isinstance(samples, tuple):
                raise ValueError(f"--samples {args.samples} holds statistics; fix: pass the .npy image array")
            res = fid_of_samples(samples, args.data, args.split, args.n, args.data_root, args.cache, model,
                                 args.batch_size, args.device, args.authors_minmax)
            res["samples"] = str(args.samples)
            # one file per convention, so both can be reported side by side
            out = Path(args.samples).with_suffix(".fid-authors-minmax.json" if args.authors_minmax else ".fid.json")
            save_atomic(res, out)
            print(f"FID {res['fid']:.2f} ({convention}; n={res['n']} vs {args.data} {args.split} n={args.n}) -> {out}")
        else:
            mu, _ = reference_stats(args.data, args.split, args.n, args.data_root, args.cache, model,
                                    args.batch_size, args.device)
            print(f"reference stats ready: {args.data} {args.split} n={args.n}, {PREPROC}, dim {len(mu)}, "
                  f"in {args.cache}")
    except (ValueError, OSError, zipfile.BadZipFile) as e:  # bad input, unreadable file: one line, exit code 2, nothing cached
        fix = "" if "fix:" in str(e) else "; fix: check the path"
        print(f"fid.py: error: {e}{fix}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
