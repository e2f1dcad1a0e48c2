"""The ELBO-scaling study: what averaging the reconstruction over pixels does to a VAE.

    python examples/elbo_scaling.py                 # the full study, about 5 min on 2 CPU cores
    python examples/elbo_scaling.py --plot-only     # redraw the figures from the cached results
    python examples/elbo_scaling.py --tiny          # seconds: 3 configs, 1 seed, binarized, into $TMPDIR

Trains vaekern.demo's DigitsVAE on scikit-learn's bundled 8x8 digits (D = 64 pixels), grey
levels under a continuous-Bernoulli decoder and binarized under a Bernoulli one, with the
summed negative ELBO (beta = 1), with the reconstruction averaged over pixels (recon / D +
KL: the Keras-example mistake), with beta in {0.1, ..., 8, D}, with free bits at beta = 1,
and with a KL warm-up; three seeds each, same model, optimizer and split throughout. Every
model is then scored on the held-out digits by the same yardsticks, whatever it trained
on: the beta = 1 negative ELBO (the true bound), an importance-weighted log-likelihood
bound, the reconstruction NLL, the KL, and the active units. A float64 check shows that the
mean-over-pixels loss has exactly the gradient of the beta = D ELBO divided by D.

The results are cached in <out>/results.json and <out>/reconstructions.npz, and the figures
(<out>/*.png) are drawn from that cache. docs/elbo_scaling.md reads the committed run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import vaekern
from vaekern.demo import DigitsVAE, load_digits

D = 64  # pixels per digit
LATENT = 8
HIDDEN = 128  # half the demo's width: the 78 runs of the study fit in a few minutes on 2 cores
BATCH = 128
LR = 2e-3
IW_SAMPLES = 256  # k of the importance-weighted bound
WARMUP_FRACTION = 0.5  # the warm-up raises beta linearly from 0 to 1 over this share of the steps
SHOWN = 12  # test digits in the reconstruction grids
SEEDS = (0, 1, 2)
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "docs" / "elbo_scaling"
TINY_OUT = Path(tempfile.gettempdir()) / "elbo_scaling_tiny"

# Dataset -> the likelihood that models it: grey levels need a density on [0, 1], which the
# plain Bernoulli is not; binarized pixels are what the Bernoulli is for.
DATASETS = {"grey": "continuous_bernoulli", "binary": "bernoulli"}
NLL = {"bernoulli": vaekern.bernoulli_nll, "continuous_bernoulli": vaekern.continuous_bernoulli_nll}


@dataclasses.dataclass(frozen=True)
class Config:
    """One training objective. ``beta`` is the KL weight of the summed ELBO."""

    name: str
    beta: float = 1.0
    free_bits: float = 0.0
    mean_over_pixels: bool = False
    warmup: bool = False


BETAS = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, float(D))
CONFIGS = {
    c.name: c
    for c in (
        Config("mean-over-pixels", mean_over_pixels=True),
        *(Config(f"beta-{b:g}", beta=b) for b in BETAS),
        *(Config(f"free-bits-{lam:g}", free_bits=lam) for lam in (0.05, 0.1, 0.25)),
        Config("warm-up", warmup=True),
    )
}
SUM = "beta-1"  # the summed ELBO, the correct loss
BETA_D = f"beta-{D}"
TINY = {"configs": (SUM, "mean-over-pixels", BETA_D), "seeds": (0,), "datasets": ("binary",), "epochs": 3}


def digits() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Train and test splits (vaekern.demo's fixed split) of both datasets."""
    train, test = load_digits(torch.device("cpu"))
    return {
        "grey": (train, test),
        "binary": ((train > 0.5).float(), (test > 0.5).float()),
    }


