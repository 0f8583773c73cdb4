"""The ``jsonl`` dataset: your own pre-tokenized interleaved documents, from a JSON-lines file or from shards.

One document per line (blank lines are skipped, keys other than ``segments`` ignored)::

    {"segments": [{"modality": "text", "tokens": [72, 105]},
                  {"modality": "image_latent", "latents": [[0.1, -0.3, 0.5], [0.2, 0.0, -1.1]]}]}

``modality`` is a modality *name* of the spec; a discrete modality's segment has ``tokens`` (ids in
``0..vocab_size-1``), a continuous one's ``latents`` (rows of ``latent_dim`` numbers). A bad line raises a
``ValueError`` naming the file, the line and the field.

A file is read into memory. For data that does not fit, ``momkit convert`` (:func:`momkit.plugins.data.convert`)
writes *shards*, a directory of flat binary arrays read through ``np.memmap``, so a batch touches only its own
slices; it also converts raw text, images and audio through each modality's encoder:

- ``header.json``: format, version, counts, the modalities (name, kind, vocab_size or latent_dim, positions,
  largest token id) and each array's file, dtype and shape;
- ``modality.bin``: ``(P,)`` uint8 index of each position's modality in the header's list;
- ``tokens.bin``: ``(P,)`` token id of each position, or, at a continuous modality's position, the row of its
  vector in that modality's latents, in the smallest unsigned type that holds them (:func:`token_dtype`: uint8
  or uint16 for the vocabularies of text and VQ codes, as nanoGPT's and Megatron's token files do; uint32
  with continuous modalities); version 1 shards, with int64 ids, are still read;
- ``offsets.bin``: ``(N + 1,)`` int64 first position of each document, then ``P``;
- ``latents-<i>.bin``: ``(P_i, latent_dim)`` float32 vectors of continuous modality ``i`` of the header, in
  position order;
- ``encoders/<modality>/``: what each modality's encoder fitted (a tokenizer, a codebook), which the header's
  ``encoders`` entry names with its settings and size; ``skipped.jsonl``: the bad items skipped, with reasons.

Splits: train is ``path`` (or ``shards``) and eval ``eval_path`` (or ``eval_shards``); without either, eval is
the last ``eval_fraction`` of the documents and train the rest. A split's documents, in file order, are one
stream of positions cut into rows of ``seq_len`` (:class:`momkit.plugins.data.packing.StreamLayout`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from pydantic import Field, model_validator

from momkit.descriptors import ENCODER_INPUTS
from momkit.errors import SpecError
from momkit.plugins.data.packing import Chunk, PackedSource, Piece, StreamLayout, check_split
from momkit.registry import get_registry
from momkit.spec import DatasetConfig, ModalityConfig

FORMAT, FORMAT_VERSION, HEADER = "momkit-shards", 2, "header.json"
READABLE_VERSIONS = (1, 2)
SEGMENT_FIELDS = ("modality", "tokens", "latents")


class JsonlConfig(DatasetConfig):
    """Your own pre-tokenized interleaved documents: a JSON-lines file, or shards written by `convert`."""

    path: str | None = Field(None, description="JSON-lines file of the training documents (read into memory).")
    shards: str | None = Field(None, description="Directory of shards written by `convert`, read instead "
                                                 "of `path` through memory maps.")
    eval_path: str | None = Field(None, description="JSON-lines file of the eval documents; `null`: the last "
                                                    "`eval_fraction` of the training documents.")
    eval_shards: str | None = Field(None, description="Directory of shards of the eval documents, instead of "
                                                      "`eval_path`.")
    eval_fraction: float = Field(0.1, gt=0, lt=1, description="Share of the documents held out for eval (the "
                                                              "last ones) when no eval file or shards are given.")

    @model_validator(mode="after")
    def _one_source_per_split(self) -> JsonlConfig:
        if (self.path is None) == (self.shards is None):
            raise SpecError(f"jsonl needs exactly one of `path` (a JSON-lines file) and `shards` (a directory "
                            f"written by convert); got path={self.path!r}, shards={self.shards!r}")
        if self.eval_path is not None and self.eval_shards is not None:
            raise SpecError(f"give at most one of eval_path and eval_shards; got eval_path={self.eval_path!r}, "
                            f"eval_shards={self.eval_shards!r}")
        return self


class BadField(Exception):
    """A bad field of one line: ``args = (where, what)``, e.g. ``("segments[1].tokens[3]", "... out of range")``."""


def _short(value) -> str:
    """``value`` (parsed JSON) as JSON, cut to 40 characters."""
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _tokens(value, where: str, m: ModalityConfig) -> np.ndarray:
    """``(n,)`` int64 token ids of ``value``, a non-empty list of ids in ``0..vocab_size-1``."""
    if not isinstance(value, list) or not value:
        raise BadField(where, f"must be a non-empty list of token ids, got {_short(value)}")
    for k, v in enumerate(value):
        if type(v) is not int:
            raise BadField(f"{where}[{k}]", f"{_short(v)} is not an integer token id")
        if not 0 <= v < m.vocab_size:
            raise BadField(f"{where}[{k}]", f"{v} is out of range for modality {m.name!r} (vocab_size "
                                             f"{m.vocab_size}): valid ids are 0..{m.vocab_size - 1}")
    return np.array(value, dtype=np.int64)


def _latents(value, where: str, m: ModalityConfig) -> np.ndarray:
    """``(n, latent_dim)`` float32 vectors of ``value``, a non-empty list of rows of ``latent_dim`` numbers."""
    if not isinstance(value, list) or not value:
        raise BadField(where, f"must be a non-empty list of vectors of {m.latent_dim} numbers, got {_short(value)}")
    for k, row in enumerate(value):
        if not isinstance(row, list):
            raise BadField(f"{where}[{k}]", f"must be a list of {m.latent_dim} numbers, got {_short(row)}")
        if len(row) != m.latent_dim:
            raise BadField(f"{where}[{k}]", f"has width {len(row)}; modality {m.name!r} has latent_dim "
                                             f"{m.latent_dim}")
    vectors = np.asarray(value)
    if vectors.dtype.kind not in "iuf":
        bad = next(((k, c) for k, row in enumerate(value) for c, v in enumerate(row)
                    if type(v) not in (int, float)), None)
        if bad is not None:
            raise BadField(f"{where}[{bad[0]}][{bad[1]}]", f"{_short(value[bad[0]][bad[1]])} is not a number")
        vectors = np.asarray(value, dtype=np.float64)
    with np.errstate(over="ignore"):
        vectors = vectors.astype(np.float32)
    if not np.isfinite(vectors).all():
        k, c = (int(i) for i in np.argwhere(~np.isfinite(vectors))[0])
        raise BadField(f"{where}[{k}][{c}]", f"{value[k][c]} is not a finite float32")
    return vectors


def _segment(value, where: str, modalities: Sequence[ModalityConfig], names: list[str]) -> tuple[int, np.ndarray]:
    if not isinstance(value, dict):
        raise BadField(where, f'must be an object {{"modality": ..., "tokens" or "latents": ...}}, got '
                               f"{_short(value)}")
    unknown = [k for k in value if k not in SEGMENT_FIELDS]
    if unknown:
        raise BadField(where, f"unknown field(s) {', '.join(map(repr, unknown))}; valid fields: "
                               f"{', '.join(SEGMENT_FIELDS)}")
    name = value.get("modality")
    if not isinstance(name, str) or name not in names:
        raise BadField(f"{where}.modality", f"{_short(name)} is not a modality of the spec; its modalities: "
                                             f"{', '.join(names)}")
    i = names.index(name)
    m = modalities[i]
    form = f"discrete (vocab_size {m.vocab_size})" if m.discrete else f"continuous (latent_dim {m.latent_dim})"
    wanted, other = ("tokens", "latents") if m.discrete else ("latents", "tokens")
    if other in value:
        raise BadField(f"{where}.{other}", f"modality {name!r} is {form}: give `{wanted}`, not `{other}`")
    if wanted not in value:
        raise BadField(where, f"missing `{wanted}` of {form} modality {name!r}")
    return i, (_tokens if m.discrete else _latents)(value[wanted], f"{where}.{wanted}", m)


def parse_line(line: str | bytes, modalities: Sequence[ModalityConfig],
               names: list[str]) -> list[tuple[int, np.ndarray]]:
    """The segments ``(modality id, values)`` of one line; raises :class:`BadField` naming the field at fault."""
    if isinstance(line, bytes):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadField("", f"not UTF-8 ({exc.reason})") from None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise BadField("", f"not valid JSON: {exc.msg} at column {exc.colno}") from None
    if not isinstance(record, dict) or "segments" not in record:
        raise BadField("segments", 'missing: a line is an object {"segments": [...]}')
    segments = record["segments"]
    if not isinstance(segments, list) or not segments:
        raise BadField("segments", f"must be a non-empty list of segments, got {_short(segments)}")
    return [_segment(value, f"segments[{j}]", modalities, names) for j, value in enumerate(segments)]


def read_jsonl(path: str | Path, modalities: Sequence[ModalityConfig]) -> Iterator[list[tuple[int, np.ndarray]]]:
    """The documents of a JSON-lines file, one line at a time.

    Each document is a list of segments ``(modality id, values)``: ``values`` are ``(n,)`` int64 token ids for a
    discrete modality, ``(n, latent_dim)`` float32 vectors for a continuous one; ids index ``modalities``.

    Raises:
        SpecError: the file is missing or holds no document, or a line is bad; the message names the file, the
            line and the field (e.g. ``data.jsonl, line 7, segments[1].tokens[3]: 300 is out of range ...``).
    """
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"jsonl file {str(path)!r} does not exist")
    names = [m.name for m in modalities]
    documents = 0
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, 1):
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                document = parse_line(line, modalities, names)
            except UnicodeDecodeError as exc:
                raise SpecError(f"{path}, line {number}: not UTF-8 ({exc.reason})") from None
            except BadField as exc:
                where, what = exc.args
                raise SpecError(f"{path}, line {number}{', ' + where if where else ''}: {what}") from None
            documents += 1
            yield document
    if not documents:
        raise SpecError(f"jsonl file {str(path)!r} holds no documents")


def token_dtype(modalities: Sequence[ModalityConfig]) -> np.dtype:
    """The smallest unsigned type of the shards' ``tokens`` array for ``modalities``: it holds every token id
    (``0..vocab_size-1``) and, with a continuous modality, the row of each latent vector (uint32)."""
    largest = max([m.vocab_size - 1 for m in modalities if m.discrete] +
                  [np.iinfo(np.uint32).max for m in modalities if not m.discrete])
    for dtype in (np.uint8, np.uint16, np.uint32):
        if largest <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.int64)


class ShardArrays:
    """Lays documents out as the shards' flat arrays, handing each part to ``append(array name, values)``.

    Args:
        modalities: The spec's modalities.
        append: Receives each part, in order.
        counts: The :attr:`counts` of arrays already appended (a resumed conversion); ``None``: a fresh start,
            whose first part is the offsets' leading 0.
    """

    def __init__(self, modalities: Sequence[ModalityConfig], append: Callable[[str, np.ndarray], None],
                 counts: dict | None = None):
        if len(modalities) > 256:
            raise SpecError(f"shards hold at most 256 modalities (uint8 ids); got {len(modalities)}")
        self.modalities, self.append, self.dtype = list(modalities), append, token_dtype(modalities)
        if counts is None:
            counts = {"documents": 0, "positions": 0, "modalities": [
                {"name": m.name, "kind": m.kind, "vocab_size": m.vocab_size, "latent_dim": m.latent_dim,
                 "positions": 0, "max_token": -1} for m in modalities]}
            append("offsets", np.zeros(1, dtype=np.int64))
        self.counts = counts

    def add(self, document: list[tuple[int, np.ndarray]]) -> None:
        """Append one document, a list of segments ``(modality id, values)``."""
        stats = self.counts["modalities"]
        for i, values in document:
            n = len(values)
            if self.modalities[i].discrete:
                ids = values
                stats[i]["max_token"] = max(stats[i]["max_token"], int(values.max()))
            else:
                if stats[i]["positions"] + n > np.iinfo(self.dtype).max + 1:
                    raise SpecError(f"modality {self.modalities[i].name!r} has more than "
                                    f"{np.iinfo(self.dtype).max + 1} latent vectors, more than shards hold; "
                                    f"convert the data in parts")
                ids = np.arange(stats[i]["positions"], stats[i]["positions"] + n, dtype=np.int64)
                self.append(f"latents-{i}", values)
            self.append("modality", np.full(n, i, dtype=np.uint8))
            self.append("tokens", ids.astype(self.dtype))
            stats[i]["positions"] += n
            self.counts["positions"] += n
        self.append("offsets", np.array([self.counts["positions"]], dtype=np.int64))
        self.counts["documents"] += 1


def array_files(modalities: Sequence[ModalityConfig], stats: dict) -> dict[str, dict]:
    """File, dtype and shape of each array of shards with counts ``stats``."""
    arrays = {"modality": {"dtype": "uint8", "shape": [stats["positions"]]},
              "tokens": {"dtype": token_dtype(modalities).name, "shape": [stats["positions"]]},
              "offsets": {"dtype": "int64", "shape": [stats["documents"] + 1]}}
    for i, m in enumerate(modalities):
        if not m.discrete:
            arrays[f"latents-{i}"] = {"dtype": "float32", "shape": [stats["modalities"][i]["positions"], m.latent_dim]}
    return {name: {"file": f"{name}.bin", **spec} for name, spec in arrays.items()}


class Documents:
    """Documents as the shards' flat arrays, in memory or memory-mapped.

    Attributes:
        modality: ``(P,)`` uint8 index of each position's modality in the shards' list.
        tokens: ``(P,)`` unsigned (or, in version 1 shards, int64) token ids; at continuous positions, rows of
            ``latents``.
        offsets: ``(N + 1,)`` int64 first position of each document, then ``P``.
        latents: ``{i: (P_i, latent_dim)}`` float32 vectors of continuous modality ``i``.
        to_spec: ``(M,)`` int64 index in the spec's modalities of each of the shards' (-1: not in the spec, and
            no positions).
    """

    def __init__(self, modality: np.ndarray, tokens: np.ndarray, offsets: np.ndarray,
                 latents: dict[int, np.ndarray], to_spec: np.ndarray):
        self.modality, self.tokens, self.offsets, self.latents, self.to_spec = (modality, tokens, offsets,
                                                                                latents, to_spec)

    @property
    def num_documents(self) -> int:
        return len(self.offsets) - 1

    def read(self, pieces: Sequence[Piece]) -> list[Chunk]:
        """One chunk per piece, read from the arrays' slices."""
        chunks = []
        for doc, start, stop in pieces:
            begin = int(self.offsets[doc]) + start
            own = np.asarray(self.modality[begin:begin + stop - start])
            tokens = np.array(self.tokens[begin:begin + stop - start], dtype=np.int64)
            latents = {}
            for i, vectors in self.latents.items():
                rows = tokens[own == i]
                if len(rows):
                    latents[int(self.to_spec[i])] = np.asarray(vectors[rows[0]:rows[-1] + 1])
                    tokens[own == i] = 0
            chunks.append(Chunk(self.to_spec[own], tokens, latents))
        return chunks


