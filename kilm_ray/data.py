"""Moved: the preprocessing pipeline is the package ``kilm_ray.pipeline`` (its Ray Data graph reads in
``kilm_ray.pipeline.plan.preprocess``), the masked Ray Dataset is ``kilm_ray.masked_dataset``. These
names stay importable from here."""

from kilm_ray.masked_dataset import collate_fn, masked_dataset  # noqa: F401
from kilm_ray.pipeline.plan import preflight, preprocess  # noqa: F401