def encode(model: DigitsVAE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    h = model.encoder(x)
    return model.to_mu(h), model.to_logvar(h)


def training_loss(config: Config, logits, x, mu, logvar, likelihood: str, beta: torch.Tensor) -> torch.Tensor:
    if config.mean_over_pixels:
        # What users of the Keras example write: the per-pixel cross-entropy averaged over the
        # D pixels (keras.losses.binary_crossentropy's mean over the last axis), plus the KL.
        return NLL[likelihood](logits, x) / x.shape[1] + vaekern.gaussian_kl(mu, logvar)
    return vaekern.vae_loss(logits, x, mu, logvar, beta=beta, likelihood=likelihood, free_bits=config.free_bits)


def decoded_mean(logits: torch.Tensor, likelihood: str) -> torch.Tensor:
    """The mean of p(x|z), which is what a reconstruction should show. For the continuous
    Bernoulli it is not sigmoid(logits): the density's mean is pulled towards 1/2."""
    if likelihood == "bernoulli":
        return torch.sigmoid(logits)
    return torch.distributions.ContinuousBernoulli(logits=logits).mean


@torch.no_grad()
def evaluate(model: DigitsVAE, x: torch.Tensor, likelihood: str, k: int, seed: int) -> tuple[dict, torch.Tensor]:
    """Held-out metrics in nats per digit, averaged over the test set, and the
    reconstructions (the decoder's mean at z = E_q[z]).

    The negative ELBO is the beta = 1 bound, whatever beta trained the model: recon (its
    expectation under q estimated with the same k samples) + the analytic KL. The
    importance-weighted bound (Burda et al. 2016) is
    log p(x) >= E[log (1/k) sum_i p(x|z_i) p(z_i) / q(z_i|x)], z_i ~ q(z|x),
    which tightens towards log p(x) as k grows and equals the ELBO at k = 1.
    """
    mu, logvar = encode(model, x)
    eps = torch.randn((k, *mu.shape), generator=torch.Generator().manual_seed(seed))
    z = vaekern.reparameterize(mu.expand_as(eps).flatten(0, 1), logvar.expand_as(eps).flatten(0, 1), eps=eps.flatten(0, 1))
    logits = model.decoder(z)
    nll = NLL[likelihood](logits, x.repeat(k, 1), reduction="none").view(k, len(x))
    z = z.view(eps.shape)
    log_2pi = math.log(2 * math.pi)
    log_pz = -0.5 * (z.square() + log_2pi).sum(-1)
    log_qz = -0.5 * (eps.square() + logvar + log_2pi).sum(-1)  # (z - mu)^2 / var = eps^2
    iw_ll = torch.logsumexp(-nll + log_pz - log_qz, dim=0) - math.log(k)
    recon = nll.mean(0)
    kl = vaekern.gaussian_kl(mu, logvar, reduction="none")
    shown = decoded_mean(model.decoder(mu), likelihood)
    metrics = {
        "neg_elbo": (recon + kl).mean().item(),
        "iw_ll": iw_ll.mean().item(),
        "recon": recon.mean().item(),
        "kl": kl.mean().item(),
        "active_units": int(vaekern.diagnostics.active_units(mu).sum()),
        # How much the reconstructions differ between digits: the per-pixel standard
        # deviation over the test set, averaged over pixels. 0 when every digit decodes alike.
        "recon_spread": shown.std(0).mean().item(),
    }
    return metrics, shown


_DATA: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


def _init_worker() -> None:
    # The MLP is small: one thread per training run, and runs side by side, is faster than
    # several threads sharing one run.
    torch.set_num_threads(1)
    _DATA.update(digits())


def train_one(job: tuple[str, str, int, int]) -> dict:
    """Train one (dataset, config, seed) for ``epochs`` and score it on the test digits."""
    dataset, name, seed, epochs = job
    config, likelihood = CONFIGS[name], DATASETS[dataset]
    train, test = _DATA[dataset]
    start = time.perf_counter()
    torch.manual_seed(seed)
    model = DigitsVAE(pixels=D, hidden=HIDDEN, latent=LATENT)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    # A 0-d tensor, so the warm-up anneals it in place: the same loss call every step.
    beta = torch.tensor(0.0 if config.warmup else config.beta)
    steps_per_epoch = math.ceil(len(train) / BATCH)
    warmup_steps = WARMUP_FRACTION * epochs * steps_per_epoch
    step = 0
    for _ in range(epochs):
        for idx in torch.randperm(len(train)).split(BATCH):
            if config.warmup:
                beta.fill_(min(1.0, step / warmup_steps))
            x = train[idx]
            logits, mu, logvar = model(x)
            loss = training_loss(config, logits, x, mu, logvar, likelihood, beta)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    train_s = time.perf_counter() - start
    metrics, shown = evaluate(model, test, likelihood, IW_SAMPLES, seed)
    return {
        "dataset": dataset,
        "config": name,
        "seed": seed,
        "train_s": round(train_s, 2),
        "metrics": metrics,
        "recon_grid": shown[:SHOWN].numpy(),
    }


def gradient_check(train: torch.Tensor, likelihood: str) -> dict[str, float]:
    """The mean-over-pixels loss against the beta = D ELBO, in float64, on one batch.

    recon / D + KL = (recon + D * KL) / D, so its gradient should be the beta = D gradient
    divided by D: cosine 1, norm ratio D. Against the beta = 1 ELBO the directions differ.
    """
    torch.manual_seed(0)
    model = DigitsVAE(pixels=D, hidden=HIDDEN, latent=LATENT).double()
    x = train[:BATCH].double()
    eps = torch.randn(len(x), LATENT, dtype=torch.float64)
    params = list(model.parameters())

    def grad(config: Config) -> torch.Tensor:
        mu, logvar = encode(model, x)
        logits = model.decoder(vaekern.reparameterize(mu, logvar, eps=eps))
        loss = training_loss(config, logits, x, mu, logvar, likelihood, torch.tensor(config.beta, dtype=torch.float64))
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])

    g_mean, g_beta_d, g_sum = (grad(CONFIGS[n]) for n in ("mean-over-pixels", BETA_D, SUM))
    return {
        "cosine_mean_vs_beta_D": F.cosine_similarity(g_mean, g_beta_d, dim=0).item(),
        "norm_ratio_beta_D_over_mean": (g_beta_d.norm() / g_mean.norm()).item(),
        "rel_diff_D_times_mean_vs_beta_D": ((D * g_mean - g_beta_d).abs().max() / g_beta_d.abs().max()).item(),
        "cosine_mean_vs_sum": F.cosine_similarity(g_mean, g_sum, dim=0).item(),
    }