def load_jsonl(path: str | Path, modalities: Sequence[ModalityConfig]) -> Documents:
    """The documents of a JSON-lines file, in memory (see :func:`read_jsonl` for the errors)."""
    parts: dict[str, list[np.ndarray]] = {}
    layout = ShardArrays(modalities, lambda name, v: parts.setdefault(name, []).append(v))
    for document in read_jsonl(path, modalities):
        layout.add(document)
    stats = layout.counts
    arrays = {name: np.concatenate(parts[name]) if name in parts else np.zeros(spec["shape"], dtype=spec["dtype"])
              for name, spec in array_files(modalities, stats).items()}
    return Documents(arrays["modality"], arrays["tokens"], arrays["offsets"],
                     {i: arrays[f"latents-{i}"] for i, m in enumerate(modalities) if not m.discrete},
                     np.arange(len(modalities)))


def _mismatch(entry: dict, m: ModalityConfig, encoders: dict) -> str | None:
    """How the shards' modality ``entry`` (encoded as ``encoders`` say) does not fit the spec's ``m`` of the same
    name, or ``None``."""
    if entry["kind"] != m.kind:
        return f"is of kind {entry['kind']!r} in the shards and {m.kind!r} in the spec"
    if (entry["vocab_size"] is not None) != m.discrete:
        forms = ("discrete", "continuous") if m.discrete else ("continuous", "discrete")
        return f"is {forms[1]} in the shards and {forms[0]} in the spec"
    if not m.discrete and entry["latent_dim"] != m.latent_dim:
        return f"has latent_dim {entry['latent_dim']} in the shards and {m.latent_dim} in the spec"
    if m.discrete and entry["max_token"] >= m.vocab_size:
        return f"has token ids up to {entry['max_token']} in the shards, beyond the spec's vocab_size {m.vocab_size}"
    encoded = encoders.get(m.name)
    if m.encoder is not None and encoded is not None:
        if encoded["config"] != m.encoder.model_dump(mode="json"):
            return (f"was encoded by {json.dumps(encoded['config'])}, but the spec names encoder "
                    f"{json.dumps(m.encoder.model_dump(mode='json'))}; convert again, or give the spec the "
                    f"shards' encoder")
        if m.discrete and encoded["size"] > m.vocab_size:
            return (f"was encoded with {encoded['size']} ids (encoder {encoded['config']['kind']!r}), more than the "
                    f"spec's vocab_size {m.vocab_size}; valid vocab_size: at least {encoded['size']}")
    return None


