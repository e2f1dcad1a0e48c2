"""Train a small VAE on scikit-learn's bundled 8x8 digits with vaekern.vae_loss.

    python -m vaekern.demo [--epochs 150] [--beta 1.0] [--out demo_out]

Prints the negative ELBO and its two terms each epoch, and saves two PNGs: test digits
beside their reconstructions, and the loss curves. Runs on the GPU when there is one.
Nothing is downloaded: the digits ship with scikit-learn.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from torch import nn

import vaekern


class DigitsVAE(nn.Module):
    """An MLP VAE for 64-pixel images with a Bernoulli decoder (it outputs logits)."""

    def __init__(self, pixels: int = 64, hidden: int = 256, latent: int = 8) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(pixels, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.to_mu = nn.Linear(hidden, latent)
        self.to_logvar = nn.Linear(hidden, latent)
        self.decoder = nn.Sequential(
            nn.Linear(latent, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, pixels)
        )

    def forward(self, x: torch.Tensor, backend: str = "auto"):
        h = self.encoder(x)
        mu, logvar = self.to_mu(h), self.to_logvar(h)
        z = vaekern.reparameterize(mu, logvar, backend=backend)
        return self.decoder(z), mu, logvar


def load_digits(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Train and test splits of the 1797 digits, intensities scaled to [0, 1]."""
    from sklearn.datasets import load_digits as sk_load_digits

    x = torch.tensor(sk_load_digits().data, dtype=torch.float32) / 16.0
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x = x[perm].to(device)
    return x[:1500], x[1500:]


def evaluate(model: DigitsVAE, x: torch.Tensor, backend: str) -> vaekern.VAELossParts:
    model.eval()
    with torch.no_grad():
        mu, logvar = model.to_mu(model.encoder(x)), model.to_logvar(model.encoder(x))
        recon = model.decoder(mu)
        parts = vaekern.vae_loss(recon, x, mu, logvar, return_parts=True, backend=backend)
    model.train()
    return parts


def save_reconstructions(model: DigitsVAE, x: torch.Tensor, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with torch.no_grad():
        recon = torch.sigmoid(model.decoder(model.to_mu(model.encoder(x[:16])))).cpu()
    fig, axes = plt.subplots(4, 8, figsize=(8, 4.4))
    for i in range(16):
        row, col = 2 * (i // 8), i % 8
        axes[row, col].imshow(x[i].cpu().reshape(8, 8).numpy(), cmap="gray_r", vmin=0, vmax=1)
        axes[row + 1, col].imshow(recon[i].reshape(8, 8).numpy(), cmap="gray_r", vmin=0, vmax=1)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, 0].set_ylabel("input")
    axes[1, 0].set_ylabel("recon")
    axes[2, 0].set_ylabel("input")
    axes[3, 0].set_ylabel("recon")
    fig.suptitle("Held-out digits and their reconstructions from the posterior mean")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_curves(history: dict[str, list[float]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = range(1, len(history["loss"]) + 1)
    for key, label in (("loss", "negative ELBO"), ("recon", "reconstruction NLL"), ("kl", "KL")):
        ax.plot(epochs, history[key], label=f"train {label}")
    ax.plot(epochs, history["test_loss"], "--", label="test negative ELBO, decoded at the mean")
    ax.set_xlabel("epoch")
    ax.set_ylabel("nats per image")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--latent", type=int, default=8)
    parser.add_argument("--beta", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default="auto", choices=("auto", "reference", "triton", "cuda", "cpu"))
    parser.add_argument("--out", default="demo_out")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from tqdm import tqdm

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    train, test = load_digits(device)
    model = DigitsVAE(latent=args.latent).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    backend = vaekern.backends.auto(device) if args.backend == "auto" else args.backend
    print(f"vaekern {vaekern.__version__} | device {device} | backend {backend} | "
          f"{len(train)} train / {len(test)} test digits | beta {args.beta}")

    history: dict[str, list[float]] = {"loss": [], "recon": [], "kl": [], "test_loss": []}
    start = time.perf_counter()
    bar = tqdm(range(1, args.epochs + 1), desc="training", unit="epoch")
    for epoch in bar:
        perm = torch.randperm(len(train), device=device)
        totals = torch.zeros(3, device=device)
        for idx in perm.split(args.batch_size):
            x = train[idx]
            recon, mu, logvar = model(x, backend=args.backend)
            parts = vaekern.vae_loss(recon, x, mu, logvar, beta=args.beta, return_parts=True, backend=args.backend)
            opt.zero_grad(set_to_none=True)
            parts.loss.backward()
            opt.step()
            # Accumulate on the device; one host read per epoch, not per step.
            totals += torch.stack([p.detach() for p in parts]) * len(idx)
        loss, recon_nll, kl = (totals / len(train)).tolist()
        test_loss = evaluate(model, test, args.backend).loss.item()
        for key, value in zip(history, (loss, recon_nll, kl, test_loss)):
            history[key].append(value)
        bar.set_postfix(neg_elbo=f"{loss:.2f}")
        tqdm.write(f"epoch {epoch:3d} | -ELBO {loss:8.3f} | recon {recon_nll:8.3f} | KL {kl:7.3f} "
                   f"| test -ELBO {test_loss:8.3f}")

    os.makedirs(args.out, exist_ok=True)
    save_reconstructions(model, test, os.path.join(args.out, "reconstructions.png"))
    save_curves(history, os.path.join(args.out, "loss_curves.png"))
    print(f"trained {args.epochs} epochs in {time.perf_counter() - start:.1f} s; "
          f"saved {args.out}/reconstructions.png and {args.out}/loss_curves.png")
    return history


if __name__ == "__main__":
    main()
