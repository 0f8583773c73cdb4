"""The built-in datasets: batches a model accepts, random access, packing, splits, caches, files and errors."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import momkit
from momkit.plugins.data import convert, kmeans, shapes
from momkit.plugins.data.packing import Piece
from momkit.registry import get_registry
from momkit.spec import ModelSpec

TEXT_IMAGE = ["text", "image"]
TEXT_LATENT_SPEECH = ["text", {"kind": "image", "name": "image_latent", "latent_dim": 8}, "speech"]
SEQ_LEN = 64


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One codebook cache for the module, so that each codebook is fitted once."""
    return str(tmp_path_factory.mktemp("cache"))


def small_shapes(cache, **changes):
    return {"kind": "shapes", "cache_dir": cache, "codebook_documents": 128, "eval_documents": 64, **changes}


def make_spec(modalities, data, **train):
    return ModelSpec.model_validate({
        "name": "data-test", "modalities": modalities, "data": data, "scan_backend": "reference",
        "backbone": {"kind": "mamba", "d_model": 16, "n_layers": 1, "d_state": 4},
        "train": {"seq_len": SEQ_LEN, **train}})


def source(spec, split="train", seq_len=SEQ_LEN):
    data = spec.dataset()
    return get_registry().get("dataset", data.kind).build(data, spec.modalities, split, seq_len)


def random_documents(modalities, count, seed):
    """``count`` JSON-lines documents of random segments of the spec's ``modalities``."""
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(count):
        segments = []
        for _ in range(rng.integers(1, 4)):
            m = modalities[rng.integers(len(modalities))]
            n = int(rng.integers(1, 12))
            if m.discrete:
                segments.append({"modality": m.name, "tokens": rng.integers(m.vocab_size, size=n).tolist()})
            else:
                segments.append({"modality": m.name, "latents": rng.standard_normal((n, m.latent_dim)).tolist()})
        lines.append(json.dumps({"segments": segments}))
    return lines


def jsonl_file(tmp_path, modalities, count=300, seed=0):
    spec = make_spec(modalities, None)
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(random_documents(spec.modalities, count, seed)) + "\n")
    return path


def data_config(kind, modalities, cache, tmp_path):
    if kind == "shapes":
        return small_shapes(cache)
    if kind == "jsonl":
        return {"kind": "jsonl", "path": str(jsonl_file(tmp_path, modalities))}
    return {"kind": "synthetic"}


def assert_equal(a, b):
    assert torch.equal(a.modality, b.modality) and torch.equal(a.tokens, b.tokens)
    assert torch.equal(a.seq_idx, b.seq_idx) and a.latents.keys() == b.latents.keys()
    assert all(torch.equal(a.latents[k], b.latents[k]) for k in a.latents)


@pytest.mark.parametrize("modalities", [TEXT_IMAGE, TEXT_LATENT_SPEECH], ids=["text-image", "text-latent-speech"])
@pytest.mark.parametrize("kind", ["shapes", "jsonl", "synthetic"])
def test_batches_fit_the_model_and_are_reproducible(kind, modalities, cache, tmp_path):
    spec = make_spec(modalities, data_config(kind, modalities, cache, tmp_path))
    model = momkit.build_model(spec)
    for split in ("train", "eval"):
        batches = [source(spec, split).batch(i, 3) for i in range(3)]
        for batch in batches:
            model.check(batch)
            assert batch.modality.shape == batch.tokens.shape == batch.seq_idx.shape == (3, SEQ_LEN)
            assert batch.tokens.dtype == batch.seq_idx.dtype == torch.int64
            steps = batch.seq_idx.diff(dim=1)
            assert (batch.seq_idx[:, 0] == 0).all() and ((steps == 0) | (steps == 1)).all()
            for i, m in enumerate(spec.modalities):
                if not m.discrete:
                    latents = batch.latents[m.name]
                    assert latents.dtype == torch.float32 and latents.shape == (3, SEQ_LEN, m.latent_dim)
                    assert (batch.tokens[batch.modality == i] == 0).all()
                    assert (latents[batch.modality != i] == 0).all() and latents[batch.modality == i].abs().sum() > 0
        assert not torch.equal(batches[0].tokens, batches[1].tokens)
        fresh = source(spec, split)
        for i in (2, 0, 1):
            assert_equal(fresh.batch(i, 3), batches[i])
    if kind == "shapes":
        assert set(source(spec).batch(0, 4).modality.unique().tolist()) == set(range(len(modalities)))


