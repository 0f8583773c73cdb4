"""Weights on disk: the safetensors format, single files and sharded directories, read and written without
extra dependencies; and the pickled ``pytorch_model.bin`` files of older checkpoints, read as data only.

safetensors (https://huggingface.co/docs/safetensors) stores a little-endian ``u64`` header length, a JSON
header ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}`` and the raw
bytes of every tensor, offsets counted from the end of the header. A directory whose weights exceed a shard
size holds ``model-0000k-of-0000n.safetensors`` files and ``model.safetensors.index.json``, whose
``weight_map`` names the file of every tensor, as Hugging Face libraries write them. Reading one never runs
code from the file; neither does reading a ``.bin``, which :func:`torch.load` opens with ``weights_only=True``.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from momkit.errors import SpecError

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
PICKLED = "pytorch_model.bin"
PICKLED_INDEX = "pytorch_model.bin.index.json"
DEFAULT_SHARD_BYTES = 5 * 2 ** 30
HEADER_LIMIT = 100 * 2 ** 20
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
NAMES = {dtype: name for name, dtype in DTYPES.items()}


def _raw(t: torch.Tensor) -> bytes:
    """The bytes of ``t`` (any dtype) in row-major order."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None):
    """Write ``tensors`` to one safetensors file at ``path`` (through a temporary file, so a reader never sees
    half of it)."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset, blobs = 0, []
    for name, t in tensors.items():
        if t.dtype not in NAMES:
            raise SpecError(f"tensor {name!r} has dtype {t.dtype}, which safetensors cannot hold here; valid "
                            f"dtypes: {', '.join(map(str, NAMES))}")
        blob = _raw(t)
        header[name] = {"dtype": NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for blob in blobs:
            f.write(blob)
    partial.replace(path)


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of one safetensors file, on the CPU; ``ValueError`` naming the file if it is malformed."""
    path = Path(path)
    data = path.read_bytes()
    if len(data) < 8:
        raise SpecError(f"{path} is not a safetensors file: {len(data)} bytes")
    (size,) = struct.unpack("<Q", data[:8])
    if size > min(HEADER_LIMIT, len(data) - 8):
        raise SpecError(f"{path} is not a safetensors file: its header length {size} exceeds the file")
    try:
        header = json.loads(data[8:8 + size])
    except ValueError as exc:
        raise SpecError(f"{path} is not a safetensors file: its header is not JSON ({exc})") from None
    body = memoryview(data)[8 + size:]
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = DTYPES.get(entry.get("dtype"))
        if dtype is None:
            raise SpecError(f"{path}: tensor {name!r} has dtype {entry.get('dtype')!r}; readable dtypes: "
                            f"{', '.join(DTYPES)}")
        begin, end = entry["data_offsets"]
        shape = entry["shape"]
        count = 1
        for extent in shape:
            count *= extent
        if not 0 <= begin <= end <= len(body) or end - begin != count * dtype.itemsize:
            raise SpecError(f"{path}: tensor {name!r} of shape {shape} and dtype {entry['dtype']} does not fit its "
                            f"data offsets {[begin, end]}")
        raw = torch.frombuffer(bytearray(body[begin:end]), dtype=torch.uint8) if end > begin else \
            torch.zeros(0, dtype=torch.uint8)
        tensors[name] = raw.view(dtype).reshape(shape)
    return tensors


def save_weights(directory: str | Path, tensors: dict[str, torch.Tensor],
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[Path]:
    """Write ``tensors`` into ``directory``: ``model.safetensors``, or, if they exceed ``max_shard_bytes``,
    shards of at most that size (a larger tensor gets a shard of its own) and their index. Returns the files."""
    if max_shard_bytes < 1:
        raise SpecError(f"max_shard_bytes must be a positive int, got {max_shard_bytes}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sizes = {name: t.numel() * t.element_size() for name, t in tensors.items()}
    total = sum(sizes.values())
    if total <= max_shard_bytes:
        write_safetensors(directory / WEIGHTS, tensors)
        return [directory / WEIGHTS]
    shards: list[dict[str, torch.Tensor]] = [{}]
    filled = 0
    for name, t in tensors.items():
        if shards[-1] and filled + sizes[name] > max_shard_bytes:
            shards.append({})
            filled = 0
        shards[-1][name] = t
        filled += sizes[name]
    files, weight_map = [], {}
    for k, shard in enumerate(shards, start=1):
        file = directory / f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(file, shard)
        files.append(file)
        weight_map.update({name: file.name for name in shard})
    (directory / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                              indent=1))
    return [*files, directory / INDEX]


def _read_pickled(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise SpecError(f"{path} is not a tensor dictionary that loads as plain data (weights_only=True): "
                        f"{str(exc).splitlines()[0]}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SpecError(f"{path} does not hold a dictionary of tensors")
    return state


def _sharded(directory: Path, index: str, read) -> dict[str, torch.Tensor]:
    weight_map = json.loads((directory / index).read_text())["weight_map"]
    tensors = {}
    for file in dict.fromkeys(weight_map.values()):
        tensors.update(read(directory / file))
    return tensors


def load_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint directory holds: safetensors (one file or shards) when it has them, else
    ``pytorch_model.bin`` (one file or shards), read as plain data."""
    directory = Path(directory)
    if (directory / WEIGHTS).is_file():
        return read_safetensors(directory / WEIGHTS)
    if (directory / INDEX).is_file():
        return _sharded(directory, INDEX, read_safetensors)
    if (directory / PICKLED).is_file():
        return _read_pickled(directory / PICKLED)
    if (directory / PICKLED_INDEX).is_file():
        return _sharded(directory, PICKLED_INDEX, _read_pickled)
    raise SpecError(f"{directory} holds no weights: expected {WEIGHTS}, {INDEX}, {PICKLED} or {PICKLED_INDEX}")
