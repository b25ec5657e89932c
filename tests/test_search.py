"""Search over a real index of the ADI collection: candidates, scoring, ranking, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import shared_collection

from mice_engine.indexing import MANIFEST_FILE, MiceIndexError, build_index
from mice_engine.model import MiceModel
from mice_engine.search import Index, Searcher, latency_summary, rank_order

QUERY = "information retrieval system for document search"


@pytest.fixture(scope="module")
def tiny_model(tiny_backbone):
    return MiceModel.from_backbone(tiny_backbone, merge_layer=2, interaction_layers=2,
                                   query_max_length=16, doc_max_length=64, seed=11)


@pytest.fixture(scope="module")
def adi_index(tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("adi") / "index"
    build_index(shared_collection("adi"), folder, model=tiny_model, show_progress=False)
    return folder


@pytest.fixture(scope="module")
def searcher(adi_index, tiny_model):
    searcher = Searcher(adi_index, model=tiny_model)
    yield searcher
    searcher.close()


def test_rank_order_breaks_ties_by_descending_id():
    order = rank_order(["b", "a", "c", "d"], np.array([1.0, 2.0, 1.0, 1.0]))
    assert order == [1, 3, 2, 0]


def test_hits_are_sorted_by_score(searcher):
    result = searcher.search(QUERY, k=10, candidates=50)
    scores = [hit.score for hit in result.hits]
    assert len(result.hits) == 10
    assert scores == sorted(scores, reverse=True)
    assert [hit.rank for hit in result.hits] == list(range(1, 11))


def test_scores_equal_unbatched_scoring_from_store(searcher, tiny_model):
    from mice_engine.encoding import encode_query

    result = searcher.search(QUERY, k=20, candidates=20)
    store = searcher.index.store
    query, query_mask, _ = encode_query(tiny_model, QUERY)
    for hit in result.hits:
        states = torch.from_numpy(store.states(store.position(hit.doc_id)).astype(np.float32))
        with torch.no_grad():
            expected = tiny_model.score_states(query, query_mask, states[None],
                                               torch.ones(1, len(states)))
        assert hit.score == pytest.approx(float(expected), abs=1e-5)


def test_batch_size_does_not_change_ranking(adi_index, tiny_model, searcher):
    small = Searcher(adi_index, model=tiny_model, batch_size=3)
    batched = searcher.search(QUERY, k=30, candidates=30)
    one_by_one = small.search(QUERY, k=30, candidates=30)
    # Compared by id: the tiny model's vocabulary leaves many near-ties whose order may flip.
    expected = {hit.doc_id: hit.score for hit in one_by_one.hits}
    assert {hit.doc_id for hit in batched.hits} == set(expected)
    for hit in batched.hits:
        assert hit.score == pytest.approx(expected[hit.doc_id], abs=1e-5)
    small.close()


def test_first_stage_only_returns_bm25_ranking(searcher):
    result = searcher.search(QUERY, k=10, candidates=10, first_stage_only=True)
    rows, scores = searcher.index.bm25.retrieve(QUERY, 10)
    assert [hit.doc_id for hit in result.hits] == [searcher.index.store.doc_ids[r] for r in rows]
    assert [hit.score for hit in result.hits] == pytest.approx(scores.tolist())
    assert [hit.first_stage_rank for hit in result.hits] == list(range(1, 11))


def test_mice_reranks_only_bm25_candidates(searcher):
    bm25 = searcher.search(QUERY, k=15, candidates=15, first_stage_only=True)
    mice = searcher.search(QUERY, k=15, candidates=15)
    assert {hit.doc_id for hit in mice.hits} == {hit.doc_id for hit in bm25.hits}


def test_k_larger_than_collection(searcher):
    result = searcher.search(QUERY, k=500, candidates=1000)
    assert result.candidates <= 82
    assert len(result.hits) == result.candidates


def test_query_without_known_terms_returns_nothing(searcher):
    result = searcher.search("zzzqqq xxyyzz", k=10)
    assert result.hits == []
    assert result.candidates == 0


def test_query_that_looks_like_a_flag(searcher):
    result = searcher.search("--retrieval -k", k=5)
    assert len(result.hits) == 5


def test_candidates_fewer_than_k_is_rejected(searcher):
    with pytest.raises(ValueError, match="candidates"):
        searcher.search(QUERY, k=10, candidates=5)


def test_hits_carry_text_when_asked(searcher):
    hit = searcher.search(QUERY, k=1, with_text=True).hits[0]
    document = searcher.index.store.document(searcher.index.store.position(hit.doc_id))
    assert hit.text == document.text
    assert hit.title == document.title


def test_timings_cover_every_stage(searcher):
    result = searcher.search(QUERY, k=5)
    assert set(result.timings) == {"first_stage", "query_encoding", "load_states", "interaction"}
    assert all(value >= 0 for value in result.timings.values())
    summary = latency_summary([result.timings, result.timings])
    assert summary["total"]["p50_ms"] == pytest.approx(sum(result.timings.values()) * 1000)


def test_model_with_other_lower_layers_is_rejected(adi_index, tiny_backbone):
    other = MiceModel.from_backbone(tiny_backbone, merge_layer=1, interaction_layers=2,
                                    query_max_length=16, doc_max_length=64)
    with pytest.raises(MiceIndexError, match="other lower layers"):
        Searcher(adi_index, model=other)


def test_model_with_other_head_is_accepted(adi_index, tiny_backbone):
    other = MiceModel.from_backbone(tiny_backbone, merge_layer=2, interaction_layers=2,
                                    query_max_length=16, doc_max_length=64, seed=99)
    searcher = Searcher(adi_index, model=other)
    assert len(searcher.search(QUERY, k=3).hits) == 3
    searcher.close()


def test_index_reloads_its_own_model(adi_index, tiny_model):
    index = Index(adi_index)
    model = index.load_model()
    assert model.weights_sha256() == tiny_model.weights_sha256()
    index.close()


def test_folder_without_manifest_is_rejected(adi_index, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(adi_index, copy)
    (copy / MANIFEST_FILE).unlink()
    with pytest.raises(MiceIndexError, match="no manifest.json"):
        Index(copy)


def test_missing_index_is_rejected(tmp_path):
    with pytest.raises(MiceIndexError, match="does not exist"):
        Index(tmp_path / "nowhere")


def test_query_in_other_scripts(searcher):
    for query in ("信息检索系统", "استرجاع المعلومات", "поиск документов", "🙂 retrieval"):
        result = searcher.search(query, k=5)
        assert len(result.hits) <= 5
        assert all(np.isfinite(hit.score) for hit in result.hits)


def test_empty_query_returns_nothing(searcher):
    assert searcher.search("", k=5).hits == []
    assert searcher.search("   ", k=5).hits == []


def test_repeated_runs_write_identical_files(adi_index, tmp_path):
    from mice_engine.evaluation import write_trec_run
    from mice_engine.sources import read_queries

    queries = read_queries(shared_collection("adi"))[:10]
    for name in ("first.trec", "second.trec"):
        searcher = Searcher(adi_index)
        run = {q.id: [(h.doc_id, h.score) for h in searcher.search(q.text, k=20).hits]
               for q in queries}
        write_trec_run(tmp_path / name, run, "mice")
        searcher.close()
    assert (tmp_path / "first.trec").read_bytes() == (tmp_path / "second.trec").read_bytes()


SEARCH_SCRIPT = """
import json, sys
from mice_engine.search import Searcher
searcher = Searcher(sys.argv[1])
hits = searcher.search(sys.argv[2], k=10).hits
print(json.dumps([[hit.doc_id, hit.score] for hit in hits]))
"""


def test_concurrent_searches_agree(adi_index):
    import json
    import subprocess
    import sys

    from conftest import REPO

    processes = [
        subprocess.Popen([sys.executable, "-c", SEARCH_SCRIPT, str(adi_index), QUERY], cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    outputs = [process.communicate(timeout=300) for process in processes]
    for process, (stdout, stderr) in zip(processes, outputs):
        assert process.returncode == 0, stderr
    results = [json.loads(stdout) for stdout, _ in outputs]
    assert len(results[0]) == 10
    assert results[1] == results[0]
    assert results[2] == results[0]


def test_search_during_build_is_rejected_clearly(tiny_model, tmp_path):
    def stop(position):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_index(shared_collection("adi"), tmp_path / "index", model=tiny_model,
                    chunk_size=20, show_progress=False, progress_callback=stop)
    with pytest.raises(MiceIndexError, match="incomplete: its build was interrupted or is still"):
        Searcher(tmp_path / "index")


def test_fuse_scores_standardises_and_blends():
    from mice_engine.search import fuse_scores

    mice = np.array([3.0, 1.0, 2.0])
    bm25 = np.array([10.0, 30.0, 20.0])
    np.testing.assert_array_equal(fuse_scores(mice, bm25, 0.0), mice.astype(np.float32))
    z = np.sqrt(1.5)  # each list has standard deviation sqrt(2/3): z-scores are +-sqrt(3/2), 0
    np.testing.assert_allclose(fuse_scores(mice, bm25, 1.0), [-z, z, 0.0], atol=1e-6)
    np.testing.assert_allclose(fuse_scores(mice, bm25, 0.5), [0.0, 0.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(fuse_scores(mice, np.ones(3), 0.5), [z / 2, -z / 2, 0.0], atol=1e-6)
    with pytest.raises(ValueError, match="between 0 and 1"):
        fuse_scores(mice, bm25, 1.5)


def test_model_with_a_blend_weight_ranks_by_the_blend(adi_index, tiny_backbone):
    from mice_engine.search import fuse_scores

    model = MiceModel.from_backbone(tiny_backbone, merge_layer=2, interaction_layers=2,
                                    query_max_length=32, doc_max_length=64)
    plain = Searcher(adi_index, model=model).search(QUERY, k=20, candidates=20)
    model.config.fusion = {"first_stage": "bm25", "first_stage_weight": 0.4}
    blended = Searcher(adi_index, model=model).search(QUERY, k=20, candidates=20)
    alone = Searcher(adi_index, model=model, fusion=False).search(QUERY, k=20, candidates=20)
    assert [h.doc_id for h in alone.hits] == [h.doc_id for h in plain.hits]
    by_id = {h.doc_id: h for h in plain.hits}
    mice = np.array([by_id[h.doc_id].score for h in plain.hits])
    bm25 = np.array([by_id[h.doc_id].first_stage_score for h in plain.hits])
    expected = fuse_scores(mice, bm25, 0.4)
    expected_by_id = {h.doc_id: expected[i] for i, h in enumerate(plain.hits)}
    for hit in blended.hits:
        assert hit.score == pytest.approx(float(expected_by_id[hit.doc_id]), abs=1e-5)
    assert [h.score for h in blended.hits] == sorted((h.score for h in blended.hits), reverse=True)


def test_fuse_scores_with_maxsim_matches_hand_computation():
    from mice_engine.search import fuse_scores

    mice = np.array([3.0, 1.0, 2.0])
    bm25 = np.array([10.0, 30.0, 20.0])
    maxsim = np.array([0.2, 0.4, 0.9])
    z = np.sqrt(1.5)
    # maxsim: mean 0.5, deviation sqrt(0.26/3); its z-scores
    zm = (maxsim - 0.5) / np.sqrt(0.26 / 3)
    expected = 0.5 * np.array([z, -z, 0.0]) + 0.2 * np.array([-z, z, 0.0]) + 0.3 * zm
    np.testing.assert_allclose(fuse_scores(mice, bm25, 0.2, maxsim, 0.3), expected, atol=1e-6)
    np.testing.assert_allclose(fuse_scores(mice, bm25, 0.0, maxsim, 1.0), zm, atol=1e-6)
    np.testing.assert_allclose(fuse_scores(mice, bm25, 0.2, maxsim, 0.0),
                               fuse_scores(mice, bm25, 0.2), atol=1e-7)
    with pytest.raises(ValueError, match="maxsim_weight must be between 0 and 1 - "):
        fuse_scores(mice, bm25, 0.8, maxsim, 0.3)
    with pytest.raises(ValueError, match="no MaxSim scores"):
        fuse_scores(mice, bm25, 0.2, None, 0.3)


def test_maxsim_scores_match_a_direct_computation():
    import torch
    import torch.nn.functional as F

    from mice_engine.model import maxsim_scores

    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(3, 6, 8, generator=generator)
    query_mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]]).bool()
    docs = torch.randn(3, 5, 8, generator=generator)
    doc_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]]).bool()

    def direct(q, q_mask, d, d_mask):
        length = int(q_mask.sum())
        terms = range(1, length - 1)  # not [CLS], not the final [SEP]
        best = [max(float(F.cosine_similarity(q[i], d[j], dim=0))
                    for j in range(d.shape[0]) if d_mask[j]) for i in terms]
        return sum(best) / len(best)

    per_pair = maxsim_scores(queries, query_mask, docs, doc_mask)
    for b in range(3):
        assert float(per_pair[b]) == pytest.approx(
            direct(queries[b], query_mask[b], docs[b], doc_mask[b]), abs=1e-5)
    shared = maxsim_scores(queries[:1], query_mask[:1], docs, doc_mask)
    for b in range(3):
        assert float(shared[b]) == pytest.approx(
            direct(queries[0], query_mask[0], docs[b], doc_mask[b]), abs=1e-5)


def test_model_with_a_maxsim_blend_ranks_by_it(adi_index, tiny_backbone):
    """The blend's MaxSim term equals MaxSim computed on the states read from the HDF5 file."""
    import torch

    from mice_engine.encoding import encode_query
    from mice_engine.model import maxsim_scores
    from mice_engine.search import fuse_scores

    model = MiceModel.from_backbone(tiny_backbone, merge_layer=2, interaction_layers=2,
                                    query_max_length=32, doc_max_length=64)
    plain = Searcher(adi_index, model=model).search(QUERY, k=20, candidates=20)
    model.config.fusion = {"first_stage": "bm25", "first_stage_weight": 0.3,
                           "maxsim_weight": 0.4}
    searcher = Searcher(adi_index, model=model)
    blended = searcher.search(QUERY, k=20, candidates=20)
    store = searcher.index.store
    query_states, query_mask, _ = encode_query(model, QUERY)
    maxsim = []
    for hit in plain.hits:
        start, end = store.windows(store.position(hit.doc_id))[0]
        states = torch.from_numpy(store.rows(start, end).astype(np.float32))[None]
        maxsim.append(float(maxsim_scores(query_states, query_mask, states,
                                          torch.ones(1, end - start))[0]))
    mice = np.array([h.score for h in plain.hits])
    bm25 = np.array([h.first_stage_score for h in plain.hits])
    expected = fuse_scores(mice, bm25, 0.3, np.array(maxsim), 0.4)
    expected_by_id = {h.doc_id: expected[i] for i, h in enumerate(plain.hits)}
    assert len(set(maxsim)) > 1
    for hit in blended.hits:
        assert hit.score == pytest.approx(float(expected_by_id[hit.doc_id]), abs=1e-5)
    assert [h.score for h in blended.hits] == sorted((h.score for h in blended.hits), reverse=True)
    searcher.close()


