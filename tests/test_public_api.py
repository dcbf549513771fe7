"""The public names of each package: a change here is a change users see."""

import gossip
import p2p_node
import scheduler
import selection


def test_public_names() -> None:
    assert sorted(p2p_node.__all__) == [
        "AdmissionConfig",
        "Client",
        "ConfigError",
        "ErrorCode",
        "ExecutorConfig",
        "GenerateSummary",
        "GeneratedPiece",
        "GenerationStream",
        "GossipConfig",
        "InferenceRequest",
        "InferenceResult",
        "JobError",
        "Node",
        "NodeConfig",
        "PreSharedKey",
        "PskError",
        "RepositoryError",
        "bundled_models_dir",
        "load_bootstrap_file",
        "open_node",
        "read_psk_file",
    ]
    assert sorted(scheduler.__all__) == sorted(
        [
            "NO_REQUIREMENTS",
            "PROBED",
            "Candidate",
            "ChainHop",
            "ChainPlan",
            "StageOffer",
            "complete_chains",
            "estimate_whole",
            "offers_from_ids",
            "plan_chain",
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
            "get_distributed_orchestrator",
            "majority_vote",
            "mean",
            "expected_wait_ms",
            "new_job_id",
            "pick",
            "place",
            "settle",
            "shortlist",
            "to_probe",
            "worth_probing",
        ]
    )
    assert sorted(gossip.__all__) == [
        "Capabilities",
        "DEFAULT_BUDGET",
        "DEFAULT_INTERVAL",
        "Departure",
        "DigestEntry",
        "EventKind",
        "GpuInfo",
        "KnownPeer",
        "Load",
        "MAX_BOOT_ID_LENGTH",
        "MAX_DEPARTED",
        "MAX_RANK",
        "MAX_RECORD_BYTES",
        "ModelDescriptor",
        "ModelEntry",
        "ModelPerformance",
        "PeerRecord",
        "PeerState",
        "PeerView",
        "PublishPacer",
        "RecordError",
        "Rejection",
        "SchemaError",
        "StageOf",
        "TENSOR_DTYPES",
        "TensorSpec",
        "ViewEvent",
        "ViewSnapshot",
        "check_record",
        "decode_record",
        "descriptor_to_wire",
        "digest_entry",
        "encode_record",
        "expire_forever",
        "is_entry_newer",
        "is_newer",
        "is_newer_than_entry",
        "publish_interval",
    ]
    assert sorted(selection.__all__) == sorted(
        [
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
    )
    for package in (p2p_node, scheduler, gossip, selection):
        for name in package.__all__:
            assert hasattr(package, name), f"{package.__name__}.{name}"


def test_error_codes_are_stable() -> None:
    codes = {code.name: int(code) for code in scheduler.ErrorCode}
    assert codes == {
        "INTERNAL": 1,
        "MALFORMED_MESSAGE": 2,
        "UNSUPPORTED_VERSION": 3,
        "MESSAGE_TOO_LARGE": 4,
        "UNKNOWN_MODEL": 5,
        "INVALID_INPUT": 6,
        "OVERLOADED": 7,
        "DEADLINE_EXCEEDED": 8,
        "PEER_UNREACHABLE": 9,
        "NO_CAPABLE_PEER": 10,
        "SHUTTING_DOWN": 11,
        "UNAUTHORIZED": 12,
        "UNKNOWN_TASK": 13,
        "NO_FITTING_MODEL": 14,
        "INVALID_SELECTION": 15,
        "UNKNOWN_JOB": 16,
    }
    retryable = {c.name for c in scheduler.ErrorCode if c.retryable}
    assert retryable == {
        "INTERNAL",
        "OVERLOADED",
        "DEADLINE_EXCEEDED",
        "PEER_UNREACHABLE",
        "SHUTTING_DOWN",
    }


def test_lower_layers_never_import_p2p_node() -> None:
    import pathlib

    root = pathlib.Path(__file__).parent.parent
    for package in ("gossip", "scheduler", "selection"):
        for source in (root / package).rglob("*.py"):
            text = source.read_text()
            assert "import p2p_node" not in text and "from p2p_node" not in text, source


def test_the_distributed_execution_api_has_its_product_names() -> None:
    strategies = {s.name for s in scheduler.DistributionStrategy}
    assert strategies == {
        "ROUND_ROBIN",
        "LEAST_LOADED",
        "MODEL_SPECIFIC",
        "CAPABILITY_BASED",
        "LATENCY_OPTIMIZED",
    }
    orchestrator = scheduler.DistributedModelOrchestrator
    assert callable(orchestrator.run_distributed_inference)
    assert callable(orchestrator.run_distributed_parallel_inference)
    assert callable(scheduler.get_distributed_orchestrator)


def test_the_enhanced_model_selection_api_has_its_product_names() -> None:
    strategies = {s.name for s in selection.AdvancedModelSelectionStrategy}
    assert strategies == {"MULTI_OBJECTIVE", "ADAPTIVE", "CONTEXT_AWARE", "HYBRID", "SPECIALIZED"}
    assert issubclass(selection.EnhancedModelOrchestrator, selection.ModelOrchestrator)
    enhanced = selection.EnhancedModelOrchestrator
    assert callable(enhanced.select_models_advanced)
    assert callable(enhanced.run_optimized_parallel_inference)
    assert callable(selection.ModelOrchestrator.select_models)
    assert callable(selection.get_enhanced_orchestrator)
