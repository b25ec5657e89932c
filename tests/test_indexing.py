"""Index builds on real files: HDF5 store, BM25, manifest, resume and overwrite."""

from __future__ import annotations

import hashlib
import json

import h5py
import numpy as np
import pytest
import torch

from conftest import shared_collection
from mice_engine.encoding import encode_sequences, tokenize
from mice_engine.indexing import (BUILD_FILE, MANIFEST_FILE, MiceIndexError, build_index,
                                  read_manifest)
from mice_engine.model import MiceModel
from mice_engine.sources import open_documents
from mice_engine.store import STATES_FILE, StateStore


@pytest.fixture(scope="module")
def tiny_model(tiny_backbone):
    return MiceModel.from_backbone(tiny_backbone, merge_layer=2, interaction_layers=2,
                                   query_max_length=16, doc_max_length=64)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


class Interrupt(Exception):
    pass


def test_adi_index_aligns_ids_texts_and_states(tiny_model, tmp_path):
    adi = shared_collection("adi")
    manifest = build_index(adi, tmp_path / "index", model=tiny_model, chunk_size=30,
                           batch_size=8, show_progress=False)
    documents = list(open_documents(adi))
    tokens = tokenize(tiny_model.tokenizer, [doc.full_text() for doc in documents], 64)
    assert manifest["counts"]["documents"] == 82
    assert manifest["counts"]["tokens"] == sum(tokens.lengths)
    assert manifest["counts"]["truncated_documents"] == tokens.truncated
    with StateStore(tmp_path / "index" / STATES_FILE) as store:
        assert store.doc_ids == [doc.id for doc in documents]
        assert store.lengths().tolist() == tokens.lengths
        assert store.document(40) == documents[40]
        fresh = encode_sequences(tiny_model, tokens.input_ids[:5], batch_size=1)
        for position in range(5):
            np.testing.assert_allclose(store.states(position).astype(np.float32),
                                       fresh[position].astype(np.float32), atol=2e-3)


def test_store_is_one_contiguous_memory_mapped_dataset(tiny_model, tmp_path):
    adi = shared_collection("adi")
    build_index(adi, tmp_path / "index", model=tiny_model, chunk_size=50, show_progress=False)
    with h5py.File(tmp_path / "index" / STATES_FILE, "r") as handle:
        assert handle["states"].dtype == np.float16
        assert handle["states"].chunks is None
        assert handle["offsets"].shape == (83,)
    with StateStore(tmp_path / "index" / STATES_FILE) as store:
        assert isinstance(store._states, np.memmap)
    assert not (tmp_path / "index" / "shards").exists()
    assert not (tmp_path / "index" / BUILD_FILE).exists()


def test_manifest_records_model_and_versions(tiny_model, tmp_path):
    adi = shared_collection("adi")
    manifest = build_index(adi, tmp_path / "index", model=tiny_model, show_progress=False)
    assert read_manifest(tmp_path / "index") == manifest
    assert manifest["model"]["name"] == "MICE-l2+2"
    assert manifest["model"]["sha256"] == tiny_model.weights_sha256()
    assert manifest["model"]["encoder_sha256"] == tiny_model.weights_sha256(lower_only=True)
    assert manifest["states"]["dtype"] == "float16"
    assert manifest["states"]["hidden_size"] == 32
    assert manifest["states"]["bytes_per_token"] == 64
    assert manifest["states"]["file_bytes_per_token"] > 64
    assert "torch" in manifest["versions"]
    assert manifest["bytes"] > manifest["states"]["bytes"]


def test_existing_index_is_never_overwritten(tiny_model, tmp_path):
    adi = shared_collection("adi")
    build_index(adi, tmp_path / "index", model=tiny_model, show_progress=False)
    before = (tmp_path / "index" / MANIFEST_FILE).read_bytes()
    with pytest.raises(MiceIndexError, match="already exists; pass --overwrite"):
        build_index(adi, tmp_path / "index", model=tiny_model, show_progress=False)
    assert (tmp_path / "index" / MANIFEST_FILE).read_bytes() == before


