"""Scheduler layer: distributed execution. Requests, the error vocabulary, placement
strategies over a node's view, and the orchestrator that runs, retries and hedges."""

from ._chain import ChainHop as ChainHop
from ._chain import ChainPlan as ChainPlan
from ._chain import StageOffer as StageOffer
from ._chain import complete_chains as complete_chains
from ._chain import estimate_whole as estimate_whole
from ._chain import offers_from_ids as offers_from_ids
from ._chain import plan_chain as plan_chain
from ._errors import ErrorCode as ErrorCode
from ._errors import JobError as JobError
from ._node_info import NO_REQUIREMENTS as NO_REQUIREMENTS
from ._node_info import GpuNeed as GpuNeed
from ._node_info import NodeIndex as NodeIndex
from ._node_info import NodeInfo as NodeInfo
from ._node_info import Requirements as Requirements
from ._orchestrator import DistributedModelOrchestrator as DistributedModelOrchestrator
from ._orchestrator import ModelOutcome as ModelOutcome
from ._orchestrator import OrchestratorConfig as OrchestratorConfig
from ._orchestrator import ParallelResult as ParallelResult
from ._orchestrator import get_distributed_orchestrator as get_distributed_orchestrator
from ._orchestrator import majority_vote as majority_vote
from ._orchestrator import mean as mean
from ._request import InferenceRequest as InferenceRequest
from ._request import InferenceResult as InferenceResult
from ._request import Tensors as Tensors
from ._request import new_job_id as new_job_id
from ._stats import PeerStats as PeerStats
from ._stats import StatsConfig as StatsConfig
from ._strategies import PROBED as PROBED
from ._strategies import Candidate as Candidate
from ._strategies import CoordinatorSnapshot as CoordinatorSnapshot
from ._strategies import CoordinatorState as CoordinatorState
from ._strategies import DistributionStrategy as DistributionStrategy
from ._strategies import Excluded as Excluded
from ._strategies import Exclusion as Exclusion
from ._strategies import Placement as Placement
from ._strategies import expected_wait_ms as expected_wait_ms
from ._strategies import pick as pick
from ._strategies import place as place
from ._strategies import settle as settle
from ._strategies import shortlist as shortlist
from ._strategies import to_probe as to_probe
from ._strategies import worth_probing as worth_probing

__all__ = [
    "ChainHop",
    "ChainPlan",
    "StageOffer",
    "complete_chains",
    "estimate_whole",
    "offers_from_ids",
    "plan_chain",
    "NO_REQUIREMENTS",
    "PROBED",
    "Candidate",
    "CoordinatorSnapshot",
    "CoordinatorState",
    "DistributedModelOrchestrator",
    "DistributionStrategy",
    "ErrorCode",
    "Excluded",
    "Exclusion",
    "GpuNeed",
    "InferenceRequest",
    "InferenceResult",
    "JobError",
    "ModelOutcome",
    "NodeIndex",
    "NodeInfo",
    "OrchestratorConfig",
    "ParallelResult",
    "PeerStats",
    "Placement",
    "Requirements",
    "StatsConfig",
    "Tensors",
    "expected_wait_ms",
    "get_distributed_orchestrator",
    "majority_vote",
    "mean",
    "new_job_id",
    "pick",
    "place",
    "settle",
    "shortlist",
    "to_probe",
    "worth_probing",
]
