"""Built-in modalities: byte-level text, images (VQ tokens or continuous patch latents) and speech units.

Each is a kind a spec instantiates with its own settings, for example an image modality twice::

    modalities:
      - text
      - {kind: image, name: image_vq, vocab_size: 8192}
      - {kind: image, name: image_latent, latent_dim: 16}
"""

from pydantic import Field

from momkit import hookimpl
from momkit.descriptors import Modality
from momkit.spec import ModalityConfig


class TextConfig(ModalityConfig):
    """Text tokens; by default the 256 byte values."""

    vocab_size: int | None = Field(256, gt=0, description="Vocabulary size of the text tokenizer.")


class ImageConfig(ModalityConfig):
    """Image patches: VQ codebook ids (Chameleon-style, the default) or continuous latents with `latent_dim`
    (Transfusion-style)."""

    vocab_size: int | None = Field(1024, gt=0, description="Codebook size of discrete image tokens.")


class SpeechConfig(ModalityConfig):
    """Discrete speech units."""

    vocab_size: int | None = Field(512, gt=0, description="Number of discrete speech units.")


@hookimpl
def momkit_modalities():
    return [
        Modality(name="text", description="text tokens (bytes by default)", config=TextConfig),
        Modality(name="image", description="image patches: VQ tokens, or continuous latents", config=ImageConfig),
        Modality(name="speech", description="discrete speech units", config=SpeechConfig),
    ]