def documents_of(batch):
    """The documents of each row of a batch, each a tuple of ``(modality, token)``; a row's last may be cut."""
    rows = []
    for modality, tokens, seq_idx in zip(batch.modality.tolist(), batch.tokens.tolist(), batch.seq_idx.tolist()):
        rows.append([tuple((m, t) for m, t, s in zip(modality, tokens, seq_idx) if s == d)
                     for d in range(seq_idx[-1] + 1)])
    return rows


def test_shapes_documents_are_whole_and_in_order(cache):
    spec = make_spec(TEXT_IMAGE, small_shapes(cache, image_first=0.5))
    orders = set()
    for row in documents_of(source(spec, seq_len=256).batch(5, 4)):
        assert len(row) > 2
        for document in row[:-1]:
            modality = [m for m, _ in document]
            caption = bytes(t for m, t in document if m == 0).decode()
            assert caption.startswith("a ") and caption.endswith(".")
            assert modality in ([0] * len(caption) + [1] * 16, [1] * 16 + [0] * len(caption))
            orders.add(modality[0])
    assert orders == {0, 1}


def test_shapes_train_and_eval_share_no_document(cache):
    config = shapes.ShapesConfig.model_validate(small_shapes(cache))
    train = {shapes.draw_scene(config, "train", i).caption for i in range(3000)}
    held_out = {shapes.draw_scene(config, "eval", i).caption for i in range(config.eval_documents)}
    assert len(held_out) > 50 and not train & held_out
    spec = make_spec(TEXT_LATENT_SPEECH, small_shapes(cache))

    def whole(store, count):
        return {(d.modality.tobytes(), d.tokens.tobytes(), d.latents[1].tobytes())
                for d in whole_documents(store, range(count))}

    assert not whole(source(spec).store, 1000) & whole(source(spec, "eval").store, config.eval_documents)


def whole_documents(store, docs):
    return store.read([Piece(d, 0, int(store.length([d])[0])) for d in docs])