def environment(workers: int, epochs: int, seeds, wall_s: float, load_before) -> dict:
    """Where and with what the run was made, for the document to quote."""
    root = Path(__file__).resolve().parents[1]
    commit = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], cwd=root, check=True,
                            capture_output=True, text=True).stdout.strip()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    import sklearn

    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "workers": workers,
        "threads_per_run": 1,
        "load_average_before": load_before,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "sklearn": sklearn.__version__,
        "vaekern_commit": commit,
        "seeds": list(seeds),
        "epochs": epochs,
        "batch_size": BATCH,
        "lr": LR,
        "hidden": HIDDEN,
        "latent": LATENT,
        "iw_samples": IW_SAMPLES,
        "warmup_fraction": WARMUP_FRACTION,
        "wall_s": round(wall_s, 1),
        "date": time.strftime("%Y-%m-%d"),
    }


def run_study(out: Path, configs, seeds, datasets, epochs: int, workers: int) -> None:
    from tqdm import tqdm

    start = time.perf_counter()
    load_before = [round(v, 2) for v in os.getloadavg()]
    torch.set_num_threads(1)
    data = digits()
    checks = {ds: gradient_check(data[ds][0], DATASETS[ds]) for ds in datasets}
    jobs = [(ds, c, s, epochs) for ds in datasets for c in configs for s in seeds]
    bar = tqdm(total=len(jobs), desc="training", unit="run")
    results = []
    if workers > 1:
        with multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker) as pool:
            for r in pool.imap_unordered(train_one, jobs):
                results.append(r)
                bar.update()
    else:
        _init_worker()
        for job in jobs:
            results.append(train_one(job))
            bar.update()
    bar.close()
    results.sort(key=lambda r: (list(DATASETS).index(r["dataset"]), list(CONFIGS).index(r["config"]), r["seed"]))

    out.mkdir(parents=True, exist_ok=True)
    grids = {f"{ds}__input": data[ds][1][:SHOWN].numpy() for ds in datasets}
    grids.update({f"{r['dataset']}__{r['config']}": r.pop("recon_grid") for r in results if r["seed"] == seeds[0]})
    for r in results:
        r.pop("recon_grid", None)
    np.savez_compressed(out / "reconstructions.npz", **grids)
    spread = {ds: data[ds][1].std(0).mean().item() for ds in datasets}
    meta = environment(workers, epochs, seeds, time.perf_counter() - start, load_before)
    cache = {"environment": meta, "data_spread": spread, "gradient_check": checks, "runs": results}
    (out / "results.json").write_text(json.dumps(cache, indent=1) + "\n")


