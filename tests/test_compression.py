"""Compressed state stores on real index folders: codecs, round trips, manifests, checks."""

from __future__ import annotations

import json
import logging

import faiss
import h5py
import numpy as np
import pytest
import torch
from conftest import shared_collection

from mice_engine.check import check_index
from mice_engine.compression import (
    CODEC_FILE,
    CodecError,
    coarse_centroids,
    parse_codec_name,
    plan_codec,
)
from mice_engine.indexing import MANIFEST_FILE, MiceIndexError, build_index, read_manifest
from mice_engine.model import MiceModel
from mice_engine.search import Searcher
from mice_engine.storage import StorageOptions, derive_index
from mice_engine.store import CODES_DATASET, STATES_DATASET, STATES_FILE, StateStore, StoreError

QUERY = "information retrieval system for document search"


@pytest.fixture(scope="module")
def tiny_model(tiny_backbone):
    return MiceModel.from_backbone(tiny_backbone, merge_layer=2, interaction_layers=2,
                                   query_max_length=16, doc_max_length=64, seed=11)


@pytest.fixture(scope="module")
def adi_float16(tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("adi") / "float16"
    build_index(shared_collection("adi"), folder, model=tiny_model, show_progress=False)
    return folder


@pytest.fixture(scope="module")
def cranfield_float16(tiny_model, tmp_path_factory):
    """The first 300 Cranfield documents, cut to 64 tokens: about 18,000 token states, enough
    for ivfpq."""
    folder = tmp_path_factory.mktemp("cranfield")
    corpus = first_documents(shared_collection("cranfield"), 300, folder / "corpus.jsonl")
    build_index(corpus, folder / "float16", model=tiny_model, show_progress=False, batch_size=64)
    return folder / "float16"


def first_documents(source, count, path):
    """Write the first ``count`` documents of ``source`` as a BEIR corpus file."""
    from itertools import islice

    from mice_engine.sources import open_documents

    lines = [json.dumps({"_id": doc.id, "title": doc.title, "text": doc.text}) + "\n"
             for doc in islice(iter(open_documents(source)), count)]
    path.write_text("".join(lines), encoding="utf-8")
    return path


def float16_rows(folder):
    with StateStore(folder / STATES_FILE) as store:
        return store.rows(0, store.num_tokens).astype(np.float32)


def test_codec_names_are_checked():
    assert parse_codec_name("IVFPQ64", 384) == "ivfpq64"
    assert parse_codec_name("opq-ivfpq32", 384) == "opq-ivfpq32"
    assert parse_codec_name("int8", 384) == "int8"
    with pytest.raises(CodecError, match="unknown compression 'zstd'"):
        parse_codec_name("zstd", 384)
    with pytest.raises(CodecError, match=r"M = 64 must divide the hidden size 32"):
        parse_codec_name("ivfpq64", 32)
    with pytest.raises(CodecError, match=r"M = 5 must divide the hidden size 32"):
        parse_codec_name("opq-ivfpq5", 32)
    with pytest.raises(CodecError, match="even hidden size"):
        parse_codec_name("int4", 33)


def test_coarse_centroids_follow_corpus_and_sample():
    assert coarse_centroids(297_346, 131_072) == 512
    assert coarse_centroids(1_693_234, 131_072) == 1024
    assert coarse_centroids(100_000_000, 131_072) == 2048  # limited by 39 vectors per centroid
    assert coarse_centroids(100_000_000, 10_000_000) == 4096


def test_tiny_corpus_plan_falls_back_to_int8():
    plan = plan_codec("ivfpq8", 5_000, 32)
    assert plan.name == "int8"
    assert plan.requested == "ivfpq8"
    assert "9,984 training vectors" in plan.fallback_reason


def test_int8_round_trip_within_one_step(adi_float16, tmp_path):
    manifest = derive_index(adi_float16, tmp_path / "int8", StorageOptions(compression="int8"),
                            show_progress=False)
    original = float16_rows(adi_float16)
    decoded = float16_rows(tmp_path / "int8")
    # The codec was trained on every row, so each value lies in its dimension's learned range,
    # and decoding misses it by at most one of that range's 255 steps (plus float16 rounding).
    codec = faiss.read_index(str(tmp_path / "int8" / CODEC_FILE))
    trained = faiss.vector_to_array(codec.sq.trained)
    width = original.shape[1]
    low, span = trained[:width], trained[width:]
    assert np.all(original >= low - 1e-6)
    assert np.all(original <= low + span + 1e-6)
    step = span / 255
    assert np.all(np.abs(decoded - original) <= step + 2e-3 * np.abs(original) + 1e-6)
    assert manifest["states"]["bytes_per_token"] == 32
    assert manifest["states"]["codec"]["reconstruction"]["mean_cosine"] > 0.999


# OPQ's rotation trains 50 product quantisers in turn: minutes of CPU even on this small corpus.
@pytest.mark.parametrize("name", ["ivfpq16", pytest.param("opq-ivfpq16", marks=pytest.mark.slow)])
def test_ivfpq_round_trip_error_is_bounded(cranfield_float16, tmp_path, name):
    manifest = derive_index(cranfield_float16, tmp_path / "pq", StorageOptions(
        compression=name), show_progress=False)
    codec = manifest["states"]["codec"]
    assert codec["name"] == name
    assert codec["fallback_reason"] is None
    # 16 sub-quantisers plus a 1-byte centroid number (at most 256 coarse centroids here).
    assert codec["coarse_centroids"] <= 256
    assert manifest["states"]["code_bytes_per_token"] == 17
    original = float16_rows(cranfield_float16)
    decoded = float16_rows(tmp_path / "pq")
    relative = ((decoded - original) ** 2).sum() / (original**2).sum()
    cosine = (decoded * original).sum(1) / (np.linalg.norm(decoded, axis=1)
                                           * np.linalg.norm(original, axis=1))
    # The stated error of ivfpq16 on these 32-wide states (2 dimensions per byte).
    assert relative < 0.02
    assert cosine.mean() > 0.99
    # The manifest's figures come from a sample of 4,096 rows.
    assert codec["reconstruction"]["relative_squared_error"] < 0.02
    assert codec["reconstruction"]["mean_cosine"] > 0.99


def test_compressed_store_keeps_layout_and_ids(adi_float16, tmp_path):
    derive_index(adi_float16, tmp_path / "int4", StorageOptions(compression="int4"),
                 show_progress=False)
    with StateStore(adi_float16 / STATES_FILE) as source, \
            StateStore(tmp_path / "int4" / STATES_FILE) as coded:
        assert coded.encoding == "int4"
        assert coded.doc_ids == source.doc_ids
        assert np.array_equal(coded.offsets, source.offsets)
        assert coded.document(17) == source.document(17)
        assert coded.hidden_size == source.hidden_size
        assert isinstance(coded.stored_rows_source(), np.memmap)
        parts = coded.row_ranges([(0, 3), (10, 12)])
        np.testing.assert_array_equal(parts[1], coded.rows(10, 12))
        assert parts[0].dtype == np.float16
    with h5py.File(tmp_path / "int4" / STATES_FILE, "r") as handle:
        assert STATES_DATASET not in handle
        assert handle[CODES_DATASET].shape[1] == 16


def test_manifest_records_codec_files(adi_float16, tmp_path):
    manifest = derive_index(adi_float16, tmp_path / "int8", StorageOptions(compression="int8"),
                            show_progress=False)
    assert read_manifest(tmp_path / "int8") == manifest
    assert manifest["states"]["compression"] == "int8"
    assert manifest["states"]["float16_kept"] is False
    record = manifest["files"][CODEC_FILE]
    assert record["bytes"] == (tmp_path / "int8" / CODEC_FILE).stat().st_size
    source = read_manifest(adi_float16)
    assert manifest["states"]["float16_sha256"] == source["states"]["sha256"]
    assert manifest["derived_from"]["states_sha256"] == source["states"]["sha256"]
    assert manifest["counts"] == source["counts"]
    assert manifest["bytes"] < source["bytes"]
    report = check_index(tmp_path / "int8")
    assert report.problems == []
    assert "faiss files" in report.checked


def test_keep_float16_is_explicit(adi_float16, tmp_path):
    kept = derive_index(adi_float16, tmp_path / "kept", StorageOptions(
        compression="int8", keep_float16=True), show_progress=False)
    assert kept["states"]["float16_kept"] is True
    assert kept["states"]["bytes_per_token"] == 32 + 64
    with h5py.File(tmp_path / "kept" / STATES_FILE, "r") as handle:
        assert STATES_DATASET in handle
        assert CODES_DATASET in handle
    # Search reads the codes; the kept float16 states can seed another codec.
    with StateStore(tmp_path / "kept" / STATES_FILE) as store:
        assert store.encoding == "int8"
    again = derive_index(tmp_path / "kept", tmp_path / "int4", StorageOptions(compression="int4"),
                         show_progress=False)
    assert again["states"]["float16_sha256"] == kept["states"]["float16_sha256"]
    assert check_index(tmp_path / "kept").problems == []


def test_codes_only_index_cannot_be_recompressed(adi_float16, tmp_path):
    derive_index(adi_float16, tmp_path / "int8", StorageOptions(compression="int8"),
                 show_progress=False)
    with pytest.raises(StoreError, match="contains no float16 states|not float16 states"):
        derive_index(tmp_path / "int8", tmp_path / "int4", StorageOptions(compression="int4"),
                     show_progress=False)
    assert not (tmp_path / "int4").exists()
    assert not any(path.name.startswith(".int4") for path in tmp_path.iterdir())


def test_build_with_compression_equals_derived(tiny_model, adi_float16, tmp_path):
    built = build_index(shared_collection("adi"), tmp_path / "built", model=tiny_model,
                        show_progress=False, storage=StorageOptions(compression="int8"))
    derived = derive_index(adi_float16, tmp_path / "derived", StorageOptions(compression="int8"),
                           show_progress=False)
    assert built["states"]["sha256"] == derived["states"]["sha256"]
    assert built["files"][CODEC_FILE]["sha256"] == derived["files"][CODEC_FILE]["sha256"]
    assert not (tmp_path / "built" / "shards").exists()


def test_tiny_corpus_fallback_is_logged_and_recorded(adi_float16, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="mice_engine"):
        manifest = derive_index(adi_float16, tmp_path / "pq", StorageOptions(
            compression="ivfpq8"), show_progress=False)
    codec = manifest["states"]["codec"]
    assert codec["requested"] == "ivfpq8"
    assert codec["name"] == "int8"
    assert "training vectors" in codec["fallback_reason"]
    assert any("storing int8 codes instead" in record.message for record in caplog.records)


def test_mice_scores_from_int8_stay_close(adi_float16, tiny_model, tmp_path):
    derive_index(adi_float16, tmp_path / "int8", StorageOptions(compression="int8"),
                 show_progress=False)
    exact = Searcher(adi_float16, model=tiny_model).search(QUERY, k=20, candidates=20)
    coded = Searcher(tmp_path / "int8", model=tiny_model).search(QUERY, k=20, candidates=20)
    expected = {hit.doc_id: hit.score for hit in exact.hits}
    assert {hit.doc_id for hit in coded.hits} == set(expected)
    for hit in coded.hits:
        assert hit.score == pytest.approx(expected[hit.doc_id], abs=1e-3)


def test_interaction_reads_decoded_candidates(adi_float16, tiny_model, tmp_path):
    from mice_engine.encoding import encode_query

    derive_index(adi_float16, tmp_path / "int4", StorageOptions(compression="int4"),
                 show_progress=False)
    searcher = Searcher(tmp_path / "int4", model=tiny_model)
    result = searcher.search(QUERY, k=5, candidates=5)
    store = searcher.index.store
    query, query_mask, _ = encode_query(tiny_model, QUERY)
    for hit in result.hits:
        states = torch.from_numpy(store.states(store.position(hit.doc_id)).astype(np.float32))
        with torch.no_grad():
            expected = tiny_model.score_states(query, query_mask, states[None],
                                               torch.ones(1, len(states)))
        assert hit.score == pytest.approx(float(expected), abs=1e-5)
    searcher.close()


def test_check_finds_a_modified_codec(adi_float16, tmp_path):
    derive_index(adi_float16, tmp_path / "int8", StorageOptions(compression="int8"),
                 show_progress=False)
    codec = tmp_path / "int8" / CODEC_FILE
    data = bytearray(codec.read_bytes())
    data[-5] ^= 0xFF
    codec.write_bytes(bytes(data))
    report = check_index(tmp_path / "int8")
    assert any("SHA-256 of" in problem and CODEC_FILE in problem for problem in report.problems)


def test_check_finds_a_missing_codec(adi_float16, tmp_path):
    derive_index(adi_float16, tmp_path / "int8", StorageOptions(compression="int8"),
                 show_progress=False)
    (tmp_path / "int8" / CODEC_FILE).unlink()
    report = check_index(tmp_path / "int8")
    assert any("missing" in problem for problem in report.problems)


def test_failed_derive_leaves_nothing(adi_float16, tmp_path, monkeypatch):
    from mice_engine import storage

    def fail(*args, **kwargs):
        raise OSError("simulated failure while coding")

    monkeypatch.setattr(storage, "compress_states", fail)
    with pytest.raises(OSError, match="simulated failure"):
        derive_index(adi_float16, tmp_path / "int8", StorageOptions(compression="int8"),
                     show_progress=False)
    assert list(tmp_path.iterdir()) == []


def test_derive_refuses_existing_index_without_overwrite(adi_float16, tmp_path):
    derive_index(adi_float16, tmp_path / "int8", StorageOptions(compression="int8"),
                 show_progress=False)
    with pytest.raises(MiceIndexError, match="already exists"):
        derive_index(adi_float16, tmp_path / "int8", StorageOptions(compression="int4"),
                     show_progress=False)
    manifest = derive_index(adi_float16, tmp_path / "int8", StorageOptions(compression="int4"),
                            mode="overwrite", show_progress=False)
    assert json.loads((tmp_path / "int8" / MANIFEST_FILE).read_text()) == manifest
    assert manifest["states"]["compression"] == "int4"


def test_float16_derive_copies_states(adi_float16, tmp_path):
    manifest = derive_index(adi_float16, tmp_path / "copy", StorageOptions(), show_progress=False)
    assert manifest["states"]["sha256"] == read_manifest(adi_float16)["states"]["sha256"]
    assert manifest["files"] == {}
    assert check_index(tmp_path / "copy").problems == []


def test_derive_keeps_content_checksum(adi_float16, tmp_path):
    manifest = derive_index(adi_float16, tmp_path / "int8", StorageOptions(compression="int8"),
                            show_progress=False)
    assert manifest["content_sha256"] == read_manifest(adi_float16)["content_sha256"]
    report = check_index(tmp_path / "int8")
    assert report.problems == []
    assert "content checksum" in report.checked


def test_derive_recomputes_missing_content_checksum(adi_float16, tmp_path):
    import shutil

    source = tmp_path / "old"
    shutil.copytree(adi_float16, source)
    original = json.loads((source / MANIFEST_FILE).read_text())
    without = {key: value for key, value in original.items() if key != "content_sha256"}
    (source / MANIFEST_FILE).write_text(json.dumps(without))

    manifest = derive_index(source, tmp_path / "int8", StorageOptions(compression="int8"),
                            show_progress=False)
    assert manifest["content_sha256"] == original["content_sha256"]
    report = check_index(tmp_path / "int8")
    assert report.problems == []
    assert report.notes == []


def test_derive_rejects_source_with_changed_texts(adi_float16, tmp_path):
    import shutil

    source = tmp_path / "source"
    shutil.copytree(adi_float16, source)
    with h5py.File(source / STATES_FILE, "r+") as handle:
        data = handle["texts"]["data"]
        position = int(np.flatnonzero(data[()] == ord("e"))[0])
        data[position] = ord("f")

    with pytest.raises(MiceIndexError, match=r"the texts of .* differ from its manifest's "
                                             r"content checksum.*--overwrite"):
        derive_index(source, tmp_path / "int8", StorageOptions(compression="int8"),
                     show_progress=False)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["source"]