def test_shapes_finite_split_uses_every_document_once_per_epoch(cache):
    train = source(make_spec(TEXT_IMAGE, small_shapes(cache, num_documents=40)))
    stream = np.concatenate([d.tokens for d in whole_documents(train.store, range(40))])
    rows, n = len(stream) // SEQ_LEN, train.num_batches(4)
    assert n == -(-rows // 4)
    tokens = torch.cat([train.batch(i, 4).tokens for i in range(n)]).flatten()
    assert tokens[:rows * SEQ_LEN].tolist() == stream[:rows * SEQ_LEN].tolist()
    assert_equal(train.batch(n, 4), train.batch(0, 4))


def test_shapes_tokens_do_not_depend_on_threads_or_batching(cache):
    spec = make_spec(TEXT_IMAGE + ["speech"], small_shapes(cache))
    together = source(spec).batch(0, 4)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        apart = [source(spec).batch(i, 2) for i in (0, 1)]
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(together.tokens, torch.cat([b.tokens for b in apart]))


def test_shapes_codebooks_are_fitted_once_and_reused(tmp_path, monkeypatch):
    spec = make_spec(TEXT_LATENT_SPEECH + [{"kind": "image", "name": "image_vq", "vocab_size": 64}],
                     small_shapes(str(tmp_path), streams={"image": "image_vq"}))
    first = source(spec).batch(0, 2)
    files = sorted((tmp_path / "shapes").iterdir())
    assert [f.name.split("-")[:2] for f in files] == [["image", "codebook"], ["speech", "codebook"]]
    written = [f.stat().st_mtime_ns for f in files]

    def refit(*args):
        raise AssertionError("a cached codebook was fitted again")

    monkeypatch.setattr(kmeans, "fit", refit)
    assert_equal(source(spec).batch(0, 2), first)
    assert [f.stat().st_mtime_ns for f in files] == written
    monkeypatch.undo()
    other = make_spec(TEXT_IMAGE, small_shapes(str(tmp_path), image_size=8))
    source(other).batch(0, 1)
    assert len(list((tmp_path / "shapes").iterdir())) == 3


def test_shapes_cache_dir_defaults_to_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MOMKIT_CACHE", str(tmp_path))
    spec = make_spec(["speech"], {"kind": "shapes", "codebook_documents": 16})
    source(spec).batch(0, 1)
    assert [f.name.split("-")[0] for f in (tmp_path / "shapes").iterdir()] == ["speech"]


def test_shapes_trains(cache, tmp_path):
    from momkit.train import train

    spec = make_spec(TEXT_IMAGE, small_shapes(cache), steps=30, batch_size=4, lr=1e-2, warmup_steps=3,
                     eval_every=30, eval_batches=1, checkpoint_every=30, device="cpu")
    train(spec, tmp_path, progress=False)
    losses = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    text = [r["loss/text"] for r in losses if r["split"] == "train"]
    image = [r["loss/image"] for r in losses if r["split"] == "train" and "loss/image" in r]
    assert np.mean(text[-5:]) < np.mean(text[:5]) - 1.0
    assert np.mean(image[-5:]) < np.mean(image[:5])


@pytest.mark.parametrize("modalities, message", [
    ([{"kind": "text", "vocab_size": 128}, "image"], "vocab_size >= 256; modality 'text' has vocab_size 128"),
    (["text", {"kind": "speech", "latent_dim": 4}], "speech stream is discrete; modality 'speech' is continuous"),
    (["text", "image", {"kind": "image", "name": "image_latent", "latent_dim": 8}],
     "2 modalities of kind 'image' \\(image, image_latent\\); say which one .* streams: \\{image: image\\}"),
    ([{"kind": "image", "latent_dim": 64}], "latent_dim 64, more than the 48 values of a 4x4 RGB patch"),
])
def test_shapes_rejects_modalities_it_cannot_fill(modalities, message, cache):
    with pytest.raises(ValueError, match=message):
        source(make_spec(modalities, small_shapes(cache)))


def test_shapes_streams_choose_and_drop_modalities(cache):
    modalities = ["text", "image", {"kind": "image", "name": "image_latent", "latent_dim": 8}]
    spec = make_spec(modalities, small_shapes(cache, streams={"image": "image_latent", "text": None}))
    assert source(spec).batch(0, 2).modality.unique().tolist() == [2]
    with pytest.raises(ValueError, match="maps stream 'image' to 'picture', not a modality of the spec; its "
                                         "modalities: text, image, image_latent"):
        source(make_spec(modalities, small_shapes(cache, streams={"image": "picture"})))
    with pytest.raises(ValueError, match="not a stream of shapes; its streams: text, image, speech"):
        make_spec(modalities, small_shapes(cache, streams={"video": "image"}))
    with pytest.raises(ValueError, match="patch_size 5 does not divide image_size 16; its divisors: 1, 2, 4, 8, 16"):
        make_spec(modalities, small_shapes(cache, patch_size=5))


def test_jsonl_seq_idx_marks_documents(tmp_path):
    lengths = [5, 9, 3, 30, 7, 12, 2, 40, 6, 11, 8, 21]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"segments": [{"modality": "text", "tokens": [d] * n}]}) + "\n"
                            for d, n in enumerate(lengths)))
    spec = make_spec(TEXT_IMAGE, {"kind": "jsonl", "path": str(path), "eval_fraction": 0.2})
    train = source(spec, seq_len=16)
    stream = np.concatenate([[d] * n for d, n in enumerate(lengths[:-2])])
    rows = len(stream) // 16
    assert train.num_batches(2) == -(-rows // 2)
    for i in range(train.num_batches(2)):
        batch = train.batch(i, 2)
        for r in range(2):
            expected = stream[(i * 2 + r) % rows * 16:][:16]
            assert batch.tokens[r].tolist() == expected.tolist()
            starts = np.flatnonzero(np.diff(expected)) + 1
            assert (np.flatnonzero(batch.seq_idx[r].diff().numpy()) + 1).tolist() == starts.tolist()
    assert source(spec, "eval", seq_len=16).batch(0, 1).tokens[0].tolist() == [10] * 8 + [11] * 8


BAD_LINES = [
    ('{"segments": [{"modality": "text", "tokens": [1, 2]}', "line 2: not valid JSON"),
    ('{"parts": []}', "line 2, segments: missing"),
    ('{"segments": []}', "line 2, segments: must be a non-empty list"),
    ('{"segments": [{"modality": "video", "tokens": [1]}]}',
     "line 2, segments\\[0\\].modality: \"video\" is not a modality of the spec; its modalities: text, "
     "image_latent, speech"),
    ('{"segments": [{"modality": "text", "tokens": [1]}, {"modality": "speech", "tokens": [3, 512]}]}',
     "line 2, segments\\[1\\].tokens\\[1\\]: 512 is out of range for modality 'speech' \\(vocab_size 512\\): "
     "valid ids are 0..511"),
    ('{"segments": [{"modality": "text", "tokens": [1, 2.5]}]}', "line 2, segments\\[0\\].tokens\\[1\\]: 2.5 is not an "
                                                                 "integer token id"),
    ('{"segments": [{"modality": "image_latent", "latents": [[0, 0, 0, 0, 0, 0, 0, 0], [1, 2]]}]}',
     "line 2, segments\\[0\\].latents\\[1\\]: has width 2; modality 'image_latent' has latent_dim 8"),
    ('{"segments": [{"modality": "image_latent", "tokens": [1, 2]}]}',
     "line 2, segments\\[0\\].tokens: modality 'image_latent' is continuous \\(latent_dim 8\\): give `latents`"),
    ('{"segments": [{"modality": "text", "latents": [[1.0]]}]}',
     "line 2, segments\\[0\\].latents: modality 'text' is discrete \\(vocab_size 256\\): give `tokens`"),
    ('{"segments": [{"modality": "text", "token": [1]}]}', "line 2, segments\\[0\\]: unknown field\\(s\\) 'token'"),
    ('{"segments": [{"modality": "image_latent", "latents": [[0, 0, 0, NaN, 0, 0, 0, 0]]}]}',
     "line 2, segments\\[0\\].latents\\[0\\]\\[3\\]: nan is not a finite float32"),
    ('{"segments": [{"modality": "image_latent", "latents": [[0, 0, 0, "1", 0, 0, 0, 0]]}]}',
     "line 2, segments\\[0\\].latents\\[0\\]\\[3\\]: \"1\" is not a number"),
]


@pytest.mark.parametrize("line, message", BAD_LINES, ids=[m.split(":")[0][8:] or "json" for _, m in BAD_LINES])
def test_jsonl_bad_lines_name_the_line_and_field(line, message, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"segments": [{"modality": "text", "tokens": [1, 2, 3]}]}\n' + line + "\n")
    spec = make_spec(TEXT_LATENT_SPEECH, {"kind": "jsonl", "path": str(path)})
    with pytest.raises(ValueError, match=f"bad.jsonl, {message}"):
        source(spec)
    with pytest.raises(ValueError, match=f"bad.jsonl, {message}"):
        convert(path, tmp_path / "shards", spec.modalities, progress=False)
    assert not (tmp_path / "shards").exists() and (tmp_path / ".shards.partial").is_dir()


def test_jsonl_config_and_split_errors(tmp_path):
    with pytest.raises(ValueError, match="exactly one of `path`"):
        make_spec(TEXT_IMAGE, {"kind": "jsonl"})
    with pytest.raises(ValueError, match="does not exist"):
        source(make_spec(TEXT_IMAGE, {"kind": "jsonl", "path": str(tmp_path / "missing.jsonl")}))
    path = jsonl_file(tmp_path, TEXT_IMAGE, count=1)
    with pytest.raises(ValueError, match="holds 1 document\\(s\\): too few to hold out"):
        source(make_spec(TEXT_IMAGE, {"kind": "jsonl", "path": str(path)}))
    with pytest.raises(ValueError, match="fewer than one row of seq_len 1000"):
        source(make_spec(TEXT_IMAGE, {"kind": "jsonl", "path": str(jsonl_file(tmp_path, TEXT_IMAGE, count=5))}),
               seq_len=1000)


def test_shards_read_the_same_batches_as_the_jsonl_file(tmp_path):
    path = jsonl_file(tmp_path, TEXT_LATENT_SPEECH, count=80)
    eval_path = tmp_path / "eval.jsonl"
    eval_path.write_text("\n".join(random_documents(make_spec(TEXT_LATENT_SPEECH, None).modalities, 30, 1)))
    spec = make_spec(TEXT_LATENT_SPEECH, {"kind": "jsonl", "path": str(path)})
    out = convert(path, tmp_path / "shards", spec.modalities)
    convert(eval_path, tmp_path / "eval-shards", spec.modalities)
    header = json.loads((out / "header.json").read_text())
    assert header["documents"] == 80 and [m["name"] for m in header["modalities"]] == ["text", "image_latent",
                                                                                        "speech"]
    pairs = [({"path": str(path)}, {"shards": str(out)}),
             ({"path": str(path), "eval_path": str(eval_path)},
              {"shards": str(out), "eval_shards": str(tmp_path / "eval-shards")})]
    for from_file, from_shards in pairs:
        for split in ("train", "eval"):
            a = source(make_spec(TEXT_LATENT_SPEECH, {"kind": "jsonl", **from_file}), split)
            b = source(make_spec(TEXT_LATENT_SPEECH, {"kind": "jsonl", **from_shards}), split)
            assert isinstance(b.store.tokens, np.memmap) and a.num_batches(4) == b.num_batches(4)
            for i in range(a.num_batches(4)):
                assert_equal(a.batch(i, 4), b.batch(i, 4))
    reordered = make_spec([{"kind": "speech"}, {"kind": "image", "name": "image_latent", "latent_dim": 8}, "text",
                           "image"], {"kind": "jsonl", "shards": str(out)})
    a, b = source(reordered).batch(0, 2), source(spec).batch(0, 2)
    assert [[reordered.modalities[i].name for i in row] for row in a.modality.tolist()] == \
        [[spec.modalities[i].name for i in row] for row in b.modality.tolist()]
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.latents["image_latent"], b.latents["image_latent"])
    with pytest.raises(ValueError, match="is not an empty directory"):
        convert(path, out, spec.modalities)


