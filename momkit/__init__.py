"""momkit: modality-routed sequence models from one declarative spec."""

from momkit import ops
from momkit.blocks import Block, build_block
from momkit.hookspecs import hookimpl, hookspec
from momkit.registry import Registry, get_registry, use_registry
from momkit.spec import BackboneConfig, BlockSpec, ModelSpec, RoutingSpec, load_spec

__all__ = [
    "BackboneConfig", "Block", "BlockSpec", "ModelSpec", "Registry", "RoutingSpec", "build_block", "get_registry",
    "hookimpl", "hookspec", "load_spec", "ops", "use_registry",
]
__version__ = "0.1.0"
