"""Where ``momkit convert`` reads raw documents: each source yields records of named fields, streamed.

A record is one document's raw fields (``{"caption": "a red square", "image": <file>}``); the converter maps
fields to the spec's modalities and runs their encoders. Sources (``--source``, or guessed from the input):

- ``jsonl``: a JSON-lines file of pre-tokenized documents (see :mod:`momkit.plugins.data.jsonl`);
- ``text``: a text file, or a folder of them (``--glob``, default ``**/*.txt``), one document per file;
- ``hf``: a Hugging Face ``datasets`` dataset: local files (parquet, json, csv, arrow) or a hub name,
  streamed, one document per row, columns as fields;
- ``captions``: an image folder with ``captions.jsonl`` lines ``{"image": "cat.png", "caption": "..."}``;
- ``coco``: COCO-style caption annotations (``captions_*.json``), one document per caption, the images in
  ``--images`` (default: beside the annotations);
- ``audio``: an audio folder with ``transcripts.jsonl`` lines ``{"audio": "a.wav", "text": "..."}``, or WAV files
  each with a ``.txt`` transcript beside it;
- ``webdataset``: WebDataset tar shards (a ``.tar`` file or a folder of them): members grouped by key, the
  extension naming the field (``txt``, ``png``, ``wav``, ...).

Nothing is extracted: archives are read member by member, and a file named by a folder's index or an
archive's member must lie inside the folder or archive (an absolute path or one with ``..`` is a bad item).
"""

from __future__ import annotations

import io
import json
import tarfile
import wave
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator

import numpy as np
from PIL import Image

from momkit.errors import SpecError

SOURCES = ("jsonl", "text", "hf", "captions", "coco", "audio", "webdataset")
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "bmp", "gif")
AUDIO_EXTENSIONS = ("wav",)
TEXT_EXTENSIONS = ("txt", "text", "caption", "transcript")
HF_FILES = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json", ".arrow": "arrow"}


class BadItem(Exception):
    """One item of the input that cannot be used; ``str(exc)`` says why."""


@dataclass
class Source:
    """A source opened on an input.

    Attributes:
        kind: One of :data:`SOURCES`.
        fields: ``[(field, reads)]`` the fields its records have, in document order, each with what it holds
            (``text``, ``image``, ``audio``, or ``tokens`` for pre-tokenized segments).
        records: ``records() -> iterator of (where, {field: value})``: a fresh pass over the input; ``where``
            names the item (file and line, archive and key, row number). A record refused as a whole (an
            archive member outside the archive) comes as ``(where, BadItem)``.
        count: The number of records if known without reading them all, for progress.
    """

    kind: str
    fields: list[tuple[str, str]]
    records: Callable[[], Iterator[tuple[str, dict[str, Any]]]]
    count: int | None = None


def inside(root: Path, name: str, where: str) -> Path:
    """``root / name``, refusing a ``name`` that is absolute or climbs out with ``..``."""
    parts = PurePosixPath(name.replace("\\", "/"))
    if not name or parts.is_absolute() or ".." in parts.parts or Path(name).is_absolute():
        raise BadItem(f"{where}: path {name!r} leaves {root} (absolute, or with '..'); refused")
    return root / parts


