"""Built-in datasets: ``shapes`` (procedural captioned images, the default), ``jsonl`` (your own pre-tokenized
documents, or their memory-mapped shards) and ``synthetic`` (random documents, for tests).

Each is a :class:`momkit.descriptors.Dataset` whose ``build`` returns a
:class:`momkit.plugins.data.packing.PackedSource`. :func:`convert` (``momkit convert``) writes the shards that
``data: {kind: jsonl, shards: ...}`` reads, from pre-tokenized documents or raw text, images and audio.
"""

from momkit import hookimpl
from momkit.descriptors import Dataset
from momkit.plugins.data import jsonl, shapes, synthetic
from momkit.plugins.data.convert import convert

__all__ = ["convert"]


@hookimpl
def momkit_datasets():
    return [
        Dataset(name="shapes", description="procedural captioned images with spoken captions (built in, no "
                                           "download)", config=shapes.ShapesConfig, build=shapes.build,
                decoders=shapes.decoders),
        Dataset(name="jsonl", description="your own documents: a pre-tokenized JSON-lines file, or shards that "
                                          "momkit convert writes from it or from raw text, images and audio",
                config=jsonl.JsonlConfig, build=jsonl.build, convert=convert, decoders=jsonl.decoders,
                check=jsonl.check),
        Dataset(name="synthetic", description="random documents of random modalities (for tests)",
                config=synthetic.SyntheticConfig, build=synthetic.build),
    ]
