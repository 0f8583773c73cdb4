"""The ``ema`` backbone keeps momkit's block contract: the same checks the built-in backbones run."""

from momkit.testing import BackboneContract, ContractCase


class TestEma(BackboneContract):
    case = ContractCase(backbone={"kind": "ema", "d_model": 16, "expand": 2},
                        routings={"dense": "dense", "all": "all", "decay": ["decay"]})