def test_overwrite_replaces_only_when_complete(tiny_model, tmp_path):
    adi = shared_collection("adi")
    first = build_index(adi, tmp_path / "index", model=tiny_model, show_progress=False)

    def stop(position):
        raise Interrupt

    with pytest.raises(Interrupt):
        build_index(adi, tmp_path / "index", model=tiny_model, mode="overwrite",
                    show_progress=False, progress_callback=stop)
    assert read_manifest(tmp_path / "index") == first  # the old index is untouched
    second = build_index(adi, tmp_path / "index", model=tiny_model, mode="overwrite",
                         show_progress=False)
    assert second["created"] >= first["created"]
    assert second["states"]["sha256"] == first["states"]["sha256"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]


def stop_after_shards(count, exception=Interrupt):
    """A progress callback that raises ``exception`` once ``count`` shards are committed."""
    calls = []

    def stop(position):
        calls.append(position)
        if len(calls) == count:
            raise exception

    return stop


def test_interrupted_overwrite_then_resume(tiny_model, tmp_path):
    from mice_engine.check import check_index
    from mice_engine.indexing import interrupted_build_message, staging_folder

    adi = shared_collection("adi")
    index = tmp_path / "index"
    first = build_index(adi, index, model=tiny_model, chunk_size=20, show_progress=False)
    with pytest.raises(Interrupt):
        build_index(adi, index, model=tiny_model, chunk_size=20, mode="overwrite",
                    show_progress=False, progress_callback=stop_after_shards(2))

    staging = staging_folder(index)
    assert staging == tmp_path / ".index.building"
    assert read_manifest(index) == first
    assert check_index(index).problems == []
    assert (staging / BUILD_FILE).is_file()
    assert len(list((staging / "shards").glob("part-*.h5"))) == 2
    message = interrupted_build_message(index, "overwrite")
    assert message.startswith(f"the index at {index} is intact and still usable. ")
    assert f"The partial rebuild, 2 committed shards, is in {staging}" in message
    assert "to continue it, rerun the same command with --resume in place of --overwrite" in message
    assert "To restart it, rerun the same command." in message
    assert f"`rm -r {staging}`" in message

    with pytest.raises(MiceIndexError, match=f"interrupted rebuild of {index} is in {staging}; "
                                             "pass --resume"):
        build_index(adi, index, model=tiny_model, chunk_size=20, show_progress=False)
    resumed = build_index(adi, index, model=tiny_model, chunk_size=20, mode="resume",
                          show_progress=False)
    assert resumed["build"]["resumed_after_shards"] == 2
    assert read_manifest(index) == resumed
    assert resumed["created"] >= first["created"]
    assert resumed["states"]["sha256"] == first["states"]["sha256"]
    assert resumed["content_sha256"] == first["content_sha256"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]
    assert check_index(index).problems == []


def test_resume_finishes_interrupted_swap(tiny_model, tmp_path, monkeypatch):
    import os

    from mice_engine import indexing

    adi = shared_collection("adi")
    index = tmp_path / "index"
    first = build_index(adi, index, model=tiny_model, show_progress=False)

    def interrupt(staging, output):
        raise KeyboardInterrupt

    monkeypatch.setattr(indexing, "_swap_in", interrupt)
    with pytest.raises(KeyboardInterrupt):
        build_index(adi, index, model=tiny_model, mode="overwrite", show_progress=False)
    monkeypatch.undo()
    staging = indexing.staging_folder(index)
    staged = read_manifest(staging)
    assert read_manifest(index) == first
    message = indexing.interrupted_build_message(index, "overwrite")
    assert message.startswith(f"the index at {index} is intact and still usable. ")
    assert f"The rebuild in {staging} is complete but was not moved to {index}" in message

    # The swap's first rename moves the old index aside. An interruption right after it leaves
    # no index at the output path.
    retired = tmp_path / ".index.retired"
    os.replace(index, retired)
    message = indexing.interrupted_build_message(index, "overwrite")
    assert message.startswith(f"the old index was moved to {retired}, and nothing is at {index}")
    assert "to move it there, rerun the same command with --resume in place of --overwrite" in message

    resumed = build_index(adi, index, model=tiny_model, mode="resume", show_progress=False)
    assert resumed == staged
    assert read_manifest(index) == staged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]


