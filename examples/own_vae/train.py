"""A plain-PyTorch VAE on sklearn's 8×8 digits, tuned through the worker SDK (see README.md)."""

import torch
from sklearn.datasets import load_digits
from torch import nn

from hpo_service import sdk
from trainers import techniques as tq


class VAE(nn.Module):  # Kingma & Welling 2014: Gaussian encoder, Bernoulli decoder
    def __init__(self, hidden: int, latent: int) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 2 * latent))
        self.dec = nn.Sequential(nn.Linear(latent, hidden), nn.ReLU(), nn.Linear(hidden, 64))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        mu, logvar = self.enc(x).chunk(2, dim=-1)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()  # reparameterisation trick
        return self.dec(z), mu, logvar


def neg_elbo(
    model: VAE, x: torch.Tensor, cfg: tq.TrainConfig, beta: float
) -> tuple[torch.Tensor, ...]:
    logits, mu, logvar = model(x)
    recon = tq.reconstruction_nll(logits, x, "bernoulli", 1.0).mean()
    kl = tq.gaussian_kl_per_dim(mu, logvar)
    kl_objective, _ = tq.free_bits_kl(kl, cfg.free_bits, cfg.free_bits_mode)
    return recon + beta * kl_objective, recon + kl.sum(-1).mean()  # objective, true −ELBO


data = torch.tensor(load_digits().data / 16.0, dtype=torch.float32)
train, val = data[:1400], data[1400:]
for trial in sdk.trials(idle_exit_s=5):
    with trial:
        cfg = tq.TrainConfig.from_mapping(trial.config)
        device = cfg.device.replace("auto", "cuda" if torch.cuda.is_available() else "cpu")
        torch.manual_seed(cfg.seed)
        train, val = train.to(device), val.to(device)
        model = VAE(cfg.hidden_sizes[0], cfg.latent_dim).to(device)
        opt = torch.optim.AdamW(model.parameters(), weight_decay=cfg.weight_decay)
        steps = len(train) // cfg.batch_size
        kl_s, lr_s = tq.kl_schedule_from_config(cfg, steps), tq.lr_schedule_from_config(cfg, steps)
        for epoch in range(cfg.epochs):
            for i, batch in enumerate(
                train[torch.randperm(len(train), device=device)].split(cfg.batch_size)[:steps]
            ):
                step = epoch * steps + i
                for group in opt.param_groups:
                    group["lr"] = tq.learning_rate(step, lr_s)
                loss, _ = neg_elbo(model, batch, cfg, tq.kl_beta(step, kl_s))
                opt.zero_grad()
                loss.backward()
                opt.step()
            with torch.no_grad():
                _, val_neg_elbo = neg_elbo(model, val, cfg, 1.0)
            trial.report(epoch, val_neg_elbo.item(), lr=tq.learning_rate(step, lr_s))