@pytest.mark.parametrize("modalities, dtype", [
    (["text"], "uint8"), (TEXT_IMAGE, "uint16"), (["text", {"kind": "image", "vocab_size": 70000}], "uint32"),
    (TEXT_LATENT_SPEECH, "uint32"),
])
def test_shards_store_tokens_in_the_smallest_unsigned_type(modalities, dtype, tmp_path):
    path = jsonl_file(tmp_path, modalities, count=40)
    spec = make_spec(modalities, {"kind": "jsonl", "path": str(path)})
    out = convert(path, tmp_path / "shards", spec.modalities)
    header = json.loads((out / "header.json").read_text())
    assert header["version"] == 2 and header["arrays"]["tokens"]["dtype"] == dtype
    assert (out / "tokens.bin").stat().st_size == header["positions"] * np.dtype(dtype).itemsize
    a = source(spec)
    b = source(make_spec(modalities, {"kind": "jsonl", "shards": str(out)}))
    for i in range(3):
        assert_equal(a.batch(i, 2), b.batch(i, 2))


def test_version_1_shards_with_int64_tokens_are_still_read(tmp_path):
    path = jsonl_file(tmp_path, TEXT_LATENT_SPEECH, count=40)
    spec = make_spec(TEXT_LATENT_SPEECH, {"kind": "jsonl", "path": str(path)})
    out = convert(path, tmp_path / "shards", spec.modalities)
    header = json.loads((out / "header.json").read_text())
    tokens = np.fromfile(out / "tokens.bin", dtype=header["arrays"]["tokens"]["dtype"])
    tokens.astype(np.int64).tofile(out / "tokens.bin")
    header["version"], header["arrays"]["tokens"]["dtype"] = 1, "int64"
    (out / "header.json").write_text(json.dumps(header))
    a, b = source(spec), source(make_spec(TEXT_LATENT_SPEECH, {"kind": "jsonl", "shards": str(out)}))
    for i in range(3):
        assert_equal(a.batch(i, 2), b.batch(i, 2))
    header["version"] = 3
    (out / "header.json").write_text(json.dumps(header))
    with pytest.raises(ValueError, match="holds format 'momkit-shards' version 3; this momkit reads "
                                         "'momkit-shards' versions 1, 2"):
        source(make_spec(TEXT_LATENT_SPEECH, {"kind": "jsonl", "shards": str(out)}))


