"""``momkit convert``: raw documents from a source, through each modality's encoder, into shards.

The conversion streams: it holds one batch of records (``batch_size``) and what the encoders fit on (their
``fit_items``) in memory, never the input. It writes into ``.<out>.partial`` beside the output directory and
records, after every batch, how many records are done and how long each array file is; run again with the same
arguments, an interrupted conversion truncates the files to the last finished batch and goes on from there,
which gives the same shards as an uninterrupted run. A finished conversion is renamed to the output directory.

A bad item (an unreadable image, an empty caption, a token id out of range, a file outside the input folder)
stops the conversion with the item named (``on_error="stop"``, the default), or is skipped, counted in the
header's ``skipped`` and listed with its reason in ``skipped.jsonl`` (``on_error="skip"``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm import tqdm

from momkit.configs import check_encoder_size
from momkit.errors import SpecError
from momkit.plugins.data import jsonl
from momkit.plugins.data.sources import LOADERS, BadItem, Source, open_source
from momkit.registry import get_registry
from momkit.spec import ModalityConfig

ON_ERROR = ("stop", "skip")
PROGRESS, SKIPPED, ENCODERS = "progress.json", "skipped.jsonl", "encoders"


def _columns(source: Source, modalities: Sequence[ModalityConfig], given: str | None) -> list[tuple[str, int]]:
    """``[(field, modality id)]`` in document order: ``given`` as ``field=modality,...``, else each field of the
    source mapped to the one modality that reads its kind."""
    names = [m.name for m in modalities]
    if given:
        columns = []
        for item in given.split(","):
            field, eq, name = item.partition("=")
            if not eq or not field or name not in names:
                raise SpecError(f"--columns item {item!r} is not FIELD=MODALITY with MODALITY one of the spec's: "
                                f"{', '.join(names)}")
            columns.append((field.strip(), names.index(name)))
        return columns
    if source.kind == "jsonl":
        return [("segments", -1)]
    reads = [get_registry().get("encoder", m.encoder.kind).inputs if m.encoder else None for m in modalities]
    columns = []
    for field, kind in source.fields:
        takers = [i for i, r in enumerate(reads) if r == kind]
        if len(takers) > 1:
            raise SpecError(f"field {field!r} ({kind}) could go to modalities "
                            f"{', '.join(names[i] for i in takers)}; say which with --columns {field}=MODALITY,...")
        if takers:
            columns.append((field, takers[0]))
    if not columns:
        raise SpecError(f"no field of the {source.kind} source ({', '.join(f'{f} ({k})' for f, k in source.fields)}) "
                        f"fits a modality with an encoder; give modalities an `encoder` (e.g. text: bytes), or map "
                        f"fields with --columns FIELD=MODALITY,...")
    return columns


class _Codecs:
    """The encoders of the mapped modalities, opened on their state directory."""

    def __init__(self, modalities: Sequence[ModalityConfig], ids: set[int], directory: Path, device: torch.device):
        self.codecs, self.reads, self.names = {}, {}, [m.name for m in modalities]
        for i in sorted(ids):
            m = modalities[i]
            if m.encoder is None:
                raise SpecError(f"modality {m.name!r} has no encoder to turn raw items into "
                                f"{'tokens' if m.discrete else 'latents'}; set its `encoder`, e.g. "
                                f"{'bytes' if m.kind == 'text' else 'vq' if m.discrete else 'patches'}")
            encoder = get_registry().get("encoder", m.encoder.kind)
            self.codecs[i] = encoder.open(m.encoder, directory / m.name, device)
            self.reads[i] = encoder.inputs
            if hasattr(self.codecs[i], "save"):
                self.codecs[i].save()

    def fit(self, source: Source, columns: list[tuple[str, int]]) -> None:
        """Fit the codecs that want it on the first items of their fields (bad items left out here: the
        conversion reports them)."""
        wanted = {i: c.fit_items for i, c in self.codecs.items() if c.fit_items}
        if not wanted:
            return
        items: dict[int, list] = {i: [] for i in wanted}
        for where, fields in source.records():
            if isinstance(fields, BadItem):
                continue
            for field, i in columns:
                if i in wanted and len(items[i]) < wanted[i] and field in fields:
                    try:
                        items[i].append(LOADERS[self.reads[i]](fields[field], where))
                    except BadItem:
                        pass
            if all(len(items[i]) >= wanted[i] for i in wanted):
                break
        for i, codec in self.codecs.items():
            if i in wanted:
                if not items[i]:
                    raise SpecError(f"the encoder of modality {self.names[i]!r} has no readable item to fit on")
                codec.fit(items[i])

    def check_sizes(self, modalities: Sequence[ModalityConfig]) -> None:
        for i, codec in self.codecs.items():
            m = modalities[i]
            check_encoder_size(m.name, m.encoder.kind, m.discrete, m.vocab_size or m.latent_dim, codec.size)


class _Writer:
    """Array files of a partial conversion, appended batch by batch, and the progress that resumes it.

    A partial directory without progress (none, or one interrupted before its first record) starts over: it is
    emptied, the encoders' fitted state included. One with progress must carry ``fingerprint``.
    """

    def __init__(self, partial: Path, fingerprint: str):
        self.partial, self.fingerprint, self.files = partial, fingerprint, {}
        saved = partial / PROGRESS
        self.progress = json.loads(saved.read_text()) if saved.is_file() else None
        if self.progress is None:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        elif self.progress["fingerprint"] != fingerprint:
            raise SpecError(f"{partial} holds an unfinished conversion of other input, spec or options; delete it "
                            f"to start over, or rerun the command that began it to resume it")
        self.done = self.progress["records"] if self.progress else 0
        self.skipped = self.progress["skipped"] if self.progress else {}
        for name, size in (self.progress["sizes"] if self.progress else {}).items():
            self._file(name).truncate(size)
            self._file(name).seek(size)

    def start(self, modalities: Sequence[ModalityConfig]) -> None:
        """Lay documents out from where the progress left off, and record the starting point."""
        self.layout = jsonl.ShardArrays(modalities, self.append, self.progress["counts"] if self.progress else None)
        self._file(SKIPPED)
        self.commit(self.done)

    def _file(self, name: str):
        if name not in self.files:
            path = self.partial / (name if name == SKIPPED else f"{name}.bin")
            self.files[name] = open(path, "r+b" if path.exists() else "w+b")
            self.files[name].seek(0, os.SEEK_END)
        return self.files[name]

    def append(self, name: str, values: np.ndarray) -> None:
        self._file(name).write(np.ascontiguousarray(values).tobytes())

    def skip(self, where: str, reason: str) -> None:
        """List a skipped item and count it under its reason (the message without the item's name)."""
        self._file(SKIPPED).write((json.dumps({"item": where, "reason": reason}) + "\n").encode())
        kind = reason.rsplit(": ", 1)[-1].split(" (", 1)[0] if reason.startswith(where) else reason
        self.skipped[kind] = self.skipped.get(kind, 0) + 1

    def commit(self, records: int) -> None:
        """Hand what was appended to the operating system, then record that the first ``records`` records are
        done (an interrupted or killed process resumes from here)."""
        for f in self.files.values():
            f.flush()
        self.done = records
        progress = {"fingerprint": self.fingerprint, "records": records, "skipped": self.skipped,
                    "sizes": {name: f.tell() for name, f in self.files.items()}, "counts": self.layout.counts}
        fresh = self.partial / (PROGRESS + ".tmp")
        fresh.write_text(json.dumps(progress))
        os.replace(fresh, self.partial / PROGRESS)

    def close(self) -> None:
        for f in self.files.values():
            f.close()


def _document(where: str, fields: Any, columns: list[tuple[str, int]], codecs: _Codecs,
              modalities: Sequence[ModalityConfig], names: list[str]) -> list[tuple[int, Any]]:
    """The loaded (not yet encoded) segments of one record: ``[(modality id, item)]``; raises BadItem."""
    if isinstance(fields, BadItem):
        raise fields
    if columns == [("segments", -1)]:
        try:
            return [(i, values) for i, values in jsonl.parse_line(fields["segments"], modalities, names)]
        except jsonl.BadField as exc:
            field, what = exc.args
            raise BadItem(f"{where}{', ' + field if field else ''}: {what}") from None
    segments = []
    for field, i in columns:
        if field not in fields or fields[field] is None:
            raise BadItem(f"{where}: no {field!r}")
        segments.append((i, LOADERS[codecs.reads[i]](fields[field], f"{where}, {field}")))
    return segments


def _encode(batch: list[tuple[str, list]], codecs: _Codecs, tokenized: bool) -> list[tuple[str, Any]]:
    """Each record's segments encoded, a batch per modality; a record whose item the encoder refuses comes back
    as a BadItem."""
    if tokenized:
        return batch
    items: dict[int, list] = {}
    for _, segments in batch:
        for i, item in [] if isinstance(segments, BadItem) else segments:
            items.setdefault(i, []).append(item)
    encoded: dict[int, list] = {}
    for i, values in items.items():
        try:
            encoded[i] = codecs.codecs[i].encode(values)
        except SpecError:
            encoded[i] = []
            for value in values:
                try:
                    encoded[i] += codecs.codecs[i].encode([value])
                except SpecError as exc:
                    encoded[i].append(exc)
    taken = {i: iter(v) for i, v in encoded.items()}
    out = []
    for where, segments in batch:
        if isinstance(segments, BadItem):
            out.append((where, segments))
            continue
        document = [(i, next(taken[i])) for i, _ in segments]
        bad = next((v for _, v in document if isinstance(v, SpecError)), None)
        out.append((where, BadItem(f"{where}: {bad}") if bad is not None else document))
    return out


def _identity(input_path: str) -> list:
    """The input as a conversion's fingerprint records it: its absolute path, and a file's size and time."""
    path = Path(input_path)
    if not path.exists():
        return [input_path]
    stat = path.stat()
    return [str(path.resolve())] + ([stat.st_size, stat.st_mtime_ns] if path.is_file() else [])


def convert(input_path: str, out_dir: str | Path, modalities: Sequence[ModalityConfig], *, source: str | None = None,
            columns: str | None = None, on_error: str = "stop", batch_size: int = 64, device: str = "auto",
            progress: bool = True, **options: Any) -> Path:
    """Convert ``input_path`` (read by ``source``, see :mod:`momkit.plugins.data.sources`) into shards.

    Args:
        input_path: File, folder, or hub name of the input.
        out_dir: The directory to write; it must not exist, or be empty.
        modalities: The spec's modalities: their names, sizes and encoders.
        source: One of :data:`momkit.plugins.data.sources.SOURCES`; ``None`` guesses from the input.
        columns: ``field=modality,...`` in document order; ``None``: each field to the modality that reads it.
        on_error: ``stop`` at a bad item, naming it, or ``skip`` it (counted, listed in ``skipped.jsonl``).
        batch_size: Records encoded at once, and between two resumable points.
        device: Where encoders run: ``auto`` (CUDA if available), ``cpu``, ``cuda``, ...
        progress: Show a progress bar on stderr.
        options: Source options: ``split`` (hf), ``glob`` (text), ``images`` (coco).

    Returns:
        ``out_dir`` as a path.
    """
    if on_error not in ON_ERROR:
        raise SpecError(f"on_error {on_error!r} is not one of {', '.join(ON_ERROR)}")
    if batch_size < 1:
        raise SpecError(f"batch_size must be a positive int, got {batch_size}")
    modalities, out = list(modalities), Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SpecError(f"{out} exists and is not an empty directory; convert into a new directory")
    opened = open_source(source, input_path, options)
    mapping = _columns(opened, modalities, columns)
    names = [m.name for m in modalities]
    tokenized = mapping == [("segments", -1)]
    try:
        target = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                              "cpu" if device == "auto" else device)
    except RuntimeError:
        raise SpecError(f"device {device!r} is not a torch device; valid: auto, cpu, cuda, cuda:N") from None
    fingerprint = hashlib.sha256(json.dumps({
        "input": _identity(input_path),
        "source": opened.kind, "columns": mapping, "options": {k: v for k, v in options.items() if v is not None},
        "modalities": [m.model_dump(mode="json") for m in modalities]}, sort_keys=True).encode()).hexdigest()
    writer = _Writer(out.with_name(f".{out.name}.partial"), fingerprint)
    bar = None
    try:
        codecs = _Codecs(modalities, set() if tokenized else {i for _, i in mapping}, writer.partial / ENCODERS,
                         target)
        codecs.fit(opened, mapping)
        codecs.check_sizes(modalities)
        writer.start(modalities)
        bar = tqdm(total=opened.count, initial=writer.done, unit="doc", desc=f"convert {Path(input_path).name}",
                   disable=not progress, leave=False)
        records, batch = 0, []
        for where, fields in opened.records():
            records += 1
            if records <= writer.done:
                continue
            try:
                batch.append((where, _document(where, fields, mapping, codecs, modalities, names)))
            except BadItem as exc:
                batch.append((where, exc))
            if len(batch) == batch_size:
                _write(_encode(batch, codecs, tokenized), writer, on_error)
                writer.commit(records)
                bar.update(len(batch))
                batch = []
        _write(_encode(batch, codecs, tokenized), writer, on_error)
        writer.commit(records)
        bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()
        writer.close()
    return _finish(writer, out, modalities, codecs, opened, input_path)


