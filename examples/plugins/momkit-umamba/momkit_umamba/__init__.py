"""An example backbone plugin, installed as its own distribution: ``umamba``, a U-Mamba-style layer.

U-Mamba (Ma et al., 2024) puts residual convolutions over an image's feature grid before a Mamba block, so
that local 2-D structure is mixed before the long-range scan. Here each image span of an interleaved sequence
(the positions of ``grid_modality`` within one document, in raster order) is read as a ``grid_size`` x
``grid_size`` grid of patches (:mod:`momkit_umamba.block`).

momkit finds the backbone through the ``momkit`` entry point in this package's ``pyproject.toml``.
"""

from __future__ import annotations

from momkit import hookimpl
from momkit.descriptors import Backbone
from momkit.plugins import mamba
from momkit_umamba import block


@hookimpl
def momkit_backbones():
    return [Backbone(name="umamba", description="U-Mamba: 3x3 residual convolution over each image's patch grid, "
                                                "then a Mamba mixer (example plugin)",
                     config=block.UMambaConfig, block=block.UMambaBlock, sublayers=block.SUBLAYERS,
                     presets={"mom": mamba.MOM}, flops=block.flops, present=block.present,
                     backward_flops=("conv1d", "x_proj", "dt_proj", "scan"))]
