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
A plugin implements only the hooks it needs.
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
    error), the names of its routable sublayers, its named routing presets, and a ``build`` function
    returning an ``nn.Module`` with the block contract: ``y = block(x, modality)`` for ``x (b, l, d_model)``
    and ``modality (b, l)`` int64, ``state = block.allocate_state(batch_size)`` and
    ``y_t = block.step(x_t, modality_t, state)`` for decoding one position.
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
    """Return the scan backends this plugin provides, a list of :class:`momkit.ops.ScanBackend`.

    A backend implements :func:`momkit.ops.selective_scan` and/or :func:`momkit.ops.ssd_scan` for some
    devices. The front doors check every argument before they call it. ``backend="auto"`` picks, among the
    backends whose ``is_available()`` is true and that run on the inputs' device, the one of highest
    ``priority``. A backend's tests compare it with the per-token float64 reference, forward and backward.
    """


@hookspec
def momkit_datasets():
    """Return the datasets this plugin provides, a list of :class:`momkit.descriptors.Dataset`.

    A dataset yields interleaved sequences: per-position modality ids, token ids or latents, and document
    boundaries for packing. A model spec's ``data.kind`` selects it.
    """