def _index(path: Path) -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` of each non-blank line of a JSON-lines index."""
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise SpecError(f"{path}, line {number}: not a JSON object ({exc})") from None
            if not isinstance(record, dict):
                raise SpecError(f"{path}, line {number}: not a JSON object")
            yield number, record


def _indexed_folder(root: Path, index: str, media: str, text_keys: tuple[str, ...]) -> Source:
    path = root / index

    def records():
        for number, record in _index(path):
            where = f"{path}, line {number}"
            fields = {}
            if isinstance(record.get(media), str):
                fields[media] = _Lazy(root, record[media], where)
            text = next((record[k] for k in text_keys if k in record), None)
            if text is not None:
                fields["text"] = text
            yield where, fields

    count = sum(1 for line in path.open("rb") if line.strip())
    return Source(kind="captions" if media == "image" else "audio", fields=[("text", "text"), (media, media)],
                  records=records, count=count)


@dataclass(frozen=True)
class _Lazy:
    """A file named by an index, read when the converter loads it (so a bad name is a bad item, not a crash)."""

    root: Path
    name: str
    where: str

    def read(self) -> bytes:
        path = inside(self.root, self.name, self.where)
        try:
            return path.read_bytes()
        except OSError as exc:
            raise BadItem(f"{self.where}: cannot read {path} ({exc.strerror or exc})") from None


def _captions(root: Path, options: dict) -> Source:
    if not (root / "captions.jsonl").is_file():
        raise SpecError(f"{root} has no captions.jsonl (lines {{\"image\": \"cat.png\", \"caption\": \"...\"}}); "
                        f"for COCO annotations give the captions_*.json file with --source coco")
    return _indexed_folder(root, "captions.jsonl", "image", ("caption", "text"))


def _coco(path: Path, options: dict) -> Source:
    images = Path(options.get("images") or path.parent)
    try:
        data = json.loads(path.read_text())
        files = {entry["id"]: entry["file_name"] for entry in data["images"]}
        annotations = [(a["image_id"], a["caption"]) for a in data["annotations"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SpecError(f"{path} is not COCO caption annotations ({{images: [{{id, file_name}}], annotations: "
                        f"[{{image_id, caption}}]}}): {exc!r}") from None

    def records():
        for k, (image_id, caption) in enumerate(annotations):
            where = f"{path}, annotation {k}"
            fields = {"text": caption}
            if image_id in files:
                fields["image"] = _Lazy(images, files[image_id], where)
            yield where, fields

    return Source(kind="coco", fields=[("text", "text"), ("image", "image")], records=records,
                  count=len(annotations))


def _audio(root: Path, options: dict) -> Source:
    if (root / "transcripts.jsonl").is_file():
        return _indexed_folder(root, "transcripts.jsonl", "audio", ("text", "transcript"))
    clips = sorted(root.rglob("*.wav"))
    if not clips:
        raise SpecError(f"{root} has neither transcripts.jsonl nor .wav files")

    def records():
        for clip in clips:
            transcript = clip.with_suffix(".txt")
            fields = {"audio": _Lazy(root, str(clip.relative_to(root)), str(clip))}
            if transcript.is_file():
                fields["text"] = transcript.read_bytes()
            yield str(clip), fields

    return Source(kind="audio", fields=[("text", "text"), ("audio", "audio")], records=records, count=len(clips))


def _text(path: Path, options: dict) -> Source:
    pattern = options.get("glob") or "**/*.txt"
    files = [path] if path.is_file() else sorted(p for p in path.glob(pattern) if p.is_file())
    if not files:
        raise SpecError(f"{path} holds no file matching --glob {pattern!r}")

    def records():
        for file in files:
            yield str(file), {"text": file.read_bytes()}

    return Source(kind="text", fields=[("text", "text")], records=records, count=len(files))


def _jsonl(path: Path, options: dict) -> Source:
    def records():
        with path.open("rb") as lines:
            for number, raw in enumerate(lines, 1):
                if raw.strip():
                    yield f"{path}, line {number}", {"segments": raw}

    return Source(kind="jsonl", fields=[("segments", "tokens")], records=records)


def _kind_of_extension(extension: str) -> str | None:
    if extension in IMAGE_EXTENSIONS:
        return "image"
    if extension in AUDIO_EXTENSIONS:
        return "audio"
    if extension in TEXT_EXTENSIONS:
        return "text"
    return None


def _webdataset(path: Path, options: dict) -> Source:
    tars = [path] if path.is_file() else sorted(path.glob("*.tar"))
    if not tars:
        raise SpecError(f"{path} is neither a .tar file nor a folder of .tar shards")

    def samples(tar_path: Path) -> Iterator[tuple[str, dict]]:
        key, fields = None, {}
        with tarfile.open(tar_path, mode="r|*") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                where = f"{tar_path}, member {member.name}"
                try:
                    inside(Path(tar_path.name), member.name, where)
                except BadItem as exc:
                    yield where, exc
                    continue
                directory, _, base = member.name.rpartition("/")
                stem, dot, extension = base.partition(".")
                if not dot:
                    continue
                if f"{directory}/{stem}" != key and key is not None:
                    yield f"{tar_path}, key {key}", fields
                    fields = {}
                key = f"{directory}/{stem}"
                fields[extension.lower()] = archive.extractfile(member).read()
        if key is not None:
            yield f"{tar_path}, key {key}", fields

    def records():
        for tar_path in tars:
            try:
                yield from samples(tar_path)
            except tarfile.TarError as exc:
                raise SpecError(f"{tar_path}: not a readable tar archive ({exc})") from None

    first = next((fields for _, fields in records() if not isinstance(fields, BadItem)), {})
    found = [(name, _kind_of_extension(name)) for name in first]
    return Source(kind="webdataset", fields=[(n, k) for n, k in found if k is not None], records=records)


def _hf(name: str, options: dict) -> Source:
    try:
        import datasets
    except ImportError:
        raise SpecError("the hf source needs Hugging Face datasets: pip install 'momkit[datasets]'") from None
    path = Path(name)
    split = options.get("split") or "train"
    try:
        if path.exists():
            files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in HF_FILES)
            builders = {HF_FILES.get(p.suffix) for p in files}
            if not files or None in builders or len(builders) > 1:
                raise SpecError(f"{path}: give files of one of the types {', '.join(HF_FILES)} (or a folder of "
                                f"them), not {sorted({p.suffix for p in files}) or 'an empty folder'}")
            data = datasets.load_dataset(builders.pop(), data_files=[str(p) for p in files], split=split,
                                         streaming=True)
        else:
            data = datasets.load_dataset(name, split=split, streaming=True)
    except (FileNotFoundError, ValueError, datasets.exceptions.DatasetNotFoundError) as exc:
        raise SpecError(f"cannot open dataset {name!r}, split {split!r}: {exc}") from None
    features = data.features or {}
    for column, feature in features.items():
        if isinstance(feature, (datasets.Image, datasets.Audio)):
            data = data.cast_column(column, type(feature)(decode=False))
    kinds = {column: ("image" if isinstance(f, datasets.Image) else "audio" if isinstance(f, datasets.Audio) else
                      "text" if getattr(f, "dtype", None) in ("string", "large_string") else None)
             for column, f in features.items()}

    def records():
        for row_number, row in enumerate(data):
            yield f"{name}, row {row_number}", row

    return Source(kind="hf", fields=[(c, k) for c, k in kinds.items() if k is not None], records=records)


def guess(path: Path) -> str:
    """The source of an input when ``--source`` is not given (see the module docstring)."""
    if path.is_dir():
        if (path / "captions.jsonl").is_file():
            return "captions"
        if (path / "transcripts.jsonl").is_file() or any(path.glob("*.wav")):
            return "audio"
        if any(path.glob("*.tar")):
            return "webdataset"
        if any(p.suffix in (".parquet", ".arrow") for p in path.iterdir()):
            return "hf"
        return "text"
    suffix = path.suffix.lower()
    guesses = {".jsonl": "jsonl", ".json": "coco", ".tar": "webdataset", ".parquet": "hf", ".arrow": "hf",
               ".csv": "hf"}
    if suffix in guesses:
        return guesses[suffix]
    if path.is_file():
        return "text"
    raise SpecError(f"{path} does not exist; for a Hugging Face hub dataset give --source hf")


def open_source(kind: str | None, input_path: str, options: dict) -> Source:
    """The source ``kind`` (guessed from the input when ``None``) opened on ``input_path``."""
    path = Path(input_path)
    kind = kind or guess(path)
    if kind not in SOURCES:
        raise SpecError(f"unknown source {kind!r}; valid sources: {', '.join(SOURCES)}")
    if kind == "hf":
        return _hf(input_path, options)
    if not path.exists():
        raise SpecError(f"{path} does not exist")
    folder = {"captions": _captions, "audio": _audio}
    if kind in folder and not path.is_dir():
        raise SpecError(f"source {kind} reads a folder; {path} is a file")
    opener = {"jsonl": _jsonl, "text": _text, "coco": _coco, "webdataset": _webdataset, **folder}[kind]
    return opener(path, options)


def _bytes_of(value: Any, where: str) -> bytes:
    if isinstance(value, _Lazy):
        return value.read()
    if isinstance(value, bytes):
        return value
    if isinstance(value, dict) and value.get("bytes") is not None:
        return value["bytes"]
    if isinstance(value, dict) and value.get("path"):
        try:
            return Path(value["path"]).read_bytes()
        except OSError as exc:
            raise BadItem(f"{where}: cannot read {value['path']} ({exc.strerror or exc})") from None
    raise BadItem(f"{where}: expected a file, bytes or an image, got {type(value).__name__}")


def load_text(value: Any, where: str) -> str:
    if isinstance(value, (bytes, _Lazy)):
        try:
            value = _bytes_of(value, where).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadItem(f"{where}: text is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    if not isinstance(value, str):
        raise BadItem(f"{where}: expected text, got {type(value).__name__}")
    if not value.strip():
        raise BadItem(f"{where}: empty text")
    return value


def load_image(value: Any, where: str) -> Image.Image:
    if isinstance(value, Image.Image):
        image = value
    else:
        try:
            image = Image.open(io.BytesIO(_bytes_of(value, where)))
        except (OSError, Image.DecompressionBombError, ValueError) as exc:
            raise BadItem(f"{where}: not a readable image ({exc})") from None
    try:
        return image.convert("RGB")
    except (OSError, ValueError) as exc:
        raise BadItem(f"{where}: not a readable image ({exc})") from None


def load_audio(value: Any, where: str) -> tuple[np.ndarray, int]:
    if isinstance(value, dict) and value.get("array") is not None:
        return np.asarray(value["array"], dtype=np.float64), int(value["sampling_rate"])
    data = _bytes_of(value, where)
    try:
        with wave.open(io.BytesIO(data)) as clip:
            width, channels, rate = clip.getsampwidth(), clip.getnchannels(), clip.getframerate()
            frames = clip.readframes(clip.getnframes())
    except (wave.Error, EOFError) as exc:
        raise BadItem(f"{where}: not a readable PCM WAV file ({exc})") from None
    if width not in (1, 2, 4):
        raise BadItem(f"{where}: WAV samples of {width} bytes; readable: 1, 2 or 4 (PCM)")
    dtype = {1: np.uint8, 2: np.int16, 4: np.int32}[width]
    samples = np.frombuffer(frames, dtype=dtype).astype(np.float64)
    if width == 1:
        samples -= 128
    samples /= 2.0 ** (8 * width - 1)
    if not len(samples):
        raise BadItem(f"{where}: empty audio")
    return samples.reshape(-1, channels).mean(1), rate


LOADERS = {"text": load_text, "image": load_image, "audio": load_audio}
"""How a raw field value becomes what an encoder of each input reads."""