def _write(batch: list[tuple[str, Any]], writer: _Writer, on_error: str) -> None:
    for where, document in batch:
        if isinstance(document, BadItem):
            if on_error == "stop":
                raise SpecError(f"{document} (--on-error skip skips such items, counting them)")
            writer.skip(where, str(document))
            continue
        writer.layout.add([(i, np.asarray(values)) for i, values in document])


def _finish(writer: _Writer, out: Path, modalities: Sequence[ModalityConfig], codecs: _Codecs, source: Source,
            input_path: str) -> Path:
    partial, counts = writer.partial, writer.layout.counts
    if not counts["documents"]:
        raise SpecError(f"{input_path} gave no documents ({sum(writer.skipped.values())} skipped: see "
                        f"{partial / SKIPPED})")
    arrays = jsonl.array_files(modalities, counts)
    for spec in arrays.values():
        (partial / spec["file"]).touch()
    encoders = {modalities[i].name: {"config": modalities[i].encoder.model_dump(mode="json"), "size": codec.size}
                for i, codec in codecs.codecs.items()}
    header = {"format": jsonl.FORMAT, "version": jsonl.FORMAT_VERSION, "source": str(input_path),
              "reader": source.kind, **counts, "arrays": arrays, "encoders": encoders, "skipped": writer.skipped}
    (partial / PROGRESS).unlink()
    (partial / jsonl.HEADER).write_text(json.dumps(header, indent=1))
    if out.exists():
        out.rmdir()
    os.replace(partial, out)
    return out