def test_interrupt_message_for_build_in_place(tiny_model, tmp_path):
    from mice_engine.indexing import interrupted_build_message

    index = tmp_path / "index"
    assert interrupted_build_message(index, "create") == (
        f"nothing was written to {index}; rerun the same command")
    with pytest.raises(Interrupt):
        build_index(shared_collection("adi"), index, model=tiny_model, chunk_size=20,
                    show_progress=False, progress_callback=stop_after_shards(3))
    created = interrupted_build_message(index, "create")
    assert created.startswith(f"the build at {index} is incomplete. Its 3 committed shards")
    assert "to continue it, rerun the same command plus --resume" in created
    assert "rerun the same command plus --overwrite" in created
    resumed = interrupted_build_message(index, "resume")
    assert "to continue it, rerun the same command." in resumed
    assert "--overwrite in place of --resume" in resumed


def test_interrupted_build_resumes_to_identical_index(tiny_model, tmp_path):
    adi = shared_collection("adi")
    clean = build_index(adi, tmp_path / "clean", model=tiny_model, chunk_size=20,
                        show_progress=False)
    calls = []

    def stop_after_two_shards(position):
        calls.append(position)
        if len(calls) == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        build_index(adi, tmp_path / "index", model=tiny_model, chunk_size=20,
                    show_progress=False, progress_callback=stop_after_two_shards)
    with pytest.raises(MiceIndexError, match="incomplete.*--resume"):
        read_manifest(tmp_path / "index")
    with pytest.raises(MiceIndexError, match="unfinished build; pass --resume"):
        build_index(adi, tmp_path / "index", model=tiny_model, chunk_size=20, show_progress=False)
    resumed = build_index(adi, tmp_path / "index", model=tiny_model, chunk_size=20,
                          mode="resume", show_progress=False)
    assert resumed["build"]["resumed_after_shards"] == 2
    assert resumed["states"]["sha256"] == clean["states"]["sha256"]
    assert resumed["content_sha256"] == clean["content_sha256"]
    assert resumed["counts"] == clean["counts"]
    with StateStore(tmp_path / "index" / STATES_FILE) as a, \
            StateStore(tmp_path / "clean" / STATES_FILE) as b:
        assert a.doc_ids == b.doc_ids
        assert np.array_equal(a.offsets, b.offsets)


def test_resume_with_other_settings_is_rejected(tiny_model, tmp_path):
    adi = shared_collection("adi")

    def stop(position):
        raise Interrupt

    with pytest.raises(Interrupt):
        build_index(adi, tmp_path / "index", model=tiny_model, chunk_size=20,
                    show_progress=False, progress_callback=stop)
    with pytest.raises(MiceIndexError, match="chunk_size"):
        build_index(adi, tmp_path / "index", model=tiny_model, chunk_size=10, mode="resume",
                    show_progress=False)


def test_resume_without_partial_build_is_rejected(tiny_model, tmp_path):
    with pytest.raises(MiceIndexError, match="no unfinished build"):
        build_index(shared_collection("adi"), tmp_path / "index", model=tiny_model,
                    mode="resume", show_progress=False)


def test_duplicate_id_stops_with_positions(tiny_model, tmp_path):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [
        {"_id": "a", "text": "cells"}, {"_id": "b", "text": "gene"}, {"_id": "a", "text": "dna"},
    ])
    with pytest.raises(MiceIndexError, match=r"'a' appears twice .*documents 1 and 3"):
        build_index(corpus, tmp_path / "index", model=tiny_model, show_progress=False)


def test_duplicate_id_first_policy_keeps_first(tiny_model, tmp_path):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [
        {"_id": "a", "text": "cells"}, {"_id": "b", "text": "gene"}, {"_id": "a", "text": "dna"},
    ])
    manifest = build_index(corpus, tmp_path / "index", model=tiny_model, on_duplicate="first",
                           show_progress=False)
    assert manifest["counts"]["documents"] == 2
    assert manifest["counts"]["skipped_duplicates"] == 1
    with StateStore(tmp_path / "index" / STATES_FILE) as store:
        assert store.document(0).text == "cells"


