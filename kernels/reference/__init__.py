"""The reference backend: pure PyTorch, exact to float64 rounding, fast on CPU.

``selective_scan.py`` and ``ssd.py`` hold the chunked algorithms with their backward passes; ``naive.py``
the per-token recurrences they are tested against; ``routed_linear.py`` the portable routed projection;
``conv.py`` the causal convolution; ``decode.py`` the single-position state updates of decoding;
``experts.py`` the learned experts' router logits, the places of their token slots and the mixes of their
outputs.
"""

from momkit import hookimpl
from momkit.descriptors import ScanBackend
from momkit.kernels.reference.conv import causal_conv1d
from momkit.kernels.reference.decode import conv_state_update, selective_state_update
from momkit.kernels.reference.experts import expert_slots, gated_mix, gated_residual, router_logits
from momkit.kernels.reference.routed_linear import routed_linear
from momkit.kernels.reference.selective_scan import selective_scan
from momkit.kernels.reference.ssd import ssd_scan

REFERENCE = ScanBackend(
    name="reference",
    description="pure PyTorch, chunked, any device; the CPU default",
    selective_scan=selective_scan,
    ssd_scan=ssd_scan,
    routed_linear=routed_linear,
    causal_conv1d=causal_conv1d,
    selective_state_update=selective_state_update,
    conv_state_update=conv_state_update,
    router_logits=router_logits,
    expert_slots=expert_slots,
    gated_residual=gated_residual,
    gated_mix=gated_mix,
    devices=("cpu", "cuda"),
    priority=0,
    extensions=frozenset({"modality", "seq_idx", "initial_state", "groups"}),
)


@hookimpl
def momkit_scan_backends():
    return [REFERENCE]
