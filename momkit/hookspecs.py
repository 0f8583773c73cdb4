"""Hook specifications: the plugin author's manual.

A momkit plugin is a module (or any object) with functions named after the hooks below, each decorated
with :data:`hookimpl`, and listed under the ``momkit`` entry-point group of its distribution::

    # pyproject.toml of the plugin's distribution
    [project.entry-points.momkit]
    my_plugin = "my_package.momkit_plugin"

    # my_package/momkit_plugin.py
    from pydantic import Field

    from momkit import hookimpl
    from momkit.descriptors import Modality
    from momkit.spec import ModalityConfig

    class AudioCodesConfig(ModalityConfig):
        vocab_size: int | None = Field(1024, gt=0, description="Codebook size of the codec.")

    @hookimpl
    def momkit_modalities():
        return [Modality(name="audio_codes", description="codec tokens", config=AudioCodesConfig)]

Every hook returns a list of descriptors. The registry indexes them by their ``name``; two descriptors of
one kind with one name, from two plugins, are an error that names both distributions. momkit's own
backbones, modalities and scan backends are registered exactly this way, through its own entry points.
A plugin implements only the hooks it needs. A plugin raises :class:`momkit.SpecError` for what its user
can fix (the command line prints it as one line); any other exception keeps its traceback.
"""

from __future__ import annotations

import pluggy

PROJECT = "momkit"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def momkit_modalities():
    """Return the modalities this plugin provides, a list of :class:`momkit.descriptors.Modality`.

    A modality names a kind of token in an interleaved sequence (``text``, ``image``, ``speech``) and says
    whether its tokens are discrete (with a vocabulary size) or continuous (with a latent dimension).
    Specs list modalities by name; their order fixes the modality ids ``0..M-1`` of a model built from that
    spec, and so the index into the leading dimension of every routed parameter.
    """


@hookspec
def momkit_backbones():
    """Return the backbones this plugin provides, a list of :class:`momkit.descriptors.Backbone`.

    A backbone is one kind of residual layer (Mamba, Mamba-2, Transformer). Its descriptor gives the pydantic
    model of its options (a subclass of :class:`momkit.spec.BackboneConfig`, so a typo in an option is an
    error), its block class, the names of its routable sublayers and its named routing presets. The block
    class subclasses :class:`momkit.Block`, whose abstract methods and their docstrings are the block
    contract; the registry refuses a class that leaves one of them abstract. :mod:`momkit.testing` checks a
    backbone against the contract, as momkit's own tests check the built-in ones.
    """


@hookspec
def momkit_objectives():
    """Return the training objectives this plugin provides, a list of :class:`momkit.descriptors.Objective`.

    An objective turns a model's output for one modality into a loss (next-token cross-entropy for
    discrete tokens, a diffusion loss for continuous latents). A model spec's ``objectives`` maps each modality
    to an objective by ``kind``.
    """


@hookspec
def momkit_scan_backends():
    """Return the kernel backends this plugin provides, a list of :class:`momkit.descriptors.ScanBackend`.

    A backend implements some of the kernel operations of :mod:`momkit.ops` (the scans, the routed linear layer, the
    causal convolution, the decoding updates) for some devices. A spec's ``scan_backend`` names the backend of every
    kernel operation of the blocks it builds; an operation the named backend lacks runs on ``"auto"``, which picks,
    per operation, among the backends whose ``is_available()`` is true and that run the call's device, dtype and
    extensions, the one of highest ``priority``. The front doors check every argument before they call a
    backend. A backend's tests compare it with the per-token float64 reference, forward and backward.
    """


@hookspec
def momkit_datasets():
    """Return the datasets this plugin provides, a list of :class:`momkit.descriptors.Dataset`.

    A dataset yields interleaved sequences: per-position modality ids, token ids or latents, and document
    boundaries for packing. A model spec's ``data.kind`` selects it.
    """


@hookspec
def momkit_loggers():
    """Return the experiment loggers this plugin provides, a list of :class:`momkit.descriptors.Logger`.

    A logger receives every line of a run's ``metrics.jsonl`` as it is written; a spec's ``train.loggers``
    selects them by name.
    """


@hookspec
def momkit_encoders():
    """Return the encoders this plugin provides, a list of :class:`momkit.descriptors.Encoder`.

    An encoder turns one modality's raw items (text, images, audio) into that modality's tokens or latents,
    and, where it can, back. ``momkit convert`` runs the encoder that a modality's ``encoder`` setting names
    and stores what it fitted (a tokenizer, a codebook) beside the shards; ``momkit sample`` decodes with it.
    """