def test_empty_and_long_documents_are_indexed_and_counted(tiny_model, tmp_path):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [
        {"_id": "007", "title": "", "text": ""},
        {"_id": "long", "text": " ".join(["cells"] * 200)},
        {"_id": "é-文", "text": "protein"},
        {"_id": "blank", "title": " \t", "text": "\n  "},
    ])
    manifest = build_index(corpus, tmp_path / "index", model=tiny_model, show_progress=False)
    assert manifest["counts"]["empty_documents"] == 2
    assert manifest["counts"]["truncated_documents"] == 1
    with StateStore(tmp_path / "index" / STATES_FILE) as store:
        assert store.doc_ids == ["007", "long", "é-文", "blank"]
        assert store.lengths().tolist() == [2, 64, 3, 2]


def test_empty_corpus_is_rejected(tiny_model, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("")
    with pytest.raises(MiceIndexError, match="contains no documents"):
        build_index(corpus, tmp_path / "index", model=tiny_model, show_progress=False)


def test_cpu_device_is_accepted_and_cuda_checked(tiny_model, tmp_path):
    adi = shared_collection("adi")
    if torch.cuda.is_available():
        pytest.skip("this check is for machines without a GPU")
    with pytest.raises(MiceIndexError, match="sees no CUDA GPU"):
        build_index(adi, tmp_path / "index", model=tiny_model, device="cuda", show_progress=False)


# --------------------------------------------------------------------------------------------
# mice check
def test_check_accepts_fresh_index(tiny_model, tmp_path):
    from mice_engine.check import check_index

    build_index(shared_collection("adi"), tmp_path / "index", model=tiny_model,
                show_progress=False)
    report = check_index(tmp_path / "index")
    assert report.problems == []
    assert report.notes == []
    assert "checksum" in report.checked
    assert "content checksum" in report.checked


def test_check_reports_corrupted_states(tiny_model, tmp_path):
    from mice_engine.check import check_index

    build_index(shared_collection("adi"), tmp_path / "index", model=tiny_model,
                show_progress=False)
    with h5py.File(tmp_path / "index" / STATES_FILE, "r+") as handle:
        handle["states"][5, 3] = np.float16(np.nan)
    report = check_index(tmp_path / "index")
    assert any("SHA-256 differs" in problem for problem in report.problems)
    assert any("1 stored state values are NaN" in problem for problem in report.problems)


def test_check_reports_count_mismatch_and_missing_bm25(tiny_model, tmp_path):
    import shutil

    from mice_engine.check import check_index

    build_index(shared_collection("adi"), tmp_path / "index", model=tiny_model,
                show_progress=False)
    manifest_path = tmp_path / "index" / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    manifest["counts"]["documents"] = 81
    manifest_path.write_text(json.dumps(manifest))
    shutil.rmtree(tmp_path / "index" / "bm25")
    problems = check_index(tmp_path / "index").problems
    assert any("manifest lists 81" in problem for problem in problems)
    assert any("BM25 index" in problem for problem in problems)


def test_check_reports_unfinished_build(tiny_model, tmp_path):
    from mice_engine.check import check_index

    def stop(position):
        raise Interrupt

    with pytest.raises(Interrupt):
        build_index(shared_collection("adi"), tmp_path / "index", model=tiny_model,
                    chunk_size=20, show_progress=False, progress_callback=stop)
    problems = check_index(tmp_path / "index").problems
    assert len(problems) == 1
    assert "--resume" in problems[0]


def length_prefixed_sha256(values):
    digest = hashlib.sha256()
    for value in values:
        encoded = value.encode("utf-8")
        digest.update(len(encoded).to_bytes(8, "little") + encoded)
    return digest.hexdigest()


def test_content_checksum_covers_source_documents(tiny_model, tmp_path):
    adi = shared_collection("adi")
    manifest = build_index(adi, tmp_path / "index", model=tiny_model, chunk_size=30,
                           show_progress=False)
    documents = list(open_documents(adi))
    assert manifest["content_sha256"] == {
        "doc_ids": length_prefixed_sha256(doc.id for doc in documents),
        "titles": length_prefixed_sha256(doc.title for doc in documents),
        "texts": length_prefixed_sha256(doc.text for doc in documents),
    }


def test_content_hash_separates_string_boundaries():
    from mice_engine.store import _hash_strings

    digests = []
    for strings in (["ab", "c"], ["a", "bc"], ["abc"]):
        digest = hashlib.sha256()
        data = "".join(strings).encode()
        offsets = np.cumsum([0] + [len(value) for value in strings])
        _hash_strings(digest, data, offsets)
        digests.append(digest.hexdigest())
    assert len(set(digests)) == 3


@pytest.fixture(scope="module")
def adi_with_faiss(tiny_model, tmp_path_factory):
    """ADI with int8 codes (codec.faiss) and a dense index (dense.faiss)."""
    from mice_engine.storage import StorageOptions

    folder = tmp_path_factory.mktemp("adi-faiss") / "index"
    build_index(shared_collection("adi"), folder, model=tiny_model, show_progress=False,
                storage=StorageOptions(compression="int8", dense=True))
    assert (folder / "codec.faiss").is_file()
    assert (folder / "dense.faiss").is_file()
    return folder


def rewrite_strings(folder, name, edit):
    """Replace the string field ``name`` of an index's store by ``edit(values)``."""
    from mice_engine.store import _read_all_strings, _write_strings

    with h5py.File(folder / STATES_FILE, "r+") as handle:
        values = _read_all_strings(handle[name])
        del handle[name]
        _write_strings(handle, name, edit(values))


def swap_ids(ids):
    ids[10], ids[20] = ids[20], ids[10]
    return ids


def append_to_text(texts):
    texts[5] += " edited"
    return texts


def change_one_title_byte(folder):
    with h5py.File(folder / STATES_FILE, "r+") as handle:
        data = handle["titles"]["data"]
        position = int(np.flatnonzero(data[()] == ord("a"))[0])
        data[position] = ord("b")


TAMPERING = {
    "doc_ids": lambda folder: rewrite_strings(folder, "doc_ids", swap_ids),
    "titles": change_one_title_byte,
    "texts": lambda folder: rewrite_strings(folder, "texts", append_to_text),
}


@pytest.mark.parametrize("field", TAMPERING)
def test_check_finds_changed_content(adi_with_faiss, tmp_path, field):
    import shutil

    from typer.testing import CliRunner

    from cli.main import app
    from mice_engine.check import check_index
    from mice_engine.store import FIELD_NAMES

    copy = tmp_path / "copy"
    shutil.copytree(adi_with_faiss, copy)
    assert check_index(copy).problems == []
    TAMPERING[field](copy)

    problems = check_index(copy).problems
    assert len(problems) == 1
    assert f"stored {FIELD_NAMES[field]} differ from the manifest's content checksum" in problems[0]
    assert f"content_sha256.{field}" in problems[0]
    assert f"--output {copy} --overwrite" in problems[0]
    result = CliRunner().invoke(app, ["check", str(copy), "--no-checksum"])
    assert result.exit_code == 1
    assert f"stored {FIELD_NAMES[field]} differ" in result.output


def test_index_without_content_checksum(tiny_model, adi_with_faiss, tmp_path):
    import shutil

    from typer.testing import CliRunner

    from cli.main import app
    from mice_engine.check import check_index
    from mice_engine.search import Searcher

    copy = tmp_path / "old"
    shutil.copytree(adi_with_faiss, copy)
    manifest = json.loads((copy / MANIFEST_FILE).read_text())
    del manifest["content_sha256"]
    (copy / MANIFEST_FILE).write_text(json.dumps(manifest))

    searcher = Searcher(copy, model=tiny_model)
    assert len(searcher.search("information retrieval", k=5).hits) == 5
    searcher.close()
    report = check_index(copy)
    assert report.problems == []
    assert len(report.notes) == 1
    assert "no content checksum" in report.notes[0]
    assert f"--output {copy} --overwrite" in report.notes[0]
    result = CliRunner().invoke(app, ["check", str(copy)])
    assert result.exit_code == 0
    assert "note: the manifest has no content checksum" in result.output
    assert f"{copy}: OK" in result.output


def fill_disk_at_shard(monkeypatch, full_at: int):
    """Make shard ``full_at`` (and later ones) fail as on a full disk; returns the real writer."""
    import errno

    from mice_engine import indexing

    real_write = indexing.write_shard

    def write_until_full(folder, number, *args):
        if number == full_at:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(folder, number, *args)

    monkeypatch.setattr(indexing, "write_shard", write_until_full)
    return real_write


def test_full_disk_keeps_shards_for_resume(tiny_model, tmp_path, monkeypatch):
    from mice_engine import indexing

    adi = shared_collection("adi")
    real_write = fill_disk_at_shard(monkeypatch, 2)
    with pytest.raises(MiceIndexError, match="disk full .* --resume"):
        build_index(adi, tmp_path / "index", model=tiny_model, chunk_size=20,
                    show_progress=False)
    assert len(list((tmp_path / "index" / "shards").glob("part-*.h5"))) == 2
    monkeypatch.setattr(indexing, "write_shard", real_write)
    manifest = build_index(adi, tmp_path / "index", model=tiny_model, chunk_size=20,
                           mode="resume", show_progress=False)
    assert manifest["counts"]["documents"] == 82
    assert manifest["build"]["resumed_after_shards"] == 2


def test_full_disk_during_overwrite(tiny_model, tmp_path, monkeypatch):
    adi = shared_collection("adi")
    index = tmp_path / "index"
    first = build_index(adi, index, model=tiny_model, chunk_size=20, show_progress=False)
    fill_disk_at_shard(monkeypatch, 2)
    with pytest.raises(MiceIndexError, match=f"{index} is unchanged.*`mice index SOURCE --output "
                                             f"{index} --resume`"):
        build_index(adi, index, model=tiny_model, chunk_size=20, mode="overwrite",
                    show_progress=False)
    monkeypatch.undo()
    assert read_manifest(index) == first
    assert len(list((tmp_path / ".index.building" / "shards").glob("part-*.h5"))) == 2
    resumed = build_index(adi, index, model=tiny_model, chunk_size=20, mode="resume",
                          show_progress=False)
    assert resumed["build"]["resumed_after_shards"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]


def test_one_document_collection(tiny_model, tmp_path):
    from mice_engine.search import Searcher

    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"_id": "only", "text": "protein gene"}])
    build_index(corpus, tmp_path / "index", model=tiny_model, show_progress=False)
    searcher = Searcher(tmp_path / "index", model=tiny_model)
    hits = searcher.search("gene", k=10).hits
    assert [hit.doc_id for hit in hits] == ["only"]
    searcher.close()


