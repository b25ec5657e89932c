"""mice-engine: a retrieval engine for MICE (Minimal Interaction Cross-Encoders).

The pipeline, one module per step: :mod:`~mice_engine.sources` reads corpora, queries and
judgments; :mod:`~mice_engine.model` is the MICE model; :mod:`~mice_engine.encoding` runs its
lower layers; :mod:`~mice_engine.store` keeps per-token states in HDF5;
:mod:`~mice_engine.indexing` builds an index folder; :mod:`~mice_engine.first_stage` retrieves
candidates; :mod:`~mice_engine.search` scores them with the interaction layers;
:mod:`~mice_engine.evaluation` writes runs and computes metrics.

Importing this package is cheap: torch and transformers load with the modules that need them.
"""

__version__ = "0.1.0"