def open_shards(directory: str | Path, modalities: Sequence[ModalityConfig]) -> Documents:
    """Memory-map shards written by :func:`convert`, checking their modalities against the spec's.

    Raises:
        SpecError: not shards, another format version, or a modality with positions that the spec lacks or
            has in another form (kind, discrete or continuous, latent_dim, too small a vocab_size).
    """
    directory = Path(directory)
    header = _header(directory)
    if header.get("format") != FORMAT or header.get("version") not in READABLE_VERSIONS:
        raise SpecError(f"{directory} holds format {header.get('format')!r} version {header.get('version')!r}; "
                        f"this momkit reads {FORMAT!r} versions {', '.join(map(str, READABLE_VERSIONS))}")
    names = [m.name for m in modalities]
    to_spec = []
    for entry in header["modalities"]:
        if entry["name"] not in names:
            if entry["positions"]:
                raise SpecError(f"shards {directory} hold modality {entry['name']!r} ({entry['positions']} "
                                f"positions), not a modality of the spec; its modalities: {', '.join(names)}")
            to_spec.append(-1)
            continue
        problem = _mismatch(entry, modalities[names.index(entry["name"])], header.get("encoders", {}))
        if problem:
            raise SpecError(f"modality {entry['name']!r} of shards {directory} {problem}")
        to_spec.append(names.index(entry["name"]))
    arrays = {name: _map(directory / spec["file"], spec["dtype"], spec["shape"])
              for name, spec in header["arrays"].items()}
    return Documents(arrays["modality"], arrays["tokens"], arrays["offsets"],
                     {i: arrays[f"latents-{i}"] for i in range(len(to_spec)) if f"latents-{i}" in arrays},
                     np.array(to_spec, dtype=np.int64))


