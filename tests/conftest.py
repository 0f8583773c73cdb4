import pytest
import torch


@pytest.fixture
def gen():
    """A fresh seeded generator per test: random inputs, reproducible failures."""
    return torch.Generator().manual_seed(1234)


class ToySource:
    """Random-access batches of a learnable pattern: runs of 8 positions per modality, counting tokens."""

    def __init__(self, modalities, split, seq_len, seed):
        self.modalities, self.seq_len = modalities, seq_len
        self.seed = seed * 2 + (split == "eval")

    def num_batches(self, batch_size):
        return None

    def batch(self, index, batch_size):
        from momkit import Batch

        g = torch.Generator().manual_seed(self.seed * 100_003 + index)
        positions = torch.arange(self.seq_len).repeat(batch_size, 1)
        modality = positions // 8 % len(self.modalities)
        tokens = (positions + torch.randint(0, 3, (batch_size, 1), generator=g)) % 50
        latents = {m.name: torch.randn(batch_size, self.seq_len, m.latent_dim, generator=g)
                   for m in self.modalities if not m.discrete}
        seq_idx = positions // 40
        return Batch(modality=modality, tokens=tokens, latents=latents, seq_idx=seq_idx)


@pytest.fixture
def toy_registry():
    """The installed plugins plus a `toy` dataset, as the process's registry."""
    import types

    from momkit import hookimpl
    from momkit.descriptors import Dataset
    from momkit.registry import Registry, use_registry
    from momkit.spec import DatasetConfig

    plugin = types.ModuleType("toy_dataset")
    plugin.momkit_datasets = hookimpl(lambda: [Dataset(
        name="toy", description="a learnable toy pattern", config=DatasetConfig,
        build=lambda config, modalities, split, seq_len: ToySource(modalities, split, seq_len, config.seed))])
    registry = Registry.from_entry_points()
    registry.register(plugin, distribution="tests")
    with use_registry(registry):
        yield registry
