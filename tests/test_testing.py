"""momkit.testing's checks fail on blocks that break the contract, and the registry refuses an incomplete
block class, naming the missing method."""

import re
import types
from pathlib import Path

import pytest
import torch

from momkit import Block, PluginError, hookimpl
from momkit.descriptors import Backbone
from momkit.registry import Registry, use_registry
from momkit.routing import Linear
from momkit.spec import BackboneConfig
from momkit.testing import (ContractCase, check_absent_modality_gets_zero_gradient, check_causal, check_gradients,
                            check_labels_matter, check_packed_documents, check_step_matches_forward, run_checks)


class Doubled(torch.autograd.Function):
    """``2 x`` whose backward claims ``3 g``: a wrong gradient."""

    @staticmethod
    def forward(ctx, x):
        return 2 * x

    @staticmethod
    def backward(ctx, grad):
        return 3 * grad


class FaultyBlock(Block):
    """``y = x + proj(x)`` (a position-wise block), made faulty as its ``fault`` class attribute says."""

    fault = None

    def __init__(self, config, modalities, routed, backend="auto"):
        super().__init__(config, modalities, routed, backend)
        self.proj = Linear(config.d_model, config.d_model, n_modalities=self.routing("proj"), backend=backend)

    def run(self, x, layout, state=None):
        modality = torch.zeros_like(layout.modality) if self.fault == "ignores labels" else layout.modality
        y = x + self.proj(x, modality)
        if self.fault == "peeks ahead":
            y = y + x.mean(dim=1, keepdim=True)
        if self.fault == "crosses documents":
            y = y + torch.cumsum(x, dim=1) * 0.1
        if self.fault == "wrong gradient":
            y = Doubled.apply(y)
        return y

    def run_step(self, x, layout, state):
        return x + self.proj(x, layout.modality)

    def allocate_state(self, batch_size, max_length=None):
        return None


def registry_with(block_class):
    plugin = types.ModuleType("faulty")
    plugin.momkit_backbones = hookimpl(lambda: [Backbone(
        name="faulty", description="a block that breaks the contract", config=BackboneConfig, block=block_class,
        sublayers=("proj",), flops=lambda config, seq_len: {})])
    registry = Registry.from_entry_points()
    registry.register(plugin, distribution="tests")
    return registry


@pytest.mark.parametrize("fault,check", [
    ("peeks ahead", check_causal),
    ("peeks ahead", check_step_matches_forward),
    ("crosses documents", check_packed_documents),
    ("ignores labels", check_labels_matter),
    ("ignores labels", check_absent_modality_gets_zero_gradient),
    ("wrong gradient", check_gradients),
])
def test_checks_catch_a_broken_block(fault, check):
    block_class = type("Faulty", (FaultyBlock,), {"fault": fault})
    case = ContractCase(backbone={"kind": "faulty", "d_model": 8}, routings={"all": "all"})
    with use_registry(registry_with(block_class)):
        with pytest.raises(AssertionError, match=f"{check.__name__} failed for routing 'all'"):
            run_checks(case, [check])


def test_a_sound_block_passes_every_check():
    case = ContractCase(backbone={"kind": "faulty", "d_model": 8}, routings={"dense": "dense", "all": "all"})
    with use_registry(registry_with(FaultyBlock)):
        run_checks(case)


def test_an_incomplete_block_class_is_refused_at_registration():
    class NoStep(Block):
        def run(self, x, layout, state=None):
            return x

        def allocate_state(self, batch_size, max_length=None):
            return None

    with pytest.raises(PluginError, match=r"momkit_backbones of plugin .*\(tests\): backbone 'faulty': its block "
                                          r"class NoStep does not implement run_step"):
        registry_with(NoStep).names("backbone")


def test_the_docs_example_backbone_passes_every_check():
    """The MLP backbone of docs/concepts/plugins.md, written from the docs alone, keeps the contract."""
    page = (Path(__file__).parents[1] / "docs" / "concepts" / "plugins.md").read_text()
    code = re.search(r"```python\n(.*?)```", page[page.index("## Example: a backbone"):], re.S).group(1)
    plugin = types.ModuleType("mlp_plugin")
    exec(compile(code, "plugins.md", "exec"), plugin.__dict__)
    registry = Registry.from_entry_points()
    registry.register(plugin, distribution="docs")
    with use_registry(registry):
        run_checks(ContractCase(backbone={"kind": "mlp", "d_model": 16},
                                routings={"dense": "dense", "all": "all", "up": ["up"]}))
