"""``momkit convert`` from raw data, as a user runs it: image-caption folders, COCO annotations, audio folders,
WebDataset shards, parquet files and text folders, through each modality's encoder, then training and sampling.
Every input is built here, in a temporary directory; nothing is downloaded."""

import importlib
import io
import json
import math
import tarfile
import wave
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from momkit.cli import main
from momkit.plugins.data import jsonl
from momkit.plugins.data.convert import convert
from momkit.spec import ModelSpec

convert_module = importlib.import_module("momkit.plugins.data.convert")
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}
CAPTIONS = [f"a {colour} {shape}" for shape in ("square", "disc", "bar") for colour in COLOURS]


def draw(caption: str, size: int = 20) -> Image.Image:
    """A picture of ``caption``: its colour, in its shape, on grey (not square, so the crop matters)."""
    pixels = np.full((size, size + 4, 3), 128, dtype=np.uint8)
    colour = next(c for name, c in COLOURS.items() if name in caption)
    yy, xx = np.mgrid[:size, :size + 4]
    shape = {"square": (abs(yy - 10) < 6) & (abs(xx - 12) < 6), "disc": (yy - 10) ** 2 + (xx - 12) ** 2 < 36,
             "bar": abs(yy - 10) < 2}[caption.split()[-1]]
    pixels[shape] = colour
    return Image.fromarray(pixels)