def test_non_finite_states_stop_the_build(tiny_model, tmp_path, monkeypatch):
    import mice_engine.indexing as indexing

    real_encode = indexing.encode_sequences

    def encode_with_overflow(*args, **kwargs):
        states = real_encode(*args, **kwargs)
        states[1][0, 0] = np.float16(np.inf)
        return states

    monkeypatch.setattr(indexing, "encode_sequences", encode_with_overflow)
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [
        {"_id": "a", "text": "cells"}, {"_id": "b", "text": "gene"},
    ])
    with pytest.raises(MiceIndexError, match="NaN or infinite states for 1 documents .*'b'"):
        build_index(corpus, tmp_path / "index", model=tiny_model, show_progress=False)
    assert not (tmp_path / "index" / "shards").exists()


# --------------------------------------------------------------------------------------------
# Long documents
def test_tokenize_windows_cover_the_text():
    from mice_engine.encoding import tokenize_windows

    class Tokenizer:
        cls_token_id, sep_token_id = 101, 102

        def __call__(self, texts, **options):
            return {"input_ids": [list(range(1, int(text) + 1)) for text in texts]}

    windows = tokenize_windows(Tokenizer(), ["10", "3"], max_length=6, stride=2)
    assert windows.windows_per_text == [4, 1]
    assert windows.input_ids[0] == [101, 1, 2, 3, 4, 102]
    assert windows.input_ids[3] == [101, 7, 8, 9, 10, 102]
    assert windows.input_ids[4] == [101, 1, 2, 3, 102]
    assert windows.split_texts == 1


