"""The block contract, checked for each built-in backbone by :mod:`momkit.testing`, as a third-party backbone
checks itself: causal, modality-exact (identical copies make labels irrelevant, swapped copies are swapped
labels, an absent modality learns nothing), a step path equal to the full sequence, packed documents equal to
separate sequences, exact float64 gradients, a float32 block that trains, and clear errors for bad inputs."""

import pytest
import torch

import momkit
from momkit.testing import BackboneContract, ContractCase

MAMBA_ALL = ["norm", "in_proj", "conv1d", "x_proj", "dt_proj", "A_log", "D", "out_proj"]
MAMBA2_ALL = ["norm", "in_proj", "conv1d", "dt_bias", "A_log", "D", "gate_norm", "out_proj"]


def only(*routings, of):
    """``skip`` for every check that needs only ``routings`` of the routing names ``of``."""
    return tuple(r for r in of if r not in routings)


MAMBA_ROUTINGS = {"dense": "dense", "mom": "mom", "all": MAMBA_ALL, "A_log": ["A_log"], "D": ["D"],
                  "conv1d+norm": ["conv1d", "norm"]}
MAMBA2_ROUTINGS = {"dense": "dense", "mom": "mom", "all": MAMBA2_ALL, "all-ngroups2": MAMBA2_ALL, "A_log": ["A_log"],
                   "D": ["D"], "dt_bias": ["dt_bias"], "gate_norm-ngroups2": ["gate_norm"]}
TRANSFORMER_ROUTINGS = {"dense": "dense", "mot": "mot", "mot-gqa": "mot", "dense-gqa": "dense", "dense-mqa": "dense",
                        "q_proj+ffn-gqa": ["q_proj", "ffn"]}


def focused(routings, *, causal, routed, default):
    """The built-ins' ``skip``: the step check on every routing, the others on a few (the suite stays short)."""
    chosen = {"check_causal": causal, "check_packed_documents": causal, "check_identical_copies_ignore_labels": routed,
              "check_labels_matter": routed, "check_swapped_copies_equal_swapped_labels": routed,
              "check_absent_modality_gets_zero_gradient": routed, "check_gradients": default,
              "check_float32": default, "check_rejects_bad_inputs": default}
    return {check: only(*names, of=routings) for check, names in chosen.items()}


class TestMamba(BackboneContract):
    case = ContractCase(
        backbone={"kind": "mamba", "d_model": 16, "d_state": 4, "expand": 2, "dt_rank": 3},
        routings=MAMBA_ROUTINGS, spec={"scan_backend": "reference"}, unit_scale=("A_log",),
        skip=focused(MAMBA_ROUTINGS, causal=("mom", "all"), routed=("all", "D"), default=("mom",)))


S4D_ROUTINGS = {"dense": "dense", "all": "all", "fixed": ["dt_bias", "B", "C"], "dt-only": ["x_proj", "dt_proj", "B"],
                "BC-only": ["x_proj", "dt_bias"], "lin": "dense", "lin-all": "all",
                "lin-imag": ["A_imag", "B_imag", "C_imag", "A_log"]}
LIN = {"a_init": "s4d_lin"}


class TestS4D(BackboneContract):
    case = ContractCase(
        backbone={"kind": "s4d", "d_model": 16, "d_state": 4, "expand": 2, "dt_rank": 3}, routings=S4D_ROUTINGS,
        options={"dt-only": {"selective": ["dt"]}, "BC-only": {"selective": ["B", "C"]}, "lin": LIN, "lin-all": LIN,
                 "lin-imag": LIN},
        spec={"scan_backend": "reference"}, unit_scale=("A_log",),
        skip=focused(S4D_ROUTINGS, causal=("all", "dt-only", "lin"),
                     routed=("all", "fixed", "dt-only", "BC-only", "lin-all", "lin-imag"),
                     default=("all", "dt-only", "BC-only", "lin", "lin-imag")))


class TestMamba2(BackboneContract):
    case = ContractCase(
        backbone={"kind": "mamba2", "d_model": 16, "d_state": 4, "expand": 2, "headdim": 8, "chunk_size": 8},
        routings=MAMBA2_ROUTINGS, options={"all-ngroups2": {"ngroups": 2}, "gate_norm-ngroups2": {"ngroups": 2}},
        spec={"scan_backend": "reference"}, unit_scale=("A_log",),
        skip=focused(MAMBA2_ROUTINGS, causal=("mom", "all"), routed=("all", "dt_bias"), default=("mom",)))


