"""Dense and hybrid first stages over real FAISS indexes of real token states."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pytest
from typer.testing import CliRunner

from cli.main import app
from conftest import shared_collection
from mice_engine.check import check_index
from mice_engine.dense import (DENSE_FILE, DenseFirstStage, aggregate_token_matches,
                               build_dense_index, inverted_lists, maxsim_scores,
                               query_token_vectors, reciprocal_rank_fusion)
from mice_engine.encoding import encode_query
from mice_engine.indexing import MiceIndexError, build_index, read_manifest
from mice_engine.model import MiceModel
from mice_engine.search import Searcher
from mice_engine.storage import StorageOptions, derive_index
from mice_engine.store import STATES_FILE, StateStore

QUERIES = ("information retrieval system for document search", "the effect of data on a model",
           "high pressure flow")


@pytest.fixture(scope="module")
def tiny_model(tiny_backbone):
    return MiceModel.from_backbone(tiny_backbone, merge_layer=2, interaction_layers=2,
                                   query_max_length=16, doc_max_length=64, seed=11)


@pytest.fixture(scope="module")
def adi_dense(tiny_model, tmp_path_factory):
    """ADI with an exact (flat) dense index: about 5,000 token states."""
    folder = tmp_path_factory.mktemp("adi") / "index"
    build_index(shared_collection("adi"), folder, model=tiny_model, show_progress=False,
                storage=StorageOptions(dense=True))
    return folder


@pytest.fixture(scope="module")
def cranfield_dense(tiny_model, tmp_path_factory):
    """Cranfield cut to 64 tokens per document, with an ivfpq dense index and an exact one."""
    folder = tmp_path_factory.mktemp("cranfield") / "index"
    build_index(shared_collection("cranfield"), folder, model=tiny_model, show_progress=False,
                batch_size=64, storage=StorageOptions(dense=True, dense_kind="ivfpq"))
    with StateStore(folder / STATES_FILE) as store:
        record = build_dense_index(store, folder / "flat.faiss", "flat")
    return folder, record


def query_states(model, text):
    states, mask, _ = encode_query(model, text)
    return states[0][mask[0].bool()].float().numpy()


def normalised_rows(store):
    rows = store.rows(0, store.num_tokens).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_inverted_lists_follow_token_count():
    assert inverted_lists(297_346, 131_072) == 2048
    assert inverted_lists(1_693_234, 131_072) == 2048
    assert inverted_lists(40_000, 40_000) == 512
    assert inverted_lists(10_000, 10_000) == 256


def test_aggregation_sums_best_match_per_token():
    offsets = np.array([0, 3, 5, 9])  # documents own rows 0-2, 3-4 and 5-8
    rows = np.array([[0, 1, 3, -1], [4, 2, 6, 5]])
    similarities = np.array([[0.9, 0.8, 0.5, 0.0], [0.7, 0.6, 0.4, 0.3]], dtype=np.float32)
    documents, scores = aggregate_token_matches(similarities, rows, offsets)
    assert documents.tolist() == [0, 1, 2]
    # Document 0: best of token 0 is 0.9 (row 0), best of token 1 is 0.6 (row 2).
    assert scores.tolist() == pytest.approx([0.9 + 0.6, 0.5 + 0.7, 0.4])


def test_reciprocal_rank_fusion_by_hand():
    rows, scores = reciprocal_rank_fusion([np.array([7, 3, 5]), np.array([3, 9])], depth=3, k=60)
    assert rows.tolist() == [3, 7, 9]
    assert scores[0] == pytest.approx(1 / 62 + 1 / 61)
    assert scores[1] == pytest.approx(1 / 61)
    assert scores[2] == pytest.approx(1 / 62)
    empty_rows, _ = reciprocal_rank_fusion([np.array([], dtype=np.int64)], depth=5)
    assert empty_rows.tolist() == []


def test_flat_dense_equals_brute_force(adi_dense, tiny_model):
    manifest = read_manifest(adi_dense)
    assert manifest["first_stage"]["dense"]["kind"] == "flat"
    with StateStore(adi_dense / STATES_FILE) as store:
        dense = DenseFirstStage.load(adi_dense / DENSE_FILE, store.offsets,
                                     manifest["first_stage"]["dense"])
        everything = store.num_tokens
        rows = normalised_rows(store)
        for text in QUERIES:
            states = query_states(tiny_model, text)
            # With every stored token as a neighbour, each document's score is its exact
            # late-interaction score.
            documents, scores = dense.retrieve(states, len(store), token_candidates=everything)
            exact = maxsim_scores(states, [store.states(i) for i in range(len(store))])
            assert sorted(documents.tolist()) == list(range(len(store)))
            np.testing.assert_allclose(scores, exact[documents], atol=1e-4)

            # With 40 neighbours per token: the same as a numpy top-40 per query token.
            vectors = query_token_vectors(states)
            similarities = vectors @ rows.T
            top = np.argsort(-similarities, axis=1, kind="stable")[:, :40]
            expected_documents, expected_scores = aggregate_token_matches(
                np.take_along_axis(similarities, top, axis=1), top, store.offsets)
            order = np.lexsort((expected_documents, -expected_scores))[:20]
            documents, scores = dense.retrieve(states, 20, token_candidates=40)
            np.testing.assert_allclose(scores, expected_scores[order], atol=1e-4)
            # Documents with equal scores (the tiny model gives some documents identical
            # states) may come in either order; every other position must match.
            gaps = np.abs(scores[:, None] - scores[None, :]) < 1e-4
            untied = gaps.sum(axis=1) == 1
            assert documents[untied].tolist() == expected_documents[order][untied].tolist()


def test_ivfpq_dense_finds_flat_neighbours(cranfield_dense, tiny_model):
    folder, flat_record = cranfield_dense
    manifest = read_manifest(folder)
    record = manifest["first_stage"]["dense"]
    assert record["kind"] == "ivfpq"
    assert record["pq_bytes"] == 4
    with StateStore(folder / STATES_FILE) as store:
        approximate = DenseFirstStage.load(folder / DENSE_FILE, store.offsets, record)
        exact = DenseFirstStage.load(folder / "flat.faiss", store.offsets, flat_record)
        overlaps = []
        for text in QUERIES:
            states = query_states(tiny_model, text)
            truth, _ = exact.retrieve(states, 100)
            found, _ = approximate.retrieve(states, 100, nprobe=record["inverted_lists"])
            overlaps.append(len(set(truth.tolist()) & set(found.tolist())) / 100)
    # PQ codes of 4 bytes for 32 dimensions lose detail, but most of the exact top 100 stays.
    assert np.mean(overlaps) > 0.5


def test_nprobe_is_per_call(cranfield_dense, tiny_model):
    folder, _ = cranfield_dense
    record = read_manifest(folder)["first_stage"]["dense"]
    with StateStore(folder / STATES_FILE) as store:
        dense = DenseFirstStage.load(folder / DENSE_FILE, store.offsets, record)
        states = query_states(tiny_model, QUERIES[0])
        before = dense.retrieve(states, 50)
        narrow = dense.retrieve(states, 50, nprobe=1)
        after = dense.retrieve(states, 50)
        assert dense._index.nprobe == 1  # FAISS's own default, never changed by a search
    assert before[0].tolist() == after[0].tolist()
    assert before[0].tolist() != narrow[0].tolist()


def test_dense_index_is_memory_mapped(cranfield_dense):
    folder, _ = cranfield_dense
    record = read_manifest(folder)["first_stage"]["dense"]
    with StateStore(folder / STATES_FILE) as store:
        dense = DenseFirstStage.load(folder / DENSE_FILE, store.offsets, record)
        lists = faiss.downcast_InvertedLists(dense._index.invlists)
        assert isinstance(lists, faiss.OnDiskInvertedLists)


def test_hybrid_fuses_bm25_and_dense(adi_dense, tiny_model):
    searcher = Searcher(adi_dense, model=tiny_model)
    text = QUERIES[0]
    bm25 = searcher.search(text, k=10, candidates=10, first_stage_only=True)
    dense = searcher.search(text, k=10, candidates=10, first_stage_only=True,
                            first_stage="dense")
    hybrid = searcher.search(text, k=10, candidates=10, first_stage_only=True,
                             first_stage="hybrid")
    union = {hit.doc_id for hit in bm25.hits} | {hit.doc_id for hit in dense.hits}
    assert {hit.doc_id for hit in hybrid.hits} <= union
    ranks = {name: {hit.doc_id: hit.rank for hit in result.hits}
             for name, result in (("bm25", bm25), ("dense", dense))}
    for hit in hybrid.hits:
        expected = sum(1 / (60 + ranks[name][hit.doc_id]) for name in ranks
                       if hit.doc_id in ranks[name])
        assert hit.score == pytest.approx(expected, rel=1e-5)
    assert hybrid.first_stage == "hybrid"
    searcher.close()


def test_mice_reranks_dense_candidates(adi_dense, tiny_model):
    searcher = Searcher(adi_dense, model=tiny_model)
    first = searcher.search(QUERIES[1], k=15, candidates=15, first_stage="dense",
                            first_stage_only=True)
    mice = searcher.search(QUERIES[1], k=15, candidates=15, first_stage="dense")
    assert {hit.doc_id for hit in mice.hits} == {hit.doc_id for hit in first.hits}
    assert mice.timings["query_encoding"] > 0
    searcher.close()


def test_dense_search_needs_dense_index(tiny_model, tmp_path):
    build_index(shared_collection("adi"), tmp_path / "plain", model=tiny_model,
                show_progress=False)
    searcher = Searcher(tmp_path / "plain", model=tiny_model)
    with pytest.raises(MiceIndexError, match="has no dense index"):
        searcher.search(QUERIES[0], first_stage="dense")
    with pytest.raises(ValueError, match="first_stage must be one of"):
        searcher.search(QUERIES[0], first_stage="splade")
    searcher.close()


def test_derive_copies_or_builds_dense(adi_dense, tmp_path):
    copied = derive_index(adi_dense, tmp_path / "copied", StorageOptions(compression="int8"),
                          show_progress=False)
    assert copied["first_stage"]["dense"] == read_manifest(adi_dense)["first_stage"]["dense"]
    assert (tmp_path / "copied" / DENSE_FILE).read_bytes() == (adi_dense / DENSE_FILE).read_bytes()
    dropped = derive_index(adi_dense, tmp_path / "dropped", StorageOptions(
        compression="int8", dense=False), show_progress=False)
    assert "dense" not in dropped["first_stage"]
    assert DENSE_FILE not in dropped["files"]
    assert not (tmp_path / "dropped" / DENSE_FILE).exists()
    for name in ("copied", "dropped"):
        assert check_index(tmp_path / name).problems == []


def test_check_finds_a_truncated_dense_index(adi_dense, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(adi_dense, copy)
    data = (copy / DENSE_FILE).read_bytes()
    (copy / DENSE_FILE).write_bytes(data[: len(data) // 2])
    report = check_index(copy)
    assert any("bytes but the manifest lists" in problem for problem in report.problems)


@pytest.mark.parametrize("size", [1, 3])
def test_tiny_corpora_index_and_search(tiny_model, tmp_path, size):
    corpus = tmp_path / "corpus.jsonl"
    texts = ["information retrieval of the data", "heat flow in the boundary layer",
             "cancer cells and the blood"][:size]
    corpus.write_text("".join(json.dumps({"_id": f"d{i}", "title": "", "text": text}) + "\n"
                              for i, text in enumerate(texts)))
    manifest = build_index(corpus, tmp_path / "index", model=tiny_model, show_progress=False,
                           storage=StorageOptions(compression="ivfpq8", dense=True))
    assert manifest["states"]["codec"]["name"] == "int8"
    assert manifest["first_stage"]["dense"]["kind"] == "flat"
    assert check_index(tmp_path / "index").problems == []
    searcher = Searcher(tmp_path / "index", model=tiny_model)
    for first_stage in ("bm25", "dense", "hybrid"):
        for first_stage_only in (True, False):
            result = searcher.search("retrieval of data", k=5, candidates=10,
                                     first_stage=first_stage, first_stage_only=first_stage_only)
            assert 1 <= len(result.hits) <= size
            assert all(np.isfinite(hit.score) for hit in result.hits)
    assert searcher.search("", first_stage="dense").hits == []
    searcher.close()


def test_cli_compress_and_dense_search(adi_dense, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["compress", str(adi_dense), "--output", str(tmp_path / "int8"),
                                 "--compression", "int8", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "states: int8, 32 bytes per stored token" in result.stdout
    assert "dense index: flat" in result.stdout
    result = runner.invoke(app, ["search", str(tmp_path / "int8"), QUERIES[0], "--first-stage",
                                 "hybrid", "--first-stage-only", "--format", "json", "--quiet"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["system"] == "hybrid"
    assert payload["memory_mib"]["peak_rss_mib"] > 0
    assert len(payload["hits"]) == 10
    result = runner.invoke(app, ["check", str(tmp_path / "int8")])
    assert result.exit_code == 0, result.output
    assert "faiss files" in result.stdout


def test_cli_rejects_bad_compression(adi_dense, tmp_path):
    result = CliRunner().invoke(app, ["compress", str(adi_dense), "--output",
                                      str(tmp_path / "bad"), "--compression", "ivfpq5"])
    assert result.exit_code == 2
    assert "M = 5 must divide the hidden size 32" in result.output
    assert not (tmp_path / "bad").exists()