def test_windows_policy_stores_every_token(tiny_model, tmp_path):
    from mice_engine.check import check_index
    from mice_engine.encoding import tokenize_windows

    long_text = " ".join(["cells", "protein", "gene"] * 70)
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [
        {"_id": "short", "text": "protein"}, {"_id": "long", "text": long_text},
    ])
    manifest = build_index(corpus, tmp_path / "index", model=tiny_model,
                           long_documents="windows", show_progress=False)
    expected = tokenize_windows(tiny_model.tokenizer, ["protein", long_text], 64, 31)
    assert manifest["counts"]["split_documents"] == 1
    assert manifest["counts"]["truncated_documents"] == 0
    assert manifest["counts"]["windows"] == sum(expected.windows_per_text)
    assert manifest["long_documents"] == {"policy": "windows", "window_stride": 31}
    with StateStore(tmp_path / "index" / STATES_FILE) as store:
        windows = store.windows(1)
        assert len(windows) == expected.windows_per_text[1]
        assert [end - start for start, end in windows] == [len(ids) for ids in expected.input_ids[1:]]
        assert store.windows(0) == [(0, 3)]
    assert check_index(tmp_path / "index").problems == []


def test_windowed_document_scores_its_best_window(tiny_model, tmp_path):
    from mice_engine.encoding import encode_query
    from mice_engine.search import Searcher

    long_text = " ".join(["cells", "protein", "gene", "dna", "blood"] * 40)
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"_id": "long", "text": long_text}])
    build_index(corpus, tmp_path / "index", model=tiny_model, long_documents="windows",
                window_stride=40, show_progress=False)
    searcher = Searcher(tmp_path / "index", model=tiny_model)
    hit = searcher.search("gene blood", k=1).hits[0]
    query, query_mask, _ = encode_query(tiny_model, "gene blood")
    store = searcher.index.store
    window_scores = []
    for start, end in store.windows(0):
        states = torch.from_numpy(store.rows(start, end).astype(np.float32))[None]
        with torch.no_grad():
            window_scores.append(float(tiny_model.score_states(query, query_mask, states,
                                                               torch.ones(1, end - start))))
    assert len(window_scores) > 1
    assert hit.score == pytest.approx(max(window_scores), abs=1e-5)
    searcher.close()


