"""Scheduling plugins, registered by type name (an explicit table, not import side effects)."""

from __future__ import annotations

from agora.router.plugins.base import Filter, Picker, Plugin, Scorer
from agora.router.plugins.filters import LoadBalanceFilter
from agora.router.plugins.pickers import MaxScorePicker, RandomPicker, RoundRobinPicker
from agora.router.plugins.scorers import (
    InFlightScorer,
    KVCacheScorer,
    PrefixCacheScorer,
    QueueScorer,
    SessionAffinityScorer,
)

PLUGIN_TYPES: dict[str, type[Plugin]] = {
    cls.type_name: cls
    for cls in (
        LoadBalanceFilter,
        PrefixCacheScorer,
        SessionAffinityScorer,
        InFlightScorer,
        QueueScorer,
        KVCacheScorer,
        MaxScorePicker,
        RandomPicker,
        RoundRobinPicker,
    )
}

__all__ = ["PLUGIN_TYPES", "Filter", "Picker", "Plugin", "Scorer"]
