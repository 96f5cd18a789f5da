"""Table 1 (Dai & Wipf 2019) and Table 3 for one data set (MNIST by default), run with this project's four scripts.

    # the paper's protocol (meant for a GPU): 10 seeds x 3 stage-1 decoders, 400 + 800 epochs
    python results/table1.py --seeds 0-9
    # the reduced budget of results/README.md, with the budget curve from a long run's snapshots
    python results/table1.py --seeds 0 --stage1-epochs 10 --stage2-epochs 20 \
        --curve runs/mnist --curve-epochs 5,10,20,30,40,60 --curve-n-fid 5000 --json results/mnist_table1.json
    # one seed at the paper's budget, stage 1 from the long run's epoch-400 snapshot, with the 2-stage
    # FID after 100, 200, 400 and 800 stage-2 epochs, plotted in mnist_stage2_curve.png beside the JSON
    # (results/README.md, "The full-protocol run")
    python results/table1.py --seeds 0 --decoders learned-gamma --curve runs/mnist --stage2-curve 100,200,400,800 \
        --out runs/table1-mnist-full --json results/mnist_table1.json --json-key full_protocol

One trial = one stage-1 decoder (learned gamma, fixed gamma = 1, Bernoulli cross-entropy) and one
seed, in its own directory <out>/<decoder>/seed<k>/. The learned-gamma trial gives two rows of
Table 1 (2-stage sampling, and the same stage 1 sampled from N(0, I)); the other two give one each.
Every row's FID is computed twice: in the standard convention (x * 255) and in the authors' (each
generated image min-max rescaled first, as their fid_score.py does for the paper's numbers).
Each trial writes trial.json (and, as each step ends, seconds.json, its wall time, and steps.json,
each call's time, machine and end: a stage trained in several calls has the sum of its finished
calls, and "epoch_seconds" its epochs' times from the checkpoint); the summary (mean +- std over
seeds, the paper's numbers beside) is printed and written to --json.

Resumable: re-run the same command after an interruption. A step is skipped when its output is
newer than its input; stage 1 and stage 2 continue from their checkpoints (--resume). With
--stage2-curve, stage 2 runs in parts that end at the curve's epochs, and each point is sampled and
scored as soon as stage 2 reaches it; the 1-stage FID comes before stage 2. So a trial that spans
sessions lands each number it reached.

A stage-1 snapshot of another run with the same settings and seed (stage1.py --snapshots) is used as
the starting checkpoint when its epoch is the trial's: the lr schedule depends on the epoch only, so
it is the same model a fresh run would train (on the same device; test_smoke.py checks resume).
"""
import argparse
import contextlib
import datetime
import glob
import importlib
import json
import os
import platform
import shutil
import sys
import time
import traceback

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
sys.path.insert(0, ROOT)
# every script imported now, once: run() calls their main() in this process, so a script edited while a
# trial runs for hours must not be loaded later beside the older copy of another it imports
import fid  # noqa: E402
import sample  # noqa: E402,F401
import stage2  # noqa: E402
from stage1 import CIFAR10_EPOCHS, STAGE1_DEFAULTS, HelpWithDefaults, copy_atomic, die, load_checkpoint, save_atomic, versions  # noqa: E402

# The paper's Table 1 (the neutral architecture: FID, mean and std over 10 seeds, the authors' min-max
# convention) and Table 3 (MMD of q(z) and q(u) to N(0, I); kernel and estimator not stated), by data set
PAPER = {"mnist": {"two_stage": (12.6, 1.5), "vae_learned_gamma": (54.5, 1.0), "vae_fixed_gamma": (52.0, 0.6), "vae_cross_entropy": (16.6, 0.4)},
         "fashion": {"two_stage": (29.3, 1.0), "vae_learned_gamma": (60.0, 1.1), "vae_fixed_gamma": (84.6, 0.9), "vae_cross_entropy": (43.6, 0.7)},
         "cifar10": {"two_stage": (72.9, 0.9), "vae_learned_gamma": (76.7, 0.8), "vae_fixed_gamma": (160.5, 1.1), "vae_cross_entropy": (106.0, 1.0)},
         "celeba": {"two_stage": (44.4, 0.7), "vae_learned_gamma": (60.5, 0.6), "vae_fixed_gamma": (55.9, 0.6), "vae_cross_entropy": (53.3, 0.6)}}
PAPER_MMD = {"mnist": (2.85, 0.43), "fashion": (1.37, 0.40), "cifar10": (1.08, 0.00), "celeba": (7.42, 0.29)}
ROW = {"learned-gamma": "vae_learned_gamma", "fixed-gamma": "vae_fixed_gamma", "cross-entropy": "vae_cross_entropy"}


