"""First-stage retrieval: BM25 over the same documents, in the same order, as the state store."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

BM25_DIR = "bm25"
_SETTINGS_FILE = "mice_bm25.json"


class BM25FirstStage:
    """BM25 (Lucene variant, k1=0.9, b=0.4 as in Anserini's defaults) built with bm25s.

    Text is lower-cased, split on word characters, stripped of English stop words and stemmed
    with the Snowball English stemmer. Document ``i`` of the BM25 index is row ``i`` of the
    state store.
    """

    def __init__(self, retriever, tokenizer, settings: dict) -> None:
        self._retriever = retriever
        self._tokenizer = tokenizer
        self.settings = settings

    @staticmethod
    def _make_tokenizer(settings: dict):
        import bm25s.tokenization
        import Stemmer

        stemmer = Stemmer.Stemmer(settings["stemmer"]) if settings["stemmer"] else None
        return bm25s.tokenization.Tokenizer(
            lower=True, stopwords=settings["stopwords"], stemmer=stemmer
        )

    @classmethod
    def build(cls, texts: Sequence[str], *, k1: float = 0.9, b: float = 0.4,
              stemmer: str | None = "english", show_progress: bool = False) -> BM25FirstStage:
        import bm25s

        # bm25s logs every build at DEBUG level through a handler of its own.
        logging.getLogger("bm25s").setLevel(logging.WARNING)
        settings = {"k1": k1, "b": b, "method": "lucene", "stemmer": stemmer,
                    "stopwords": "en", "documents": len(texts)}
        tokenizer = cls._make_tokenizer(settings)
        corpus_tokens = tokenizer.tokenize(list(texts), show_progress=show_progress,
                                           return_as="tuple")
        retriever = bm25s.BM25(k1=k1, b=b, method="lucene")
        retriever.index(corpus_tokens, show_progress=show_progress)
        return cls(retriever, tokenizer, settings)

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self._retriever.save(str(folder), show_progress=False)
        self._tokenizer.save_vocab(str(folder))
        (folder / _SETTINGS_FILE).write_text(json.dumps(self.settings, indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path) -> BM25FirstStage:
        import bm25s

        settings = json.loads((folder / _SETTINGS_FILE).read_text())
        retriever = bm25s.BM25.load(str(folder), mmap=True, show_progress=False)
        tokenizer = cls._make_tokenizer(settings)
        tokenizer.load_vocab(str(folder))
        return cls(retriever, tokenizer, settings)

    @property
    def num_documents(self) -> int:
        return int(self.settings["documents"])

    def score_all(self, query: str) -> np.ndarray:
        """BM25 score of every document for ``query``, in row order (0 without a shared term)."""
        ids = self._tokenizer.tokenize([query], update_vocab=False, show_progress=False,
                                       return_as="ids")[0]
        unknown = self._tokenizer.get_vocab_dict().get("")
        ids = [token for token in ids if token != unknown]
        if not ids:
            return np.zeros(self.num_documents, dtype=np.float32)
        return np.asarray(self._retriever.get_scores(ids), dtype=np.float32)

    def retrieve(self, query: str, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Return (document rows, scores) of the top ``k`` documents, best first.

        Only documents with a positive score are returned: a document that shares no term with
        the query is no candidate, so the list can be shorter than ``k``, or empty.
        """
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        ids = self._tokenizer.tokenize([query], update_vocab=False, show_progress=False,
                                       return_as="ids")[0]
        # Words never seen in the corpus come back as the empty-string token; they cannot match.
        unknown = self._tokenizer.get_vocab_dict().get("")
        ids = [token for token in ids if token != unknown]
        if not ids:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        k = min(k, self.num_documents)
        rows, scores = self._retriever.retrieve([ids], k=k, show_progress=False, n_threads=1)
        rows, scores = rows[0].astype(np.int64), scores[0].astype(np.float32)
        keep = scores > 0
        return rows[keep], scores[keep]