@pytest.fixture
def captions(tmp_path) -> Path:
    folder = tmp_path / "pictures"
    (folder / "img").mkdir(parents=True)
    lines = []
    for k, caption in enumerate(CAPTIONS):
        draw(caption).save(folder / "img" / f"{k}.png")
        lines.append({"image": f"img/{k}.png", "caption": caption})
    (folder / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    lines.insert(5, {"image": "img/broken.png", "caption": "a broken picture"})
    (folder / "captions.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return folder


def write_spec(path: Path, modalities: list, shards: Path, **train) -> Path:
    spec = {"name": "converted", "modalities": modalities,
            "backbone": {"kind": "mamba", "d_model": 16, "n_layers": 1, "d_state": 4},
            "routing": {"specific": "mom"}, "scan_backend": "reference",
            "data": {"kind": "jsonl", "shards": str(shards), "eval_fraction": 0.25},
            "train": {"steps": 2, "batch_size": 2, "seq_len": 48, "eval_every": 2, "eval_batches": 1,
                      "checkpoint_every": 2, "device": "cpu", "warmup_steps": 0, **train}}
    path.write_text(yaml.safe_dump(spec))
    return path


VQ = {"kind": "image", "vocab_size": 16, "encoder": {"kind": "vq", "codes": 16, "image_size": 16,
                                                      "patch_size": 4, "fit_items": 8, "iterations": 4}}


def read_shards(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_image_captions_to_vq_tokens_then_train_and_sample(captions, tmp_path, capsys):
    shards = tmp_path / "shards"
    spec = write_spec(tmp_path / "spec.yaml", [{"kind": "text", "encoder": "bytes"}, VQ], shards)
    assert main(["convert", str(spec), str(captions), str(shards)]) == 2
    err = capsys.readouterr().err
    assert "captions.jsonl, line 6, image: not a readable image" in err and "--on-error skip" in err
    assert main(["convert", str(spec), str(captions), str(shards), "--on-error", "skip"]) == 0
    assert f"{len(CAPTIONS)} documents" in capsys.readouterr().out
    header = json.loads((shards / "header.json").read_text())
    assert header["skipped"] == {"not a readable image": 1} and header["reader"] == "captions"
    assert header["encoders"]["image"]["size"] == 16 and header["arrays"]["tokens"]["dtype"] == "uint8"
    skipped = [json.loads(line) for line in (shards / "skipped.jsonl").read_text().splitlines()]
    assert len(skipped) == 1 and skipped[0]["item"].endswith("captions.jsonl, line 6")
    documents = jsonl.open_shards(shards, ModelSpec.model_validate(yaml.safe_load(spec.read_text())).modalities)
    first = slice(int(documents.offsets[0]), int(documents.offsets[1]))
    assert bytes(documents.tokens[first][documents.modality[first] == 0]) == CAPTIONS[0].encode()
    assert (documents.modality[first] == 1).sum() == 16
    codec = jsonl.codecs(shards, documents and ModelSpec.model_validate(yaml.safe_load(spec.read_text()))
                         .modalities)["image"]
    picture = np.asarray(draw(CAPTIONS[0]).crop((2, 0, 22, 20)).resize((16, 16), Image.Resampling.BICUBIC))
    redrawn = codec.decode(np.stack(codec.encode([draw(CAPTIONS[0])])))[0]
    assert redrawn.shape == (16, 16, 3) and np.abs(redrawn.astype(int) - picture).mean() < 40
    assert main(["validate", str(spec)]) == 0
    run = tmp_path / "run"
    assert main(["train", str(spec), "--out", str(run)]) == 0
    assert main(["sample", str(run), "--prompt", "a red disc", "--steps", "1"]) == 0
    png = Image.open(run / "samples" / "samples.png")
    assert png.size[0] >= 16 and png.size[1] >= 16


def test_validate_catches_a_spec_that_does_not_fit_the_shards(captions, tmp_path, capsys):
    shards = tmp_path / "shards"
    spec = write_spec(tmp_path / "spec.yaml", [{"kind": "text", "encoder": "bytes"}, VQ], shards)
    convert(str(captions), shards, ModelSpec.model_validate(yaml.safe_load(spec.read_text())).modalities,
            on_error="skip", progress=False)
    other = {**VQ, "encoder": {**VQ["encoder"], "iterations": 5}}
    write_spec(tmp_path / "other.yaml", [{"kind": "text", "encoder": "bytes"}, other], shards)
    assert main(["validate", str(tmp_path / "other.yaml")]) == 2
    assert "was encoded by" in capsys.readouterr().err
    small = {**VQ, "vocab_size": 8, "encoder": {**VQ["encoder"], "codes": 8}}
    write_spec(tmp_path / "small.yaml", [{"kind": "text", "encoder": "bytes"}, small], shards)
    assert main(["validate", str(tmp_path / "small.yaml")]) == 2
    assert "beyond the spec's vocab_size 8" in capsys.readouterr().err


def tiny_autoencoder(directory: Path, kind: str) -> Path:
    diffusers = pytest.importorskip("diffusers")
    import torch
    torch.manual_seed(0)
    shared = dict(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                  layers_per_block=1)
    model = (diffusers.AutoencoderKL(**shared) if kind == "vae" else
             diffusers.VQModel(**shared, num_vq_embeddings=32, vq_embed_dim=4))
    model.save_pretrained(directory)
    return directory


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["vae", "vqmodel"])
def test_image_captions_through_a_diffusers_autoencoder(kind, captions, tmp_path, capsys):
    model = tiny_autoencoder(tmp_path / kind, kind)
    image = ({"kind": "image", "latent_dim": 4, "encoder": {"kind": "vae", "path": str(model), "image_size": 16}}
             if kind == "vae" else
             {"kind": "image", "vocab_size": 32, "encoder": {"kind": "vqmodel", "path": str(model), "image_size": 16}})
    shards = tmp_path / "shards"
    spec = write_spec(tmp_path / "spec.yaml", [{"kind": "text", "encoder": "bytes"}, image], shards)
    assert main(["convert", str(spec), str(captions), str(shards), "--on-error", "skip", "--batch-size", "5"]) == 0
    header = json.loads((shards / "header.json").read_text())
    assert header["encoders"]["image"]["size"] == (4 if kind == "vae" else 32)
    assert header["modalities"][1]["positions"] == 64 * len(CAPTIONS)
    run = tmp_path / "run"
    model.rename(tmp_path / "away")
    assert main(["train", str(spec), "--out", str(run)]) == 0, "training needs only the shards, not the model"
    (tmp_path / "away").rename(model)
    assert main(["sample", str(run), "--prompt", "a blue bar", "--steps", "2"]) == 0
    assert min(Image.open(run / "samples" / "samples.png").size) >= 16


def test_an_interrupted_conversion_resumes_to_identical_shards(captions, tmp_path, monkeypatch):
    modalities = ModelSpec.model_validate(yaml.safe_load(write_spec(
        tmp_path / "spec.yaml", [{"kind": "text", "encoder": "bytes"}, VQ], tmp_path).read_text())).modalities
    whole = convert(str(captions), tmp_path / "whole", modalities, on_error="skip", batch_size=2, progress=False)
    commits, real = [], convert_module._Writer.commit

    def interrupted(self, records):
        commits.append(records)
        if len(commits) == 4:
            raise KeyboardInterrupt
        real(self, records)

    monkeypatch.setattr(convert_module._Writer, "commit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert(str(captions), tmp_path / "resumed", modalities, on_error="skip", batch_size=2, progress=False)
    monkeypatch.setattr(convert_module._Writer, "commit", real)
    assert (tmp_path / ".resumed.partial" / "progress.json").is_file() and not (tmp_path / "resumed").exists()
    resumed = convert(str(captions), tmp_path / "resumed", modalities, on_error="skip", batch_size=3,
                      progress=False)
    expected, got = read_shards(whole), read_shards(resumed)
    assert got.keys() == expected.keys()
    for name in expected:
        if name != "header.json":
            assert got[name] == expected[name], name
    drop = ("source",)
    assert ({k: v for k, v in json.loads(got["header.json"]).items() if k not in drop}
            == {k: v for k, v in json.loads(expected["header.json"]).items() if k not in drop})


def test_paths_outside_the_input_are_refused(captions, tmp_path, capsys):
    (tmp_path / "outside.png").write_bytes((captions / "img" / "0.png").read_bytes())
    with (captions / "captions.jsonl").open("a") as f:
        f.write(json.dumps({"image": "../outside.png", "caption": "escape"}) + "\n")
    spec = write_spec(tmp_path / "spec.yaml", [{"kind": "text", "encoder": "bytes"}, VQ], tmp_path / "s")
    assert main(["convert", str(spec), str(captions), str(tmp_path / "s"), "--on-error", "skip"]) == 0
    skipped = (tmp_path / "s" / "skipped.jsonl").read_text()
    assert "'../outside.png' leaves" in skipped
    tar = tmp_path / "evil.tar"
    with tarfile.open(tar, "w") as archive:
        for name, data in [("../evil.txt", b"climbing out"), ("0001.txt", b"fine")]:
            member = tarfile.TarInfo(name)
            member.size = len(data)
            archive.addfile(member, io.BytesIO(data))
    text_spec = write_spec(tmp_path / "text.yaml", [{"kind": "text", "encoder": "bytes"}], tmp_path / "t")
    assert main(["convert", str(text_spec), str(tar), str(tmp_path / "t")]) == 2
    assert "member ../evil.txt: path '../evil.txt' leaves" in capsys.readouterr().err
    assert not (tmp_path.parent / "evil.txt").exists()


def test_webdataset_shards_and_coco_annotations(tmp_path):
    tar = tmp_path / "shard-000.tar"
    with tarfile.open(tar, "w") as archive:
        for k, caption in enumerate(CAPTIONS[:6]):
            png = io.BytesIO()
            draw(caption).save(png, format="PNG")
            for extension, data in (("txt", caption.encode()), ("png", png.getvalue())):
                member = tarfile.TarInfo(f"sample{k:04d}.{extension}")
                member.size = len(data)
                archive.addfile(member, io.BytesIO(data))
    modalities = ModelSpec.model_validate(yaml.safe_load(write_spec(
        tmp_path / "spec.yaml", [{"kind": "text", "encoder": "bytes"}, VQ], tmp_path).read_text())).modalities
    out = convert(str(tar), tmp_path / "wds", modalities, progress=False)
    header = json.loads((out / "header.json").read_text())
    assert header["reader"] == "webdataset" and header["documents"] == 6
    assert header["positions"] == sum(len(c) for c in CAPTIONS[:6]) + 6 * 16
    images = tmp_path / "coco" / "train"
    images.mkdir(parents=True)
    for k, caption in enumerate(CAPTIONS[:4]):
        draw(caption).save(images / f"{k:012d}.jpg")
    annotations = {"images": [{"id": 10 + k, "file_name": f"{k:012d}.jpg"} for k in range(4)],
                   "annotations": [{"image_id": 10 + k % 4, "caption": f"{CAPTIONS[k % 4]} ({k})"} for k in range(8)]}
    (tmp_path / "coco" / "captions_train.json").write_text(json.dumps(annotations))
    out = convert(str(tmp_path / "coco" / "captions_train.json"), tmp_path / "coco-shards", modalities,
                  images=str(images), progress=False)
    assert json.loads((out / "header.json").read_text())["documents"] == 8


def write_wav(path: Path, frequency: float, seconds: float = 0.3, rate: int = 8000) -> None:
    t = np.arange(int(seconds * rate)) / rate
    samples = (0.5 * np.sin(2 * np.pi * frequency * t) * 32767).astype(np.int16)
    with wave.open(str(path), "wb") as clip:
        clip.setnchannels(1)
        clip.setsampwidth(2)
        clip.setframerate(rate)
        clip.writeframes(samples.tobytes())


@pytest.mark.parametrize("speech", [
    {"kind": "speech", "vocab_size": 8, "encoder": {"kind": "units", "codes": 8, "n_mels": 16, "fit_items": 4}},
    {"kind": "speech", "latent_dim": 16, "encoder": {"kind": "logmel", "n_mels": 16}},
], ids=["units", "logmel"])
def test_audio_folder_with_transcripts(speech, tmp_path):
    folder = tmp_path / "audio"
    folder.mkdir()
    for k, word in enumerate(["low", "middle", "high", "higher", "highest"]):
        write_wav(folder / f"{k}.wav", 200 + 300 * k)
        (folder / f"{k}.txt").write_text(word)
    modalities = ModelSpec.model_validate(yaml.safe_load(write_spec(
        tmp_path / "spec.yaml", [{"kind": "text", "encoder": "bytes"}, speech], tmp_path).read_text())).modalities
    out = convert(str(folder), tmp_path / "shards", modalities, progress=False, device="cpu")
    header = json.loads((out / "header.json").read_text())
    frames = (4800 - 400) // 320 + 1
    assert header["reader"] == "audio" and header["modalities"][1]["positions"] == 5 * frames
    documents = jsonl.open_shards(out, modalities)
    if "latent_dim" in speech:
        low, high = documents.latents[1][:frames], documents.latents[1][-frames:]
        assert np.argmax(low.mean(0)) < np.argmax(high.mean(0))
    else:
        units = np.asarray(documents.tokens)[np.asarray(documents.modality) == 1]
        assert len(set(units[:frames])) < len(set(units))


@pytest.mark.slow
def test_parquet_dataset_converts_and_trains(tmp_path):
    datasets = pytest.importorskip("datasets")
    for k, caption in enumerate(CAPTIONS):
        draw(caption).save(tmp_path / f"{k}.png")
    table = datasets.Dataset.from_dict({"caption": CAPTIONS, "picture": [str(tmp_path / f"{k}.png")
                                                                         for k in range(len(CAPTIONS))],
                                        "id": list(range(len(CAPTIONS)))})
    table.cast_column("picture", datasets.Image()).to_parquet(tmp_path / "train.parquet")
    spec = write_spec(tmp_path / "spec.yaml", [{"kind": "text", "encoder": "bytes"}, VQ], tmp_path / "shards")
    assert main(["convert", str(spec), str(tmp_path / "train.parquet"), str(tmp_path / "shards"),
                 "--columns", "picture=image,caption=text"]) == 0
    documents = jsonl.open_shards(tmp_path / "shards", ModelSpec.model_validate(
        yaml.safe_load(spec.read_text())).modalities)
    assert documents.num_documents == len(CAPTIONS) and np.asarray(documents.modality)[0] == 1
    assert main(["train", str(spec), "--out", str(tmp_path / "run")]) == 0


def test_text_folder_through_a_trained_bpe_gives_bits_per_byte(tmp_path):
    pytest.importorskip("tokenizers")
    folder = tmp_path / "corpus"
    folder.mkdir()
    texts = [f"def f{k}(x):\n    return x * {k} + {'é' * (k % 3)}\n" * 8 for k in range(20)]
    for k, text in enumerate(texts):
        (folder / f"{k:02d}.py").write_text(text)
    text = {"kind": "text", "vocab_size": 300, "encoder": {"kind": "hf_tokenizer", "train_size": 300}}
    spec = write_spec(tmp_path / "spec.yaml", [text], tmp_path / "shards", seq_len=32)
    modalities = ModelSpec.model_validate(yaml.safe_load(spec.read_text())).modalities
    out = convert(str(folder), tmp_path / "shards", modalities, glob="*.py", progress=False)
    codec = jsonl.codecs(out, modalities)["text"]
    documents = jsonl.open_shards(out, modalities)
    table = codec.token_bytes()
    for k in (0, 7):
        ids = np.asarray(documents.tokens[int(documents.offsets[k]):int(documents.offsets[k + 1])], dtype=np.int64)
        assert table[ids].sum() == len(texts[k].encode()) and codec.decode(ids) == texts[k]
    assert len(ids) < len(texts[7].encode())
    trained = tmp_path / "tokenizer.json"
    trained.write_bytes((out / "encoders" / "text" / "tokenizer.json").read_bytes())
    given = {**text, "encoder": {"kind": "hf_tokenizer", "path": str(trained)}}
    again = convert(str(folder), tmp_path / "again", ModelSpec.model_validate(yaml.safe_load(write_spec(
        tmp_path / "given.yaml", [given], tmp_path / "again").read_text())).modalities, glob="*.py", progress=False)
    trained.unlink()
    assert (again / "tokens.bin").read_bytes() == (out / "tokens.bin").read_bytes()
    assert jsonl.codecs(again, modalities)["text"].decode(ids) == texts[7]
    assert main(["train", str(spec), "--out", str(tmp_path / "run")]) == 0
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["split"] == "eval" and math.isfinite(last["bpb/text"]) and last["bpb/text"] > 0


def test_encoder_settings_are_checked_in_the_spec(tmp_path, capsys):
    for modality, message in [
        ({"kind": "text", "vocab_size": 100, "encoder": "bytes"}, "valid vocab_size: at least 256"),
        ({"kind": "image", "encoder": {"kind": "patches"}}, "is discrete but its encoder 'patches' gives latent"),
        ({"kind": "text", "encoder": "bpe"}, "unknown encoder 'bpe'; registered: bytes, hf_tokenizer"),
        ({"kind": "text", "encoder": {"kind": "hf_tokenizer"}}, "needs exactly one of `path`"),
    ]:
        spec = write_spec(tmp_path / "spec.yaml", [modality], tmp_path / "shards")
        assert main(["validate", str(spec)]) == 2
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("library, extra, modality, source", [
    ("tokenizers", "tokenizers", {"kind": "text", "vocab_size": 300,
                                  "encoder": {"kind": "hf_tokenizer", "train_size": 300}}, None),
    ("diffusers", "diffusers", {"kind": "image", "latent_dim": 4, "encoder": {"kind": "vae", "path": "x"}}, None),
    ("datasets", "datasets", {"kind": "text", "encoder": "bytes"}, "hf"),
])
def test_a_missing_library_names_its_extra(library, extra, modality, source, captions, tmp_path, monkeypatch,
                                           capsys):
    monkeypatch.setitem(__import__("sys").modules, library, None)
    spec = write_spec(tmp_path / "spec.yaml", [modality], tmp_path / "shards")
    field = "image" if modality["kind"] == "image" else "text"
    argv = ["convert", str(spec), str(captions), str(tmp_path / "shards"), "--columns", f"{field}={modality['kind']}"]
    assert main(argv + (["--source", source] if source else [])) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"pip install 'momkit[{extra}]'" in err


def test_bad_convert_options_exit_2_with_one_line(captions, tmp_path, capsys):
    spec = write_spec(tmp_path / "spec.yaml", [{"kind": "text", "encoder": "bytes"}, VQ], tmp_path / "shards")
    for options, message in [(["--device", "gpu"], "device 'gpu' is not a torch device; valid: auto, cpu"),
                             (["--source", "zip"], "unknown source 'zip'; valid sources: jsonl, text, hf"),
                             (["--columns", "caption"], "--columns item 'caption' is not FIELD=MODALITY")]:
        assert main(["convert", str(spec), str(captions), str(tmp_path / "shards"), *options]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