@pytest.mark.parametrize("fusion", [
    {"first_stage": "bm25", "first_stage_weight": 0.8, "maxsim_weight": 0.3},
    {"first_stage": "bm25", "first_stage_weight": -0.1},
    {"first_stage": "bm25", "first_stage_weight": 0.2, "maxsim_weight": "high"},
    {"first_stage": "bm25", "first_stage_scale": "abc"},
    {"first_stage": "bm25", "first_stage_scale": float("nan")},
    {"first_stage": "bm25", "first_stage_scale": 0.5, "maxsim_weight": 0.3},
    "x",
    [0.3, 0.35],
])
def test_invalid_blend_config_fails_when_the_searcher_opens(adi_index, tiny_backbone, fusion):
    from mice_engine.model import ModelError

    model = MiceModel.from_backbone(tiny_backbone, merge_layer=2, interaction_layers=2,
                                    query_max_length=32, doc_max_length=64)
    model.config.fusion = fusion
    with pytest.raises(ModelError, match="fix mice_config.json or retrain the model"):
        Searcher(adi_index, model=model)


def test_model_trained_with_a_bm25_term_ranks_by_the_sum(adi_index, tiny_backbone):
    model = MiceModel.from_backbone(tiny_backbone, merge_layer=2, interaction_layers=2,
                                    query_max_length=32, doc_max_length=64)
    plain = Searcher(adi_index, model=model).search(QUERY, k=20, candidates=20)
    model.config.fusion = {"first_stage": "bm25", "mode": "sum", "first_stage_scale": 0.7}
    summed = Searcher(adi_index, model=model).search(QUERY, k=20, candidates=20)
    expected = {h.doc_id: h.score + 0.7 * h.first_stage_score for h in plain.hits}
    assert {h.doc_id for h in summed.hits} == set(expected)
    for hit in summed.hits:
        assert hit.score == pytest.approx(expected[hit.doc_id], abs=1e-4)
    assert [h.score for h in summed.hits] == sorted((h.score for h in summed.hits), reverse=True)


def test_peak_memory_is_not_the_parent_process_peak():
    import json
    import subprocess
    import sys

    # A parent with a large resident set starts a small child: the child's reported peak must
    # be its own. ru_maxrss alone would report the parent's 400 MiB.
    ballast = bytearray(400 * 2**20)
    ballast[:: 4096] = b"x" * len(ballast[:: 4096])
    code = ("import json; from mice_engine.search import resident_memory_mib; "
            "print(json.dumps(resident_memory_mib()))")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                               check=True)
    child = json.loads(completed.stdout)
    assert child["peak_rss_mib"] < 300
    assert child["peak_rss_mib"] >= child["rss_mib"] > 0
    assert len(ballast) == 400 * 2**20