def _header(directory: Path) -> dict:
    if not (directory / HEADER).is_file():
        raise SpecError(f"{directory} has no {HEADER}: not shards written by momkit convert (or the conversion "
                        f"did not finish)")
    return json.loads((directory / HEADER).read_text())


def codecs(directory: str | Path, modalities: Sequence[ModalityConfig],
           inputs: tuple[str, ...] = ENCODER_INPUTS) -> dict[str, object]:
    """``{name: codec}`` of the encoders that wrote the shards' modalities (those of the spec), those that read
    ``inputs`` only, opened on what they fitted, on the CPU (see :class:`momkit.descriptors.Encoder`)."""
    directory = Path(directory)
    names = [m.name for m in modalities]
    opened = {}
    for name, entry in _header(directory).get("encoders", {}).items():
        encoder = get_registry().get("encoder", entry["config"]["kind"]) if name in names else None
        if encoder is not None and encoder.inputs in inputs:
            config = encoder.config.model_validate(entry["config"])
            opened[name] = encoder.open(config, directory / "encoders" / name, torch.device("cpu"))
    return opened


def _token_bytes(directory: str | None, modalities: Sequence[ModalityConfig]) -> dict[str, np.ndarray]:
    if directory is None:
        return {}
    return {name: codec.token_bytes() for name, codec in codecs(directory, modalities, ("text",)).items()
            if hasattr(codec, "token_bytes")}