def test_windowed_maxsim_reads_all_tokens(tiny_model, tmp_path):
    from mice_engine.encoding import encode_query
    from mice_engine.model import maxsim_scores
    from mice_engine.search import STAGES, Searcher

    words = ["cells", "protein", "gene", "dna", "blood"]
    long_text = " ".join(words * 40)
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"_id": "long", "text": long_text},
                                                      {"_id": "short", "text": "gene"}])
    build_index(corpus, tmp_path / "index", model=tiny_model, long_documents="windows",
                window_stride=40, show_progress=False)
    searcher = Searcher(tmp_path / "index", model=tiny_model)
    store = searcher.index.store
    query, query_mask, _ = encode_query(tiny_model, "gene blood cells")
    rows = np.array([0, 1])
    _, _, maxsim = searcher._score("gene blood cells", rows, dict.fromkeys(STAGES, 0.0),
                                   with_maxsim=True)
    assert len(store.windows(0)) > 1
    for row in rows:
        # Every stored token of the document, all windows together, in one MaxSim.
        tokens = np.concatenate([store.rows(start, end) for start, end in store.windows(int(row))])
        states = torch.from_numpy(tokens.astype(np.float32))[None]
        expected = maxsim_scores(query, query_mask, states, torch.ones(1, len(tokens)))
        assert maxsim[row] == pytest.approx(float(expected[0]), abs=1e-5)
    searcher.close()


