"""Selection layer: the network's model catalog, what this node learned about each
model, five advanced selection strategies, cascades and early-stopping fan-out."""

from ._catalog import CatalogEntry as CatalogEntry
from ._catalog import ModelCatalog as ModelCatalog
from ._context import CONTEXT_KEYS as CONTEXT_KEYS
from ._context import MAX_CONTEXT_KEYS as MAX_CONTEXT_KEYS
from ._context import MAX_CONTEXT_TEXT as MAX_CONTEXT_TEXT
from ._context import SelectionContext as SelectionContext
from ._context import Weights as Weights
from ._orchestrator import EnhancedModelOrchestrator as EnhancedModelOrchestrator
from ._orchestrator import ModelOrchestrator as ModelOrchestrator
from ._orchestrator import ModelRun as ModelRun
from ._orchestrator import ModelStatus as ModelStatus
from ._orchestrator import OptimizedResult as OptimizedResult
from ._orchestrator import get_enhanced_orchestrator as get_enhanced_orchestrator
from ._strategies import AdvancedModelSelectionStrategy as AdvancedModelSelectionStrategy
from ._strategies import LeftOut as LeftOut
from ._strategies import RankedModel as RankedModel
from ._strategies import Selection as Selection
from ._strategies import select as select
from ._tracker import ALL as ALL
from ._tracker import Evidence as Evidence
from ._tracker import Learned as Learned
from ._tracker import PerformanceTracker as PerformanceTracker
from ._tracker import QualityEstimate as QualityEstimate
from ._tracker import TrackerConfig as TrackerConfig

__all__ = [
    "ALL",
    "CONTEXT_KEYS",
    "MAX_CONTEXT_KEYS",
    "MAX_CONTEXT_TEXT",
    "AdvancedModelSelectionStrategy",
    "CatalogEntry",
    "EnhancedModelOrchestrator",
    "Evidence",
    "Learned",
    "LeftOut",
    "ModelCatalog",
    "ModelOrchestrator",
    "ModelRun",
    "ModelStatus",
    "OptimizedResult",
    "PerformanceTracker",
    "QualityEstimate",
    "RankedModel",
    "Selection",
    "SelectionContext",
    "TrackerConfig",
    "Weights",
    "get_enhanced_orchestrator",
    "select",
]