def summarize(cache: dict) -> dict[tuple[str, str], dict[str, tuple[float, float]]]:
    """(dataset, config) -> metric -> (mean, sample standard deviation over seeds)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in cache["runs"]:
        groups.setdefault((r["dataset"], r["config"]), []).append(r["metrics"])
    return {
        key: {m: (float(np.mean([v[m] for v in vals])), float(np.std([v[m] for v in vals], ddof=len(vals) > 1)))
              for m in vals[0]}
        for key, vals in groups.items()
    }


def print_report(cache: dict) -> None:
    env = cache["environment"]
    print(f"{env['cpu']} | {env['cpu_count']} cores | {env['workers']} workers | python {env['python']} | "
          f"torch {env['torch']} | vaekern {env['vaekern_commit']} | seeds {env['seeds']} | "
          f"{env['epochs']} epochs | wall {env['wall_s']} s")
    for ds, check in cache["gradient_check"].items():
        print(f"gradient check ({ds}, float64): cos(mean-over-pixels, beta=D) = {check['cosine_mean_vs_beta_D']:.15f}, "
              f"|g_beta=D| / |g_mean| = {check['norm_ratio_beta_D_over_mean']:.12f} (D = {D}), "
              f"max|D g_mean - g_beta=D| / max|g_beta=D| = {check['rel_diff_D_times_mean_vs_beta_D']:.1e}, "
              f"cos(mean-over-pixels, sum) = {check['cosine_mean_vs_sum']:.4f}")
    stats = summarize(cache)
    for ds, likelihood in DATASETS.items():
        rows = [(c, stats[(ds, c)]) for c in CONFIGS if (ds, c) in stats]
        if not rows:
            continue
        print(f"\n{ds} ({likelihood}): held-out digits, nats per digit, mean ± std over seeds; "
              f"the test digits' own spread is {cache['data_spread'][ds]:.3f}")
        print("| training loss | " + " | ".join(header for header, *_ in COLUMNS) + " |")
        print("|---" + "|--:" * len(COLUMNS) + "|")
        for name, s in rows:
            cells = (f"{sign * s[key][0]:{fmt}} ± {s[key][1]:{fmt}}" for _, key, sign, fmt in COLUMNS)
            print(f"| {label(name)} | " + " | ".join(cells) + " |")


# The report's columns: header, metric, sign (the IW bound is printed as an NLL, like the
# others, so that lower is better in every nats column), format.
COLUMNS = (
    ("-ELBO at β = 1", "neg_elbo", 1, ".2f"),
    (f"-log p(x), IW k = {IW_SAMPLES}", "iw_ll", -1, ".2f"),
    ("recon NLL", "recon", 1, ".2f"),
    ("KL", "kl", 1, ".2f"),
    ("active units", "active_units", 1, ".1f"),
    ("recon spread", "recon_spread", 1, ".3f"),
)


def label(name: str) -> str:
    config = CONFIGS[name]
    if config.mean_over_pixels:
        return "mean over pixels"
    if config.warmup:
        return "KL warm-up, β 0 → 1"
    if config.free_bits:
        return f"free bits λ = {config.free_bits:g}"
    return "sum, β = 1" if name == SUM else f"β = {config.beta:g}"


def _beta_path(stats, ds):
    names = [f"beta-{b:g}" for b in BETAS if (ds, f"beta-{b:g}") in stats]
    return [CONFIGS[n].beta for n in names], [stats[(ds, n)] for n in names]


def _annotate_path(ax, betas, xs, ys) -> None:
    """Label each point of the beta path; points that coincide (the collapsed ones) share one label."""
    x_span, y_span = np.ptp(ax.get_xlim()), np.ptp(ax.get_ylim())
    groups: list[list[int]] = []
    for i in range(len(betas)):
        if groups and all(abs(xs[i] - xs[j]) < 0.02 * x_span and abs(ys[i] - ys[j]) < 0.02 * y_span for j in groups[-1]):
            groups[-1].append(i)
        else:
            groups.append([i])
    for g in groups:
        label = "β=" + ", ".join(f"{betas[i]:g}" for i in g)
        ax.annotate(label, (xs[g[0]], ys[g[0]]), textcoords="offset points", xytext=(6, 4), fontsize=8)


def plot(cache: dict, grids: dict[str, np.ndarray], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = summarize(cache)
    datasets = [ds for ds in DATASETS if any(k[0] == ds for k in stats)]
    titles = {"grey": "grey levels, continuous Bernoulli", "binary": "binarized, Bernoulli"}
    seed_points: dict[str, list[dict]] = {}
    for r in cache["runs"]:
        seed_points.setdefault(r["dataset"], []).append(r["metrics"])
    others = [("mean-over-pixels", {"marker": "X", "color": "C3", "s": 130}, "mean over pixels"),
              ("warm-up", {"marker": "D", "color": "C2", "s": 45}, "KL warm-up (β 0→1)")]
    others += [(n, {"marker": m, "color": "C1", "s": 45}, f"free bits λ={CONFIGS[n].free_bits:g} (β=1)")
               for n, m in zip([n for n in CONFIGS if CONFIGS[n].free_bits], ("^", ">", "v"))]

    # The rate-distortion plane: every model is a point (KL, recon); -ELBO = recon + KL is
    # constant along lines of slope -1.
    fig, axes = plt.subplots(1, len(datasets), figsize=(6.2 * len(datasets), 5), squeeze=False)
    for ax, ds in zip(axes[0], datasets):
        points = seed_points[ds]
        ax.scatter([p["kl"] for p in points], [p["recon"] for p in points], s=6, color="0.6", zorder=1)
        betas, path = _beta_path(stats, ds)
        xs, ys = [s["kl"][0] for s in path], [s["recon"][0] for s in path]
        ax.plot(xs, ys, "-o", color="C0", label="β path (summed ELBO)")
        for name, style, label in others:
            if (ds, name) in stats:
                ax.scatter(stats[(ds, name)]["kl"][0], stats[(ds, name)]["recon"][0], zorder=3, label=label, **style)
        x0, x1 = ax.get_xlim()
        y0, y1 = ax.get_ylim()
        for level in np.linspace(x0 + y0, x1 + y1, 9)[1:-1]:
            ax.plot([x0, x1], [level - x0, level - x1], ":", color="0.75", lw=0.8, zorder=0)
        ax.set_xlim(x0, x1)
        ax.set_ylim(y0, y1)
        _annotate_path(ax, betas, xs, ys)
        ax.set_xlabel("rate: KL(q(z|x) || p(z)), nats")
        ax.set_ylabel("distortion: reconstruction NLL, nats")
        ax.set_title(titles[ds])
        ax.legend(fontsize=8)
        ax.grid(alpha=0.2)
    fig.suptitle("Held-out digits on the rate-distortion plane\n(mean over seeds; grey dots: single runs; "
                 "dotted: equal -ELBO)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "rate_distortion.png", dpi=120)
    plt.close(fig)

    # Active units against beta.
    fig, ax = plt.subplots(figsize=(6.2, 4.5))
    for i, ds in enumerate(datasets):
        betas, path = _beta_path(stats, ds)
        ax.errorbar(betas, [s["active_units"][0] for s in path], yerr=[s["active_units"][1] for s in path],
                    fmt="-o", color=f"C{i}", capsize=3, label=titles[ds])
        if (ds, "mean-over-pixels") in stats:
            ax.scatter(D, stats[(ds, "mean-over-pixels")]["active_units"][0], marker="X", s=130, color="C3", zorder=3,
                       label="mean over pixels (drawn at β = D)" if i == 0 else None)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("β (KL weight in training)")
    ax.set_ylabel(f"active units (of {LATENT})")
    ax.set_ylim(-0.3, LATENT + 0.3)
    ax.set_title("Active units on held-out digits: Var_x(E_q[z_j]) > 0.01", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "active_units.png", dpi=120)
    plt.close(fig)

    # The true bound against beta, one panel per dataset (their nats are on different scales).
    fig, axes = plt.subplots(1, len(datasets), figsize=(6.2 * len(datasets), 4.5), squeeze=False)
    for ax, ds in zip(axes[0], datasets):
        betas, path = _beta_path(stats, ds)
        ax.errorbar(betas, [s["neg_elbo"][0] for s in path], yerr=[s["neg_elbo"][1] for s in path], fmt="-o",
                    capsize=3, color="C0", label="-ELBO at β = 1")
        ax.errorbar(betas, [-s["iw_ll"][0] for s in path], yerr=[s["iw_ll"][1] for s in path], fmt="--s",
                    capsize=3, color="C4", label=f"-log p(x), IW bound (k = {cache['environment']['iw_samples']})")
        if (ds, "mean-over-pixels") in stats:
            s = stats[(ds, "mean-over-pixels")]
            ax.scatter([D, D], [s["neg_elbo"][0], -s["iw_ll"][0]], marker="X", s=130, color="C3", zorder=3,
                       label="mean over pixels (drawn at β = D)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("β (KL weight in training)")
        ax.set_ylabel("nats per test digit (lower is better)")
        ax.set_title(titles[ds])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("The β = 1 bound on held-out digits,\nwhatever β the model trained with", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "bound_vs_beta.png", dpi=120)
    plt.close(fig)

    # Reconstructions: the summed ELBO against the mean over pixels, and beta = D.
    rows = [("input", "input"), (SUM, "sum (β = 1)"), ("mean-over-pixels", "mean over pixels"), (BETA_D, f"β = {D}")]
    fig, axes = plt.subplots(len(datasets), 1, figsize=(8, 2.5 * len(datasets)), squeeze=False)
    for ax, ds in zip(axes[:, 0], datasets):
        present = [(key, label) for key, label in rows if f"{ds}__{key}" in grids]
        tiles = np.full((len(present) * 9 + 1, SHOWN * 9 + 1), 0.15)  # light grey between digits
        for r, (key, _) in enumerate(present):
            for c, img in enumerate(grids[f"{ds}__{key}"]):
                tiles[1 + 9 * r: 9 * r + 9, 1 + 9 * c: 9 * c + 9] = img.reshape(8, 8)
        ax.imshow(tiles, cmap="gray_r", vmin=0, vmax=1)
        ax.set_yticks([9 * r + 5 for r in range(len(present))], [label for _, label in present])
        ax.set_xticks([])
        ax.set_title(f"{titles[ds]}: held-out digits and the decoder's mean at z = E_q[z] "
                     f"(seed {cache['environment']['seeds'][0]})", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "reconstructions.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help=f"default: {DEFAULT_OUT}, or {TINY_OUT} with --tiny "
                        "(a tiny run must not overwrite the committed results)")
    parser.add_argument("--plot-only", action="store_true", help="redraw the figures from <out>/results.json")
    parser.add_argument("--tiny", action="store_true", help="3 configs, 1 seed, binarized digits, 3 epochs")
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument("--workers", type=int, default=2, help="training runs side by side, 1 thread each")
    args = parser.parse_args(argv)
    args.out = args.out or (TINY_OUT if args.tiny else DEFAULT_OUT)

    if not args.plot_only:
        if args.tiny:
            run_study(args.out, TINY["configs"], TINY["seeds"], TINY["datasets"], TINY["epochs"], args.workers)
        else:
            run_study(args.out, list(CONFIGS), SEEDS, list(DATASETS), args.epochs, args.workers)
    cache = json.loads((args.out / "results.json").read_text())
    with np.load(args.out / "reconstructions.npz") as npz:
        grids = dict(npz)
    print_report(cache)
    plot(cache, grids, args.out)
    print(f"figures: {', '.join(str(p) for p in sorted(args.out.glob('*.png')))}")
    return cache


if __name__ == "__main__":
    main()