class TestTransformer(BackboneContract):
    case = ContractCase(
        backbone={"kind": "transformer", "d_model": 32, "n_heads": 4}, routings=TRANSFORMER_ROUTINGS,
        options={"mot-gqa": {"n_kv_heads": 2}, "dense-gqa": {"n_kv_heads": 2}, "dense-mqa": {"n_kv_heads": 1},
                 "q_proj+ffn-gqa": {"n_kv_heads": 2}},
        unit_scale=("norm",),
        skip=focused(TRANSFORMER_ROUTINGS, causal=("mot-gqa", "dense-gqa"), routed=("mot", "mot-gqa"),
                     default=("mot", "mot-gqa")))


class TestAttention(BackboneContract):
    case = ContractCase(
        backbone={"kind": "attention", "d_model": 32, "n_heads": 4},
        routings={"dense": "dense", "mot-gqa": "mot", "k_proj": ["k_proj"]}, options={"mot-gqa": {"n_kv_heads": 2}},
        unit_scale=("norm",))


class TestFFN(BackboneContract):
    case = ContractCase(backbone={"kind": "ffn", "d_model": 16},
                        routings={"dense": "dense", "all": "all", "w2": ["w2"]}, unit_scale=("norm",))


def test_fresh_states_have_the_documented_shapes(gen):
    mamba2 = TestMamba2.case.build("mom", gen)
    state = mamba2.allocate_state(2)
    assert state.conv.shape == (2, mamba2.config.conv_dim, 4) and state.ssm.shape == (2, 4, 8, 4)
    transformer = TestTransformer.case.build("mot-gqa", gen)
    x, modality = TestTransformer.case.inputs(gen)
    state = transformer.allocate_state(2, x.shape[1])
    for t in range(x.shape[1]):
        transformer.step(x[:, t], modality[:, t], state)
    assert state.length == x.shape[1] and state.keys.shape == (2, 2, x.shape[1], 8)


def test_a_layout_carries_the_same_facts_as_separate_arguments(gen):
    block = TestMamba.case.build("mom", gen)
    x, modality = TestMamba.case.inputs(gen)
    seq_idx = (torch.arange(x.shape[1]) // 9).repeat(2, 1)
    torch.testing.assert_close(block(x, momkit.Layout(modality, seq_idx)), block(x, modality, seq_idx),
                               rtol=0, atol=0)
    with pytest.raises(momkit.SpecError, match="seq_idx was given beside a Layout"):
        block(x, momkit.Layout(modality), seq_idx)


def test_prefill_is_refused_with_seq_idx_or_by_a_block_without_it(gen):
    block = TestMamba.case.build("mom", gen)
    x, modality = TestMamba.case.inputs(gen)
    with pytest.raises(momkit.SpecError, match="a prefill .* takes no seq_idx"):
        block(x, modality, torch.zeros_like(modality), state=block.allocate_state(2))

    class NoPrefill(type(block)):
        supports_prefill = False

    block.__class__ = NoPrefill
    with pytest.raises(momkit.SpecError, match="NoPrefill does not take a decoding state in forward"):
        block(x, modality, state=block.allocate_state(2))


FFN_EXPERTS = {"sublayers": ["w1", "w2", "w3"], "n_experts": 3, "top_k": 2}


class TestFFNExperts(BackboneContract):
    case = ContractCase(
        backbone={"kind": "ffn", "d_model": 16}, unit_scale=("norm",),
        routings={"experts": {"specific": "dense", "experts": FFN_EXPERTS},
                  "norm+experts-top1": {"specific": ["norm"], "experts": {**FFN_EXPERTS, "top_k": 1}}})


class TestMambaExperts(BackboneContract):
    case = ContractCase(
        backbone={"kind": "mamba", "d_model": 16, "d_state": 4, "expand": 2, "dt_rank": 3},
        routings={"x_proj+experts": {"specific": ["x_proj", "dt_proj"],
                                     "experts": {"sublayers": ["in_proj", "out_proj"], "n_experts": 2, "top_k": 2}}},
        spec={"scan_backend": "reference"}, unit_scale=("A_log",))
