"""Clip filters: the registry and the configured, ordered list.

``FILTERS`` maps a ``curate.filters`` name to its class (protocol: ``filters.base.ClipFilter``). Its
order is the order of the filters' columns in the manifest, so reordering ``curate.filters`` (the run
order) never changes the manifest's schema. Adding a filter: a module with a ``ClipFilter`` subclass,
one line here, and its settings class in ``CurateConfig``.
"""

from __future__ import annotations

from easyanimate.data.filters.aesthetic import AestheticFilter
from easyanimate.data.filters.alignment import AlignmentFilter
from easyanimate.data.filters.base import ClipFilter, Column
from easyanimate.data.filters.dedup import DedupFilter
from easyanimate.data.filters.motion import MotionFilter
from easyanimate.data.filters.text import TextFilter
from easyanimate.data.filters.transition import TransitionFilter

FILTERS: dict[str, type[ClipFilter]] = {
    "aesthetic": AestheticFilter,
    "text": TextFilter,
    "motion": MotionFilter,
    "transition": TransitionFilter,
    "alignment": AlignmentFilter,
    "dedup": DedupFilter,
}


def filter_class(name: str) -> type[ClipFilter]:
    try:
        return FILTERS[name]
    except KeyError:
        raise ValueError(f"curate.filters: unknown filter {name!r}; registered: {', '.join(FILTERS)}") from None


def build_filters(settings) -> list[ClipFilter]:
    """Fresh instances of ``curate.filters`` in run order (models load later, in ``setup``)."""
    return [filter_class(name)(settings) for name in settings.curate.filters]


def filter_columns(names=None) -> list[Column]:
    """Manifest columns of the named filters (all registered ones if None), in registry order."""
    wanted = set(FILTERS if names is None else names)
    for name in wanted:
        filter_class(name)
    return [col for name, cls in FILTERS.items() if name in wanted for col in cls.columns]


__all__ = ["FILTERS", "ClipFilter", "Column", "build_filters", "filter_class", "filter_columns"]
