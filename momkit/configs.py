"""The settings models that plugins extend: a modality's, a backbone's, an objective's and a dataset's.

Each is a pydantic model that rejects unknown fields; a plugin subclasses the one of its kind to declare its
own settings, and :mod:`momkit.spec` validates a spec's entries by the model of the plugin each names. This
module knows nothing of the registry, so descriptors and plugins can import it freely.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, model_validator

from momkit.errors import SpecError


def divisors(n: int) -> list[int]:
    """The positive divisors of ``n``, ascending: the valid values of a setting that must divide ``n``."""
    return [k for k in range(1, n + 1) if n % k == 0]


class StrictModel(BaseModel):
    """A pydantic model that rejects unknown fields, naming them and the valid ones."""

    model_config = ConfigDict(extra="forbid", validate_default=True)

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = [k for k in data if k not in cls.model_fields]
            if unknown:
                raise SpecError(f"unknown field(s) {', '.join(map(repr, unknown))} for {cls.__name__}; "
                                f"valid fields: {', '.join(cls.model_fields)}")
        return data


class EncoderConfig(StrictModel):
    """How one modality's raw items (text, images, audio) became its tokens or latents; an encoder plugin's own
    settings subclass this model.

    ``discrete`` says whether the encoder gives token ids or latent vectors; :meth:`size` its vocabulary size
    or latent width when the settings alone fix it (``None`` when it is known only once the encoder is fitted or
    loaded, as a trained tokenizer's vocabulary is).
    """

    discrete: ClassVar[bool] = True

    kind: str = Field(description="Name of a registered encoder, e.g. `bytes`.")

    def size(self) -> int | None:
        """The vocabulary size (discrete) or latent width (continuous) these settings give, if they fix it."""
        return None


def check_encoder_fits(name: str, encoder: EncoderConfig, discrete: bool, size: int) -> None:
    """Refuse a modality of ``size`` (vocab_size if ``discrete``, else latent_dim) that ``encoder``'s output
    does not fit: another form, or (when its settings fix it) a size :func:`check_encoder_size` refuses."""
    if encoder.discrete != discrete:
        form = "discrete" if discrete else "continuous"
        other = "token ids" if encoder.discrete else "latent vectors"
        raise SpecError(f"modality {name!r} is {form} but its encoder {encoder.kind!r} gives {other}")
    if encoder.size() is not None:
        check_encoder_size(name, encoder.kind, discrete, size, encoder.size())


def check_encoder_size(name: str, kind: str, discrete: bool, size: int, wanted: int) -> None:
    """Refuse a modality of ``size`` whose encoder ``kind`` gives ``wanted`` ids (more than ``size``) or latent
    vectors of ``wanted`` numbers (another width)."""
    if size < wanted if discrete else size != wanted:
        field, need = ("vocab_size", f"at least {wanted}") if discrete else ("latent_dim", f"{wanted}")
        raise SpecError(f"modality {name!r} has {field} {size} but its encoder {kind!r} gives "
                        f"{'ids 0..' + str(wanted - 1) if discrete else 'vectors of ' + str(wanted)}; valid "
                        f"{field}: {need}")


class ModalityConfig(StrictModel):
    """Settings of one modality of a spec; a modality plugin's own settings subclass this model.

    A modality is discrete (``vocab_size``) or continuous (``latent_dim``): giving one clears the other's
    default.
    """

    kind: str = Field(description="Name of a registered modality, e.g. `text`.")
    name: str | None = Field(None, description="Name of the modality in this spec (default: `kind`), so one "
                                                "kind can appear twice with different settings.")
    vocab_size: int | None = Field(None, gt=0, description="Vocabulary size of discrete tokens.")
    latent_dim: int | None = Field(None, gt=0, description="Dimension of continuous latent vectors.")
    tie_embeddings: bool = Field(False, description="Discrete modalities: the head's weight is the adapter's "
                                                    "embedding matrix (tied input and output embeddings).")
    encoder: SerializeAsAny[EncoderConfig] | None = Field(
        None, description="How `momkit convert` turns this modality's raw items into its tokens or latents: a "
                          "registered encoder name or `{kind, ...options}`, e.g. `bytes`, `{kind: hf_tokenizer, "
                          "train_size: 4096}`, `{kind: vq, codes: 1024}`; `null`: the data is already tokenized.")

    @model_validator(mode="before")
    @classmethod
    def _one_representation(cls, data: Any) -> Any:
        if isinstance(data, dict):
            if "latent_dim" in data and "vocab_size" not in data:
                data = {**data, "vocab_size": None}
            elif "vocab_size" in data and "latent_dim" not in data:
                data = {**data, "latent_dim": None}
        return data

    @model_validator(mode="after")
    def _exactly_one(self) -> ModalityConfig:
        if (self.vocab_size is None) == (self.latent_dim is None):
            raise SpecError(f"modality {self.kind!r} needs exactly one of vocab_size (discrete tokens) and "
                            f"latent_dim (continuous vectors), got vocab_size={self.vocab_size}, "
                            f"latent_dim={self.latent_dim}")
        if self.tie_embeddings and not self.discrete:
            raise SpecError(f"modality {self.kind!r}: tie_embeddings applies to discrete modalities (vocab_size), "
                            f"not to continuous ones (latent_dim {self.latent_dim}); valid: false")
        if self.name is None:
            self.name = self.kind
        if self.encoder is not None:
            check_encoder_fits(self.name, self.encoder, self.discrete, self.vocab_size or self.latent_dim)
        return self

    @property
    def discrete(self) -> bool:
        """Whether tokens are discrete ids (else continuous vectors)."""
        return self.vocab_size is not None


class BackboneConfig(StrictModel):
    """Options common to every backbone; a backbone's own options subclass this model."""

    kind: str = Field(description="Name of a registered backbone, e.g. `mamba`.")
    d_model: int = Field(gt=0, description="Width of the residual stream.")
    n_layers: int | None = Field(None, ge=1, description="Number of stacked blocks: required in a ModelSpec, "
                                                          "not allowed in a BlockSpec (which is one block).")


class ObjectiveConfig(StrictModel):
    """The training objective of one modality; an objective plugin's own settings subclass this model."""

    kind: str = Field(description="Name of a registered objective: `next_token` (discrete modalities) or "
                                  "`diffusion` (continuous ones).")
    weight: float = Field(1.0, ge=0, description="Weight of this modality's loss in the training loss.")


class DatasetConfig(StrictModel):
    """The data a model trains and evaluates on; a dataset plugin's own settings subclass this model."""

    kind: str = Field(description="Name of a registered dataset, e.g. `shapes` (built in, no download).")
    seed: int = Field(0, description="Seed of the data: the same seed gives the same sequences.")
