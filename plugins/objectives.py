"""Built-in objectives: next-token cross-entropy for discrete modalities, DDPM noise prediction for continuous.

``next_token`` is the Chameleon-style loss when images are VQ tokens: every discrete token is predicted from
the positions before it. ``diffusion`` is the Transfusion-style loss on continuous latents: each segment of a
continuous modality (a run of its positions within one document, e.g. one image) is noised to a random
diffusion step, ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``, and the model predicts, at those
positions, the noise ``eps``, the clean latents ``x_0`` or the velocity ``v = sqrt(abar_t) eps -
sqrt(1 - abar_t) x_0`` (``prediction``), with the preceding tokens (the caption) as condition through the
causal sequence. The step ``t`` reaches the model in ``batch.timesteps``, whose embedding the model adds to the
noised latents' adapter output (:class:`momkit.model.TimestepEmbedding`). ``Diffusion.sample`` runs the reverse
process (DDPM or DDIM) for :func:`momkit.generation.generate`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field

from momkit import hookimpl
from momkit.batch import Batch, segments as segment_ids
from momkit.descriptors import Objective
from momkit.spec import ObjectiveConfig


class NextTokenConfig(ObjectiveConfig):
    """Cross-entropy of the next token."""

    label_smoothing: float = Field(0.0, ge=0, lt=1, description="Label smoothing of the cross-entropy.")


class DiffusionConfig(ObjectiveConfig):
    """DDPM noise prediction on continuous latents."""

    timesteps: int = Field(1000, ge=1, description="Number of diffusion steps T.")
    schedule: str = Field("cosine", pattern="^(cosine|linear)$", description="Noise schedule: `cosine` "
                                                                             "(Nichol & Dhariwal) or `linear`.")
    prediction: str = Field("noise", pattern="^(noise|x0|velocity)$",
                            description="What the head predicts: the `noise` eps, the clean latents `x0`, or the "
                                        "`velocity` sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho).")


class NextToken:
    """Summed cross-entropy of the tokens of one discrete modality, predicted from the previous position."""

    def __init__(self, config: NextTokenConfig, name: str):
        self.config, self.name = config, name

    def prepare(self, batch: Batch, generator: torch.Generator) -> tuple[Batch, None]:
        return batch, None

    def __call__(self, output, batch: Batch, context: None) -> tuple[torch.Tensor, int]:
        logits = output.predictions[self.name]
        targets = batch.tokens[output.targets[self.name]]
        loss = F.cross_entropy(logits.float(), targets, reduction="sum", label_smoothing=self.config.label_smoothing)
        return loss, targets.numel()


def _alpha_bar(config: DiffusionConfig) -> torch.Tensor:
    """``(T,)`` cumulative signal fraction ``abar_t`` for ``t = 1..T``: cosine (Nichol & Dhariwal), or DDPM's
    linear betas from 1e-4 to 0.02, scaled by ``1000 / T`` as Nichol & Dhariwal's code does, so that every
    ``T`` ends near pure noise (unchanged at ``T = 1000``)."""
    t = torch.arange(1, config.timesteps + 1, dtype=torch.float64) / config.timesteps
    if config.schedule == "cosine":
        f = torch.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        return (f / math.cos(0.008 / 1.008 * math.pi / 2) ** 2).clamp(1e-5, 1.0)
    scale = 1000 / config.timesteps
    betas = torch.linspace(scale * 1e-4, scale * 0.02, config.timesteps, dtype=torch.float64).clamp(max=0.999)
    return torch.cumprod(1 - betas, 0)


class Diffusion:
    """Noises one continuous modality's latents per segment, gives the model their steps, and scores the
    prediction (summed over positions of the mean squared error over latent channels)."""

    def __init__(self, config: DiffusionConfig, name: str, modality_id: int, latent_dim: int):
        self.config, self.name, self.modality_id, self.latent_dim = config, name, modality_id, latent_dim
        self.alpha_bar = _alpha_bar(config)

    def prepare(self, batch: Batch, generator: torch.Generator) -> tuple[Batch, torch.Tensor]:
        where = batch.modality == self.modality_id
        if self.name not in batch.latents:
            return batch, torch.zeros(0, self.latent_dim, device=batch.modality.device)
        clean = batch.latents[self.name]
        segments = segment_ids(batch.modality, batch.seq_idx)
        count = int(segments.max()) + 1
        steps = torch.randint(0, self.config.timesteps, (count,), generator=generator)
        abar = self.alpha_bar[steps].to(clean.dtype).to(clean.device)[segments][..., None]
        noise = torch.randn(clean.shape, generator=generator, dtype=clean.dtype).to(clean.device)
        noised = torch.where(where[..., None], abar.sqrt() * clean + (1 - abar).sqrt() * noise, clean)
        latents = {**batch.latents, self.name: noised}
        timesteps = {**batch.timesteps, self.name: (steps + 1).to(clean.dtype).to(clean.device)[segments]}
        target = {"noise": noise, "x0": clean, "velocity": abar.sqrt() * noise - (1 - abar).sqrt() * clean}
        return (Batch(batch.modality, batch.tokens, latents, batch.seq_idx, timesteps),
                target[self.config.prediction][where])

    def __call__(self, output, batch: Batch, target: torch.Tensor) -> tuple[torch.Tensor, int]:
        predicted = output.predictions[self.name].float()
        loss = (predicted - target.float()).square().mean(-1).sum()
        return loss, target.shape[0]

    def sample(self, predict, noise: torch.Tensor, steps: int, sampler: str = "ddim",
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Denoise ``noise (n, latent_dim)``, the latents of one span at step ``T``, in ``steps`` steps.

        ``predict(x_t, t)`` is the model's output (what :attr:`DiffusionConfig.prediction` names) for latents
        ``x_t`` at float step ``t`` (1..T). The steps are ``round(T i / steps)`` for ``i = steps..1``. ``ddim`` is
        deterministic (Song et al., eta 0); ``ddpm`` draws from the posterior ``q(x_s | x_t, x0)`` of each
        pair of steps (Ho et al.), with fresh noise from ``generator``. One step returns the predicted ``x0``.
        """
        T = self.config.timesteps
        schedule = sorted({max(1, round(T * i / steps)) for i in range(1, steps + 1)}, reverse=True)
        abar = self.alpha_bar.to(noise.device)
        x = noise.double()
        for i, t in enumerate(schedule):
            a_t = abar[t - 1]
            a_s = abar[schedule[i + 1] - 1] if i + 1 < len(schedule) else torch.ones_like(a_t)
            out = predict(x.to(noise.dtype), float(t)).double()
            x0, eps = self._clean_and_noise(out, x, a_t)
            if sampler == "ddim":
                x = a_s.sqrt() * x0 + (1 - a_s).sqrt() * eps
                continue
            beta = 1 - a_t / a_s
            mean = (a_s.sqrt() * beta * x0 + (1 - beta).sqrt() * (1 - a_s) * x) / (1 - a_t)
            fresh = torch.randn(x.shape, generator=generator, dtype=x.dtype, device="cpu").to(x.device)
            x = mean + (beta * (1 - a_s) / (1 - a_t)).sqrt() * fresh
        return x.to(noise.dtype)

    def _clean_and_noise(self, out: torch.Tensor, x: torch.Tensor, a: torch.Tensor):
        """``(x0, eps)`` that the model's output ``out`` at latents ``x`` of signal fraction ``a`` implies."""
        if self.config.prediction == "noise":
            return (x - (1 - a).sqrt() * out) / a.sqrt(), out
        if self.config.prediction == "x0":
            return out, (x - a.sqrt() * out) / (1 - a).sqrt()
        x0 = a.sqrt() * x - (1 - a).sqrt() * out
        return x0, (1 - a).sqrt() * x + a.sqrt() * out


@hookimpl
def momkit_objectives():
    return [
        Objective(name="next_token", description="cross-entropy of the next token (discrete modalities)",
                  config=NextTokenConfig, discrete=True,
                  build=lambda config, modality, modality_id: NextToken(config, modality.name)),
        Objective(name="diffusion", description="DDPM noise prediction on latents (continuous modalities)",
                  config=DiffusionConfig, discrete=False,
                  build=lambda config, modality, modality_id: Diffusion(config, modality.name, modality_id,
                                                                        modality.latent_dim)),
    ]
