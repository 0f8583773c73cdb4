"""The contract between the scan front doors and the backends that implement them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch


def _always() -> bool:
    return True


@dataclass(frozen=True)
class ScanBackend:
    """A kernel backend, as returned by a plugin's ``momkit_scan_backends`` hook.

    A backend implements some of the operations of :mod:`momkit.ops`: the two scans, the routed linear
    layer, and the two single-position state updates of decoding. The front doors check every argument
    before they call a backend, so a backend receives tensors of consistent shapes on one device and may
    assume them. Each callable takes its front door's arguments as keywords (the extensions included, ``None``
    when unused) and returns what the front door returns; an operation left ``None`` is one the backend lacks.

    Extensions are what momkit's front doors add to mamba_ssm's interfaces; a backend lists those it
    implements, and the front door refuses a call that needs one the backend lacks:

    - ``"modality"``: a per-modality ``A`` with a leading ``M`` and a ``modality (b, l)`` index (both scans),
      per-modality parameters with a leading ``M`` in the state updates;
    - ``"seq_idx"``: ``seq_idx`` for :func:`momkit.ops.selective_scan` (``ssd_scan`` always has it).

    :func:`momkit.ops.routed_linear` is momkit's own (every backend that has it takes ``modality``).

    Attributes:
        name: The name a spec's ``scan_backend`` and ``backend=`` select it by.
        description: One line for ``momkit plugins`` and the docs.
        selective_scan: Implements :func:`momkit.ops.selective_scan`, or ``None`` if the backend lacks it.
        ssd_scan: Implements :func:`momkit.ops.ssd_scan`, or ``None`` if the backend lacks it.
        routed_linear: Implements :func:`momkit.ops.routed_linear`, or ``None``.
        selective_state_update: Implements :func:`momkit.ops.selective_state_update`, or ``None``.
        conv_state_update: Implements :func:`momkit.ops.conv_state_update`, or ``None``.
        devices: Device types (``"cpu"``, ``"cuda"``) the backend runs on.
        priority: Among available backends for a device, ``backend="auto"`` picks the highest.
        extensions: The extensions (above) the backend implements.
        dtypes: The dtypes of the inputs it computes on (the main input's: ``u``, ``x`` or ``state``), or
            ``None`` for every floating dtype; ``backend="auto"`` passes over a backend that lacks a call's.
        is_available: Whether the backend can run in this process (its compiler or library imports).
    """

    name: str
    description: str
    selective_scan: Callable | None = None
    ssd_scan: Callable | None = None
    routed_linear: Callable | None = None
    selective_state_update: Callable | None = None
    conv_state_update: Callable | None = None
    devices: tuple[str, ...] = ("cpu",)
    priority: int = 0
    extensions: frozenset[str] = frozenset()
    dtypes: frozenset[torch.dtype] | None = None
    is_available: Callable[[], bool] = field(default=_always)
