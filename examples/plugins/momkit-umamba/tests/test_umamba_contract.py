"""The ``umamba`` backbone keeps momkit's block contract, causal and with bidirectional image spans.

One check does not apply: "identical copies of the routed weights make the modality ids irrelevant" holds for a
block whose only use of the ids is to pick weights, and this block also reads them for structure (its grid
convolution runs over the image spans). Every other check runs on every routing.
"""

from momkit.testing import BackboneContract, ContractCase

MIXER = ["norm", "in_proj", "conv1d", "x_proj", "dt_proj", "A_log", "D", "out_proj"]
ROUTINGS = {"dense": "dense", "mom": "mom", "mixer": MIXER}


class TestUMamba(BackboneContract):
    case = ContractCase(backbone={"kind": "umamba", "d_model": 16, "d_state": 4, "dt_rank": 2, "grid_size": 3},
                        routings=ROUTINGS, spec={"scan_backend": "reference"}, unit_scale=("A_log",),
                        skip={"check_identical_copies_ignore_labels": tuple(ROUTINGS)})
