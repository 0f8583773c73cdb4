"""momkit: modality-routed sequence models from one declarative spec."""

from momkit import ops
from momkit.accounting import account
from momkit.batch import Batch
from momkit.blocks import Block, Layout
from momkit.errors import PluginError, SpecError
from momkit.generation import Generation, ModalitySchedule, ScheduleRule
from momkit.hookspecs import hookimpl, hookspec
from momkit.model import Model, ModelOutput, build_block, build_model
from momkit.pretrained import export, load
from momkit.registry import Registry, get_registry, use_registry
from momkit.spec import BackboneConfig, BlockSpec, ModalityConfig, ModelSpec, RoutingSpec, load_spec

__all__ = [
    "BackboneConfig", "Batch", "Block", "BlockSpec", "Generation", "Layout", "ModalityConfig", "ModalitySchedule",
    "Model", "ModelOutput", "ModelSpec", "PluginError", "Registry", "RoutingSpec", "ScheduleRule", "SpecError",
    "account", "build_block", "build_model", "export", "get_registry", "hookimpl", "hookspec", "load", "load_spec",
    "ops", "use_registry",
]
__version__ = "0.1.0"
