"""Built-in modalities: byte-level text, VQ image tokens and discrete speech units."""

from momkit import hookimpl
from momkit.descriptors import Modality


@hookimpl
def momkit_modalities():
    return [
        Modality(name="text", kind="discrete", vocab_size=256, description="byte-level text tokens"),
        Modality(name="image", kind="discrete", vocab_size=1024, description="VQ codebook ids of image patches"),
        Modality(name="speech", kind="discrete", vocab_size=512, description="discrete speech units"),
    ]
