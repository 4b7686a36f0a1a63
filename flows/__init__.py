"""Prefect flows: one per pipeline stage plus the parent ``pipeline`` flow.

Thin orchestration over ``easyanimate.stages``: versioning, caching, retries, MLflow logging.
"""

from easyanimate.runtime import configure_environment

configure_environment()
