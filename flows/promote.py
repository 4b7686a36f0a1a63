"""Gated promotion lives in ``easyanimate.registry``; re-exported here for flows that still import it."""

from easyanimate.registry import promote_version

__all__ = ["promote_version"]