@pytest.mark.parametrize("modalities, message", [
    (["text", {"kind": "image", "name": "image_latent", "latent_dim": 4}, "speech"],
     "modality 'image_latent' of shards .* has latent_dim 8 in the shards and 4 in the spec"),
    (["text", {"kind": "image", "name": "image_latent", "latent_dim": 8}, {"kind": "speech", "vocab_size": 16}],
     "modality 'speech' of shards .* has token ids up to \\d+ in the shards, beyond the spec's vocab_size 16"),
    (["text", {"kind": "image", "name": "image_latent", "latent_dim": 8}],
     "shards .* hold modality 'speech' \\(\\d+ positions\\), not a modality of the spec; its modalities: text, "
     "image_latent"),
    (["text", {"kind": "image", "name": "image_latent"}, "speech"],
     "modality 'image_latent' of shards .* is continuous in the shards and discrete in the spec"),
])
def test_shards_must_fit_the_spec(modalities, message, tmp_path):
    path = jsonl_file(tmp_path, TEXT_LATENT_SPEECH)
    out = convert(path, tmp_path / "shards", make_spec(TEXT_LATENT_SPEECH, None).modalities)
    with pytest.raises(ValueError, match=message):
        source(make_spec(modalities, {"kind": "jsonl", "shards": str(out)}))


def test_sources_reject_bad_arguments(cache):
    spec = make_spec(TEXT_IMAGE, {"kind": "synthetic"})
    with pytest.raises(ValueError, match="unknown split 'test'; valid splits: train, eval"):
        source(spec, "test")
    with pytest.raises(ValueError, match="batch index must be a non-negative int, got -1"):
        source(spec).batch(-1, 2)
    with pytest.raises(ValueError, match="min_length \\(9\\) must not exceed max_length \\(3\\)"):
        make_spec(TEXT_IMAGE, {"kind": "synthetic", "min_length": 9, "max_length": 3})
    with pytest.raises(ValueError, match="unknown field\\(s\\) 'num_docs'"):
        make_spec(TEXT_IMAGE, small_shapes(cache, num_docs=3))


def test_docs_describe_every_option():
    text = (Path(__file__).parents[2] / "docs" / "data.md").read_text()
    for dataset in get_registry().datasets.values():
        assert f"`{dataset.name}`" in text
        for name in dataset.config.model_fields:
            assert f"`{name}`" in text, f"docs/data.md does not describe option {name!r} of {dataset.name}"
