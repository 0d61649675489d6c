"""Moved: the run (dataset, model, optimiser, shardings) lives in `heterrec_jax.run`, config
persistence in `heterrec_jax.config`. These names remain only for `experiments.py` until it
imports `run`; new code must not import this module."""

from heterrec_jax.run import build_model, load_dataset  # noqa: F401