def seeds(text):
    """'0-9' or '0,3,5'."""
    if "-" in text:
        lo, hi = text.split("-")
        return list(range(int(lo), int(hi) + 1))
    return [int(s) for s in text.split(",")]


def epochs(text):
    """'5,10,20' -> [5, 10, 20] (sorted, each at least 1); '' -> []."""
    try:
        values = sorted({int(e) for e in text.split(",") if e.strip()})
    except ValueError:
        values = [0]
    if values and values[0] < 1:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of epochs >= 1; fix: e.g. 100,200")
    return values


def newer(path, *inputs):
    """path exists and is at least as new as every input that exists (make's rule)."""
    return os.path.exists(path) and all(os.path.getmtime(path) >= os.path.getmtime(i) for i in inputs if os.path.exists(i))


def read_json(path):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def run(script, args, log):
    """One call of a project script's main(), in this process (no Python and torch start-up per
    step), its output appended to the trial's log; wall seconds. Each script seeds its own RNG."""
    module = importlib.import_module(script[:-3])
    t0 = time.time()
    with open(log, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        print(f"$ python {script} {' '.join(map(str, args))}", flush=True)
        try:
            module.main([str(a) for a in args])
            error = None
        except SystemExit as e:  # die(), argparse and fid.py's one-line errors
            error = e.code
            if error:
                print(error if isinstance(error, str) else f"exit {error}", flush=True)
        except Exception as e:  # anything else (out of memory, a bug): its traceback into the log
            traceback.print_exc()
            error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if error:
        die(f"`{script} {' '.join(map(str, args))}` failed{f' ({error})' if isinstance(error, str) else ''}; "
            f"see the end of {log}")
    return round(time.time() - t0, 1)


def trial(d, loss, seed, e1, e2, n_fid, minmax, a, snapshot=None, stage2_curve=()):
    """Train (or finish) one trial in directory d and return its record (also written to d/trial.json).
    stage2_curve: stage-2 epochs at which the 2-stage FID is measured too (learned gamma only)."""
    os.makedirs(d, exist_ok=True)
    log = os.path.join(d, "log.txt")
    # each step's wall time, saved as the step ends, so a call killed midway (a session's end in the
    # full protocol) keeps the times of the steps it finished; trial.json's for trials done before
    seconds_path = os.path.join(d, "seconds.json")
    seconds = read_json(seconds_path) or (read_json(os.path.join(d, "trial.json")) or {}).get("seconds", {})
    # and each call's machine and end (UTC): a trial that spans sessions may change machine kind,
    # and the two kinds differ 1.7x in speed
    steps_path = os.path.join(d, "steps.json")
    steps = read_json(steps_path) or {}
    if "stage1_from" in seconds:  # trials written before 2026-11-26, 17:30 UTC kept the snapshot's path here
        seconds.pop("stage1_from")  # and the encoding pass's time under "stage1"
        if "stage1" in seconds:
            seconds["stage1_encode"] = seconds.pop("stage1")
    ck1, latents = os.path.join(d, "stage1.pt"), os.path.join(d, "latents.json")

    def timed(key, script, args, part=False):
        call = {"seconds": run(script, args, log), "machine": machine(),
                "ended": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
        steps[key] = (steps.get(key, []) if part else []) + [call]
        seconds[key] = round(sum(c["seconds"] for c in steps[key]), 1)  # a step run in parts: their sum
        save_atomic(seconds, seconds_path)
        save_atomic(steps, steps_path)
    record = {"stage1_from": snapshot} if snapshot else {}
    common = ["--data", a.data, "--out", d] + (["--device", a.device] if a.device else [])
    fid_common = ["--data", a.data, "--data-root", a.data_root, "--n", a.fid_ref_n, "--cache", a.fid_cache] + (["--device", a.device] if a.device else [])

    # samples and their FID (10,000 test images as reference, fid.py's cached statistics), in the
    # standard convention (x * 255) and, unless --no-minmax, the authors' (each generated image
    # min-max rescaled first: the paper's numbers). A FID file is reused when it is newer than its
    # samples and was computed against this reference by this FID pipeline.
    reference = {"data": a.data, "split": "test", "n": a.fid_ref_n, "seed": fid.REF_SEED}

    def score(npy, tag):
        if not fid.reference_path(a.data, "test", a.fid_ref_n, a.fid_cache).exists():
            # the test images' statistics, computed once for every FID and cached: timed on their own,
            # so that each FID's time is one FID's
            timed("fid_reference", "fid.py", fid_common)
        fids = {}
        for flag, suffix in [("", ".fid.json")] + ([("--authors-minmax", ".fid-authors-minmax.json")] if minmax else []):
            out = npy[:-len(".npy")] + suffix
            done = read_json(out) if newer(out, npy) else None
            if not (done and done["reference"] == reference and done["preproc"] == fid.PREPROC):
                timed(f"fid_{tag}{flag.replace('--', '_')}", "fid.py", fid_common + ["--samples", npy] + ([flag] if flag else []))
            fids["fid_minmax" if flag else "fid"] = read_json(out)["fid"]
        return fids

    # a point of the stage-2 curve: the same stage 1, with stage 2 as it was after e of its epochs
    # (stage2.py's snapshot stage2_eNNNN.pt), sampled and scored in a directory of its own, d/stage2_eNNNN/
    def stage2_point(e):
        s, snap = os.path.join(d, f"stage2_e{e:04d}"), os.path.join(d, f"stage2_e{e:04d}.pt")
        if not os.path.exists(snap):
            die(f"{snap} is missing; fix: delete {os.path.join(d, 'stage2.pt')} and run again: stage 2 is refitted from "
                f"epoch 0 (all of its epochs again), keeping that snapshot this time")
        for src, name in ((ck1, "stage1.pt"), (snap, "stage2.pt")):
            if not newer(os.path.join(s, name), src):
                copy_atomic(src, os.path.join(s, name))
        npy = os.path.join(s, "samples.npy")
        if not (newer(npy, os.path.join(s, "stage1.pt"), os.path.join(s, "stage2.pt"))
                and len(np.load(npy, mmap_mode="r")) == n_fid):
            timed(f"sample_stage2_e{e}", "sample.py", ["--data", a.data, "--out", s, "--n", n_fid, "--seed", seed]
                  + (["--device", a.device] if a.device else []))
        return {"loggamma_z": load_checkpoint(os.path.join(s, "stage2.pt"), keys=("model",))["model"]["loggamma_z"].item(),
                **score(npy, f"stage2_e{e}")}

    # stage 1 (stage1.py also encodes the training split: mu_z.npy, sigma_z.npy, latents.json)
    if not os.path.exists(ck1) and snapshot:
        if not os.path.exists(snapshot):  # never train 400 epochs here, beside the run that will have them
            die(f"{snapshot} is missing; fix: let the run in {os.path.dirname(snapshot)} reach epoch {e1} with {e1} in "
                "its --snapshots, or drop --curve to train this trial's stage 1 itself")
        copy_atomic(snapshot, ck1)
    have = None
    if os.path.exists(ck1):  # a trial directory left by other settings (a test's --limit, say) is not this trial
        have = load_checkpoint(ck1, keys=("config", "epoch"))
        if not same_run(have["config"], loss, seed, a):
            die(f"{ck1} was trained with other settings than this trial ({loss}, seed {seed}, --limit {a.limit}); "
                f"fix: delete {d}, or pass another --out")
        if snapshot and os.path.exists(snapshot):
            snap = load_checkpoint(snapshot, keys=("config", "epoch"))
            if [have["config"]["run_id"], have["epoch"]] != [snap["config"]["run_id"], snap["epoch"]]:
                die(f"{ck1} is not a copy of {snapshot} (another run, or another epoch); fix: delete {d} to start "
                    "this trial from that snapshot")
    # What a step's outputs were made from is read from the outputs, not from file times: the latents
    # name their checkpoint's run and epoch, and stage 2's checkpoint and summary the latents' (a
    # runs/ folder copied or restored keeps what its files say, not always their times). Only the
    # steps of minutes (sampling, FID) go by file times (newer), so that a stage 2 of hours is never
    # refitted by mistake.
    done = read_json(latents)
    if not (done and have and done["epoch"] == have["epoch"] == e1 and done.get("run_id") == have["config"]["run_id"]):
        resume = ["--resume"] if os.path.exists(ck1) else ["--loss", loss, "--seed", seed, "--limit", a.limit]
        # from a snapshot, stage1.py only encodes (its epochs were trained in the long run: epoch_seconds);
        # a stage 1 trained here and extended later sums its calls
        timed("stage1_encode" if snapshot else "stage1", "stage1.py", common + resume + ["--epochs", e1, "--data-root", a.data_root],
              part="--resume" in resume and not snapshot)
        done = read_json(latents)
        if done["epoch"] != e1:
            die(f"{ck1} is at epoch {done['epoch']}, not {e1}; fix: delete {d} to start this trial afresh")
    record.update(decoder=loss, seed=seed, stage1_epochs=e1, loggamma_x=done["loggamma_x"],
                  active_dims=done["active_dims"], n_fid=n_fid)

    # samples of each sampler and their FIDs: 1-stage (z ~ N(0, I)) now, before stage 2's hours, and
    # 2-stage (u -> z -> x) after it
    def sample_and_score(stage, name, source):
        npy = os.path.join(d, f"{name}.npy")
        if not (newer(npy, source) and len(np.load(npy, mmap_mode="r")) == n_fid):
            timed(f"sample_stage{stage}", "sample.py", common + ["--stage", stage, "--n", n_fid, "--seed", seed])
        key, fids = "fid_two_stage" if stage == 2 else "fid_one_stage", score(npy, f"stage{stage}")
        record[key] = fids["fid"]
        if minmax:
            record[key + "_minmax"] = fids["fid_minmax"]

    sample_and_score(1, "samples_stage1", latents)

    # stage 2, for the learned-gamma decoder only (the 2-Stage VAE's first stage)
    if loss == "learned-gamma":
        ck2, summary2 = os.path.join(d, "stage2.pt"), os.path.join(d, "stage2.json")
        these_latents = [done["run_id"], done["epoch"]]
        fitted_to = lambda stage1_run: [stage1_run.get("run_id"), stage1_run.get("epoch")] == these_latents
        done2 = read_json(summary2)
        if not (done2 and done2["epoch"] == e2 and fitted_to(done2.get("stage1", {})) and os.path.exists(ck2)):
            if os.path.exists(ck2) and not fitted_to(load_checkpoint(ck2, keys=("stage1",))["stage1"]):
                os.remove(ck2)  # fitted to another stage 1's latents: stage 2 starts again
            if not os.path.exists(ck2):  # a new fit: no snapshot, curve point, summary or training time of an older one may survive it
                for old in glob.glob(os.path.join(d, "stage2_e*")) + [summary2]:
                    if os.path.exists(old):
                        shutil.rmtree(old) if os.path.isdir(old) else os.remove(old)
                seconds.pop("stage2", None)
                steps.pop("stage2", None)
                save_atomic(seconds, seconds_path)
                save_atomic(steps, steps_path)
            keep = [e for e in stage2_curve if e < e2]  # stage2.py's snapshots stage2_eNNNN.pt for the stage-2 curve
            snapshots = ["--snapshots", ",".join(map(str, keep))] if keep else []
            # stage 2 in parts that end at the curve's epochs, each snapshot scored as soon as it exists, so
            # that a fit spanning sessions lands the points it reached (on the CPU, resumed parts give the
            # same parameters, bit for bit, as one uninterrupted fit: test_resume_equals_uninterrupted).
            # The last part always runs: a fit killed after its last epoch, before stage2.json was
            # written, resumes with nothing to train and writes it.
            for target in keep + [e2]:
                if target == e2 or not os.path.exists(ck2) or load_checkpoint(ck2, keys=("epoch",))["epoch"] < target:
                    start = ["--resume"] if os.path.exists(ck2) else ["--seed", seed]
                    timed("stage2", "stage2.py", common + start + snapshots + ["--epochs", target], part=True)
                if target < e2:
                    stage2_point(target)
            done2 = read_json(summary2)
            if done2["epoch"] != e2:
                die(f"{ck2} is at epoch {done2['epoch']}, not {e2}; fix: delete {ck2} to refit stage 2")
        record.update(stage2_epochs=e2, loggamma_z=done2["loggamma_z"], mmd_stage1=done2["mmd_stage1"],
                      mmd_stage2=done2["mmd_stage2"], mmd_estimator=done2["mmd_estimator"])
        sample_and_score(2, "samples", summary2)

    # the stage-2 budget curve (its points before e2 were scored as stage 2 reached them)
    if loss == "learned-gamma" and stage2_curve:
        record["stage2_curve"] = []
        for e in stage2_curve:
            if e == e2:
                point = {"loggamma_z": record["loggamma_z"], "fid": record["fid_two_stage"],
                         **({"fid_minmax": record["fid_two_stage_minmax"]} if minmax else {})}
            else:
                point = stage2_point(e)
            record["stage2_curve"].append({"stage2_epochs": e, **point})
    # training time from the checkpoints' own per-epoch record: it covers the epochs of a call killed
    # midway and those trained in the long run a snapshot came from, which `seconds` (the steps that
    # finished, in this call or earlier ones) does not
    record["epoch_seconds"] = {f"stage{k}": epoch_seconds(ck) for k, ck in ((1, ck1), (2, os.path.join(d, "stage2.pt")))
                               if os.path.exists(ck)}
    record["seconds"], record["steps"] = seconds, steps
    save_atomic(record, os.path.join(d, "trial.json"))
    print(f"{d}: " + ", ".join(f"{k} {v:.4g}" for k, v in record.items() if k.startswith(("fid", "loggamma", "mmd_stage", "active")) and v is not None), flush=True)
    return record


def epoch_seconds(checkpoint):
    """Sum, median and max over the epochs in a checkpoint's history (a paused epoch shows as the max)."""
    s = [h["seconds"] for h in load_checkpoint(checkpoint, keys=("history",))["history"]]
    return {"epochs": len(s), "sum": round(sum(s), 1), "median": round(float(np.median(s)), 1), "max": round(max(s), 1)}


def same_run(config, loss, seed, a):
    """Would stage1.py with this trial's flags train the run with this config (up to its length)?"""
    ours = {"data": a.data, "loss": loss, "seed": seed, "limit": a.limit, "arch": "infogan", "latent_dim": 64,
            "lr": 1e-4, "lr_epochs": 150, "batch_size": 64, "bn_momentum": 0.001}
    return all(config.get(k, STAGE1_DEFAULTS.get(k)) == v for k, v in ours.items())  # runs older than a flag: its default


def mean_std(values):
    """Mean and sample standard deviation (ddof 1) over trials; std None for one trial."""
    return {"fid": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else None,
            "n_trials": len(values), "values": [float(v) for v in values]}


def machine(cpuinfo="/proc/cpuinfo"):
    """The CPU, its cores and, on Linux, its vector width: this project's machines come in an AVX-512
    kind and an AVX2-only kind about 1.7x slower, and they round differently."""
    if not os.path.exists(cpuinfo):
        return f"{platform.processor()}, {os.cpu_count()} cores, {platform.system()}"
    info = {}
    with open(cpuinfo) as f:
        for line in f:
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    flags = info.get("flags", "").split()
    vector = "AVX-512" if "avx512f" in flags else "AVX2 only" if "avx2" in flags else "no AVX2"
    return f"{info.get('model name', platform.processor())}, {os.cpu_count()} cores, {vector}, {platform.system()}"


def plot_curve(curve, path, ref_n, data):
    """FID of both samplers and loggamma_x against stage-1 epochs."""
    fid_plot(path, [p["stage1_epochs"] for p in curve], "stage-1 epochs", f"FID ({curve[0]['n_fid']} samples vs {ref_n} test images)",
             [([p["fid_one_stage"] for p in curve], "o-", {"label": "1-stage: z ~ N(0, I)"}),
              ([p["fid_two_stage"] for p in curve], "s-", {"label": "2-stage: u -> z -> x"})],
             ("loggamma_x", [p["loggamma_x"] for p in curve]),
             f"{data.upper() if data == 'mnist' else data}: FID and loggamma_x against the stage-1 budget "
             f"(stage 2: {curve[0]['stage2_epochs']} epochs)", ncol=3, bottom=0.06)


def plot_stage2_curve(points, path, n_fid, ref_n, data, stage1_epochs):
    """2-stage FID and loggamma_z against stage-2 epochs for one stage-1 budget (means over the seeds):
    the paper never shows how much of the 2-stage FID is the stage-2 budget."""
    lines = [([p["fid"] for p in points], "s-", {"color": "C1", "label": "2-stage FID, standard (x*255)"})]
    if "fid_minmax" in points[0]:  # the paper's convention, so the one to set beside its number
        lines.append(([p["fid_minmax"] for p in points], "^-", {"color": "C2", "label": "2-stage FID, authors' min-max"}))
    fid_plot(path, [p["stage2_epochs"] for p in points], "stage-2 epochs", f"FID ({n_fid} samples vs {ref_n} test images)",
             lines, ("loggamma_z", [p["loggamma_z"] for p in points]),
             f"{data.upper() if data == 'mnist' else data}: 2-stage FID against the stage-2 budget "
             f"(stage 1: {stage1_epochs} epochs)", ncol=2, bottom=0.1,
             paper=(*PAPER[data]["two_stage"], {"color": "C2", "ls": ":",
                                                "label": "the paper's, {} +- {} (min-max, 10 seeds)".format(*PAPER[data]["two_stage"])}))


def fid_plot(path, epochs, xlabel, ylabel, lines, right, title, ncol, bottom, paper=None):
    """FID curves against epochs on a log axis, a loggamma on the right axis (dashed), the legend
    below the axes, clear of the curves; paper: (mean, std, line style) of the paper's number, a
    line over its one-std band; written atomically (matplotlib, only for these plots)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for values, style, kw in lines:
        ax.plot(epochs, values, style, **kw)
    if paper:  # its mean, and its one-std band over seeds, shaded
        mean, std, kw = paper
        ax.axhline(mean, **kw)
        ax.axhspan(mean - std, mean + std, color=kw["color"], alpha=0.12, lw=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_xscale("log")
    ax.set_xticks(epochs, [str(x) for x in epochs])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax2 = ax.twinx()
    ax2.plot(epochs, right[1], "k--", alpha=0.6, label=f"{right[0]} (right axis)")
    ax2.set_ylabel(right[0])
    handles, handles2 = ax.get_legend_handles_labels(), ax2.get_legend_handles_labels()
    fig.legend(handles[0] + handles2[0], handles[1] + handles2[1], loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    ax.set_title(title, fontsize=10)
    fig.tight_layout(rect=(0, bottom, 1, 1))
    fig.savefig(path + ".tmp.png", dpi=120)
    os.replace(path + ".tmp.png", path)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Table 1 (one column: --data, MNIST by default) and Table 3 with this project's scripts.",
                                formatter_class=HelpWithDefaults)
    p.add_argument("--data", default="mnist", choices=sorted(PAPER), help="data set: Table 1's column")
    p.add_argument("--seeds", type=seeds, default=seeds("0-9"), help="trials, e.g. 0-9 (the paper: 10) or 0,1")
    p.add_argument("--decoders", default="learned-gamma,fixed-gamma,cross-entropy", help="stage-1 decoders to run")
    p.add_argument("--stage1-epochs", type=int, help="(default: the authors', 400; 1000 for cifar10)")
    p.add_argument("--stage2-epochs", type=int, help="(default: the authors', 800; 2000 for cifar10)")
    p.add_argument("--n-fid", type=int, default=10000, help="samples per FID, against 10,000 test images (the paper's)")
    p.add_argument("--no-minmax", action="store_true", help="skip the FIDs in the authors' per-image min-max convention "
                   "(the paper's numbers used it; the standard x*255 FID is always computed)")
    p.add_argument("--curve", help="a long learned-gamma run directory whose snapshots stage1_eNNNN.pt give the budget curve "
                   "(default: none, no curve)")
    p.add_argument("--curve-epochs", type=epochs, default=[], help="snapshot epochs for the curve, e.g. 5,10,20,40")
    p.add_argument("--curve-n-fid", type=int, default=5000, help="samples per FID on the curve")
    p.add_argument("--stage2-curve", type=epochs, default=[], help="stage-2 epochs at which the learned-gamma trials' 2-stage FID "
                   "is measured too, from stage 2's snapshots, e.g. 100,200,400,800; stage 2 runs in parts ending there, "
                   "each point scored when reached")
    p.add_argument("--out", default=None, help="trial directories go here (default: runs/table1-<data>)")
    p.add_argument("--json", default=None, help="summary JSON (default: <out>/summary.json)")
    p.add_argument("--json-key", default=None, help="write the summary under this key of --json, keeping the file's "
                   "other keys, e.g. full_protocol (default: none, the whole file)")
    p.add_argument("--plot", default=None, help="budget-curve PNG (default: beside --json)")
    p.add_argument("--stage2-plot", default=None, help="stage-2 curve PNG (default: beside --json)")
    p.add_argument("--data-root", default=os.environ.get("TWOSTAGE_DATA", "./data"), help="torchvision root")
    p.add_argument("--limit", type=int, default=0, help="stage 1 on the first N training images only (tests; 0 = all)")
    p.add_argument("--fid-ref-n", type=int, default=10000, help="test images in the FID reference (the paper's 10,000)")
    p.add_argument("--fid-cache", default=os.path.join(ROOT, "runs", "fid_stats"), help="fid.py's reference statistics cache")
    p.add_argument("--device", default=None, help="passed to every script (default: theirs, cuda when present)")
    return p.parse_args(argv)


def main(argv=None):
    a = parse_args(argv)
    # Table 1's budget: the scripts' defaults, 400 + 800 epochs, but CIFAR-10's 1000 + 2000
    default_epochs = CIFAR10_EPOCHS if a.data == "cifar10" else (STAGE1_DEFAULTS["epochs"], stage2.STAGE2_DEFAULTS["epochs"])
    if a.stage1_epochs is None:
        a.stage1_epochs = default_epochs[0]
    if a.stage2_epochs is None:
        a.stage2_epochs = default_epochs[1]
    decoders = [x for x in a.decoders.split(",") if x]
    for loss in decoders:  # every argument checked now, not after hours of training
        if loss not in ROW:
            die(f"--decoders: unknown decoder '{loss}'; fix: choose from {', '.join(ROW)}")
    if a.curve_epochs and not a.curve:
        die("--curve-epochs needs --curve DIR, the long run whose snapshots give the curve")
    stage2_curve = a.stage2_curve
    if stage2_curve and stage2_curve[-1] > a.stage2_epochs:
        die(f"--stage2-curve {','.join(map(str, stage2_curve))}: each epoch must be at most --stage2-epochs {a.stage2_epochs}")
    # paths are made absolute (the scripts' main() run in this process, in the caller's directory)
    out = os.path.abspath(a.out or os.path.join(ROOT, "runs", f"table1-{a.data}"))
    a.curve, a.json, a.plot, a.stage2_plot, a.data_root, a.fid_cache = [
        os.path.abspath(p) if p else p for p in (a.curve, a.json, a.plot, a.stage2_plot, a.data_root, a.fid_cache)]
    path = a.json or os.path.join(out, "summary.json")
    try:  # checked now, not after hours of training
        ok = isinstance(read_json(path) or {}, dict)
    except ValueError:
        ok = False
    if not ok:
        die(f"{path} exists and is not a JSON object; fix: pass another --json, or move that file away")
    fid.find_weights()  # the FID's Inception weights: found (or downloaded) now, not after hours of training
    started = time.time()

    long_run = (load_checkpoint(os.path.join(a.curve, "stage1.pt"), keys=("config",)) or die(f"{a.curve}/stage1.pt is missing; fix: pass the "
                "directory of a stage1.py run to --curve"))["config"] if a.curve else None
    if a.curve_epochs and not same_run(long_run, "learned-gamma", long_run["seed"], a):
        die(f"{a.curve} is not a learned-gamma {a.data} run like the trials'; fix: pass such a run to --curve")
    for e in a.curve_epochs:
        snapshot = os.path.join(a.curve, f"stage1_e{e:04d}.pt")
        if not os.path.exists(snapshot) and not os.path.exists(os.path.join(out, "curve", f"e{e:04d}", "stage1.pt")):
            die(f"{snapshot} is missing; fix: train the long run with --snapshots including {e}")
    trials = {}
    for loss in decoders:
        for seed in a.seeds:
            d = os.path.join(out, loss, f"seed{seed}")
            snapshot = None
            if long_run and same_run(long_run, loss, seed, a):  # the long run IS this trial's model, so far
                snapshot = os.path.join(a.curve, f"stage1_e{a.stage1_epochs:04d}.pt")
            elif long_run and loss == "learned-gamma":  # said, as it may mean hours of training here
                print(f"{a.curve} has other settings than the trial {loss}, seed {seed}: it trains its own stage 1", flush=True)
            trials[(loss, seed)] = trial(d, loss, seed, a.stage1_epochs, a.stage2_epochs, a.n_fid, not a.no_minmax, a,
                                         snapshot, stage2_curve)

    curve = []
    for e in a.curve_epochs:
        snapshot = os.path.join(a.curve, f"stage1_e{e:04d}.pt")
        d = os.path.join(out, "curve", f"e{e:04d}")
        r = trial(d, "learned-gamma", long_run["seed"], e, a.stage2_epochs, a.curve_n_fid, False, a, snapshot)
        curve.append({k: r[k] for k in ("stage1_epochs", "loggamma_x", "active_dims", "fid_one_stage", "fid_two_stage",
                                         "n_fid", "stage2_epochs", "loggamma_z", "mmd_stage1", "mmd_stage2")})

    rows = {}
    learned = [t for (loss, _), t in trials.items() if loss == "learned-gamma"]
    def row_over(got, key):  # mean +- std over the trials, in both conventions (min-max: the paper's)
        r = mean_std([t[key] for t in got])
        if key + "_minmax" in got[0]:
            m = mean_std([t[key + "_minmax"] for t in got])
            r.update(fid_minmax=m["fid"], std_minmax=m["std"], values_minmax=m["values"])
        return r
    if learned:
        rows["two_stage"] = row_over(learned, "fid_two_stage")
    for loss, row in ROW.items():
        got = [t for (l, _), t in trials.items() if l == loss]
        if got:
            rows[row] = row_over(got, "fid_one_stage")
    summary = {
        "budget": {**({"stage1_epochs": a.stage1_epochs, "stage2_epochs": a.stage2_epochs, "n_fid": a.n_fid} if trials else {}),
                   "seeds": a.seeds, "fid_reference": f"{a.fid_ref_n} test images; fid: standard convention (x*255)"
                   + (", fid_minmax: the authors' per-image min-max" if trials and not a.no_minmax else ""),
                   **({"curve_stage2_epochs": a.stage2_epochs, "curve_n_fid": a.curve_n_fid} if curve else {})},
        "machine": machine(), "date": datetime.date.today().isoformat(), "versions": versions(),
        # the machines the trials' steps ran on (in the trials' "steps"), which may differ from the one writing this
        "machines": sorted({call["machine"] for t in trials.values() for calls in t["steps"].values() for call in calls}),
        "command": "python results/table1.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "rows": rows,
        "paper": {"rows": {k: {"fid": v, "std": std} for k, (v, std) in PAPER[a.data].items()},
                  "mmd": dict(zip(("stage1", "stage2"), PAPER_MMD[a.data]))},
        "trials": {f"{loss}/seed{seed}": t for (loss, seed), t in trials.items()},
        "budget_curve": curve,
    }
    if learned:
        summary["mmd"] = {"stage1": float(np.mean([t["mmd_stage1"] for t in learned])),
                          "stage2": float(np.mean([t["mmd_stage2"] for t in learned])),
                          "estimator": learned[0]["mmd_estimator"]}
        summary["loggamma_x"] = float(np.mean([t["loggamma_x"] for t in learned]))
    if learned and stage2_curve:  # stage-2 epochs -> 2-stage FID, mean over the learned-gamma trials
        summary["stage2_curve"] = [{"stage2_epochs": e, **{k: float(np.mean([t["stage2_curve"][i][k] for t in learned]))
                                                            for k in learned[0]["stage2_curve"][i] if k != "stage2_epochs"}}
                                   for i, e in enumerate(stage2_curve)]
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    old = read_json(path) or {}
    last = (old.get(a.json_key) or {}) if a.json_key else old  # what the previous call wrote, and plotted
    # a plot is redrawn when its points or budget changed, or it is missing or older than this script
    # (make's rule): a call that finds everything done leaves a committed PNG as it is. Plots first,
    # the JSON last: a kill between them leaves the old JSON, so the next call redraws
    redraw = lambda png, key: not (newer(png, __file__) and last.get(key) == summary[key] and last.get("budget") == summary["budget"])
    png = a.plot or os.path.join(os.path.dirname(path), f"{a.data}_budget_curve.png")
    if curve and redraw(png, "budget_curve"):
        plot_curve(curve, png, a.fid_ref_n, a.data)
    png = a.stage2_plot or os.path.join(os.path.dirname(path), f"{a.data}_stage2_curve.png")
    if "stage2_curve" in summary and redraw(png, "stage2_curve"):
        plot_stage2_curve(summary["stage2_curve"], png, a.n_fid, a.fid_ref_n, a.data, a.stage1_epochs)
    if a.json_key:  # one entry of a larger file (e.g. results/mnist_table1.json's full_protocol), the rest kept
        summary["json_key"] = a.json_key
        save_atomic({**old, a.json_key: summary}, path)
    else:  # the whole file, except the entries other calls wrote there with --json-key
        save_atomic({**{k: v for k, v in old.items() if isinstance(v, dict) and v.get("json_key") == k}, **summary}, path)

    if rows:
        print(f"\nTable 1, {a.data}: {a.stage1_epochs} + {a.stage2_epochs} epochs, seeds {a.seeds}, FID of {a.n_fid} samples "
              f"vs {a.fid_ref_n} test images (ours: standard convention x*255" + ("" if a.no_minmax else ", and the authors' min-max") + ")")
        print(f"{'row':<20} {'ours':>16} {'ours, min-max':>16} {'paper (min-max)':>16}")
    for row, r in rows.items():
        ours = f"{r['fid']:.1f}" + (f" +- {r['std']:.1f}" if r["std"] is not None else "")
        minmax = (f"{r['fid_minmax']:.1f}" + (f" +- {r['std_minmax']:.1f}" if r["std_minmax"] is not None else "")
                  if "fid_minmax" in r else "-")
        print(f"{row:<20} {ours:>16} {minmax:>16} {PAPER[a.data][row][0]:>9.1f} +- {PAPER[a.data][row][1]}")
    if "mmd" in summary:
        print(f"Table 3 MMD to N(0, I): stage 1 {summary['mmd']['stage1']:.4f}, stage 2 {summary['mmd']['stage2']:.4f} "
              f"({summary['mmd']['estimator']}; the paper: {' / '.join(map(str, PAPER_MMD[a.data]))}, estimator not stated)")
    for c in summary.get("stage2_curve", []):
        print(f"stage-2 curve: stage-2 epoch {c['stage2_epochs']:>4} | FID 2-stage {c['fid']:.1f}"
              + (f" (min-max {c['fid_minmax']:.1f})" if "fid_minmax" in c else ""))
    for c in curve:
        print(f"curve: stage-1 epoch {c['stage1_epochs']:>4} | loggamma_x {c['loggamma_x']:.3f} | active dims {c['active_dims']} | "
              f"FID 1-stage {c['fid_one_stage']:.1f} | 2-stage {c['fid_two_stage']:.1f}")
    print(f"wrote {path} ({(time.time() - started) / 60:.1f} min)")


if __name__ == "__main__":
    main()