# --------------------------------------------------------------------------------------------
# Output folders and failed builds
def test_overwrite_refuses_folder_that_is_no_index(tiny_model, tmp_path):
    folder = tmp_path / "thesis"
    folder.mkdir()
    (folder / "chapter.txt").write_text("keep me")
    with pytest.raises(MiceIndexError, match="not a mice index .* choose another --output"):
        build_index(shared_collection("adi"), folder, model=tiny_model, mode="overwrite",
                    show_progress=False)
    assert (folder / "chapter.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thesis"]


def test_output_that_is_a_file_is_rejected(tiny_model, tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    for mode in ("create", "overwrite"):
        with pytest.raises(MiceIndexError, match="is not a folder"):
            build_index(shared_collection("adi"), target, model=tiny_model, mode=mode,
                        show_progress=False)
    assert target.read_text() == "keep me"


def test_failed_build_leaves_nothing_to_block_a_rerun(tiny_model, tmp_path):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [
        {"_id": "a", "text": "cells"}, {"_id": "a", "text": "gene"},
    ])
    with pytest.raises(MiceIndexError, match="appears twice"):
        build_index(corpus, tmp_path / "index", model=tiny_model, show_progress=False)
    assert not (tmp_path / "index").exists()
    manifest = build_index(corpus, tmp_path / "index", model=tiny_model, on_duplicate="first",
                           show_progress=False)
    assert manifest["counts"]["documents"] == 1


def test_whitespace_in_document_id_is_rejected(tiny_model, tmp_path):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"_id": "a b", "text": "cells"}])
    with pytest.raises(MiceIndexError, match="'a b' .* contains whitespace"):
        build_index(corpus, tmp_path / "index", model=tiny_model, show_progress=False)


def test_resume_accepts_relative_and_absolute_paths(tiny_model, tmp_path, monkeypatch):
    corpus = write_jsonl(tmp_path / "corpus.jsonl",
                         [{"_id": str(i), "text": "cells gene"} for i in range(30)])

    def stop(position):
        raise Interrupt

    with pytest.raises(Interrupt):
        build_index(corpus, tmp_path / "index", model=tiny_model, chunk_size=10,
                    show_progress=False, progress_callback=stop)
    monkeypatch.chdir(tmp_path)
    manifest = build_index("corpus.jsonl", "index", model=tiny_model, chunk_size=10,
                           mode="resume", show_progress=False)
    assert manifest["counts"]["documents"] == 30


def test_invalid_device_is_rejected(tiny_model, tmp_path):
    with pytest.raises(MiceIndexError, match="invalid device 'gpu'"):
        build_index(shared_collection("adi"), tmp_path / "index", model=tiny_model,
                    device="gpu", show_progress=False)


@pytest.fixture
def small_disk(tmp_path):
    """A 200 KiB tmpfs mounted under tmp_path; needs root, skips elsewhere."""
    import subprocess

    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs",
                              str(mount_point)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=False)


def test_real_full_disk_then_resume_after_growing_it(tiny_model, small_disk, tmp_path):
    import subprocess

    adi = shared_collection("adi")
    clean = build_index(adi, tmp_path / "clean", model=tiny_model, chunk_size=10,
                        show_progress=False)
    with pytest.raises(MiceIndexError, match="disk full"):
        build_index(adi, small_disk / "index", model=tiny_model, chunk_size=10,
                    show_progress=False)
    assert (small_disk / "index" / BUILD_FILE).is_file()
    assert not (small_disk / "index" / MANIFEST_FILE).exists()
    subprocess.run(["mount", "-o", "remount,size=20m", str(small_disk)], check=True)
    resumed = build_index(adi, small_disk / "index", model=tiny_model, chunk_size=10,
                          mode="resume", show_progress=False)
    assert resumed["states"]["sha256"] == clean["states"]["sha256"]
    assert resumed["counts"] == clean["counts"]