def decoders(config: JsonlConfig, modalities: Sequence[ModalityConfig]) -> dict[str, object]:
    """The codecs of the training shards' modalities that decode (``momkit sample`` draws images with those
    that have a ``length``, and writes text prompts with a text one)."""
    if config.shards is None:
        return {}
    return {name: codec for name, codec in codecs(config.shards, modalities).items() if hasattr(codec, "decode")}


def check(config: JsonlConfig, modalities: Sequence[ModalityConfig]) -> None:
    """Refuse shards that do not fit the spec (``momkit validate``; see :func:`open_shards`). Shards not written
    yet are not checked: a spec is validated before ``momkit convert`` writes its data."""
    for directory in (config.shards, config.eval_shards):
        if directory is not None and Path(directory).exists():
            open_shards(directory, modalities)


def _map(path: Path, dtype: str, shape: list[int]) -> np.ndarray:
    if 0 in shape:
        return np.zeros(shape, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=tuple(shape))


def _open(path: str | None, shards: str | None, modalities: Sequence[ModalityConfig]) -> Documents:
    return load_jsonl(path, modalities) if path is not None else open_shards(shards, modalities)


def build(config: JsonlConfig, modalities: Sequence[ModalityConfig], split: str, seq_len: int) -> PackedSource:
    """The ``split`` of the jsonl data as batches of ``seq_len`` positions (see the module docstring)."""
    check_split(split, seq_len)
    modalities = list(modalities)
    source, held_out = config.path or config.shards, config.eval_path or config.eval_shards
    if split == "eval" and held_out is not None:
        documents = _open(config.eval_path, config.eval_shards, modalities)
        first, count, name = 0, documents.num_documents, f"the eval split ({held_out})"
    else:
        documents = _open(config.path, config.shards, modalities)
        total = documents.num_documents
        held = 0 if held_out is not None else max(1, round(total * config.eval_fraction))
        if held >= total:
            raise SpecError(f"{source} holds {total} document(s): too few to hold out eval_fraction "
                            f"{config.eval_fraction} for eval and train on the rest; add documents, or give "
                            f"eval_path or eval_shards")
        first, count = (total - held, held) if split == "eval" else (0, total - held)
        name = f"the {split} split ({source}, documents {first}..{first + count - 1})"
    layout = StreamLayout(documents.offsets[first:first + count + 1], seq_len, first, name)
    return PackedSource(modalities, seq_len, documents, layout, _token_bytes(config.shards, modalities))
