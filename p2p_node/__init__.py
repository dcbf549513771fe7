"""p2p-node: a peer-to-peer network of symmetric nodes that run ONNX models.

The process layer: configuration, identity, the libp2p host and wire protocols,
the ONNX executor, and their composition into a `Node`.
"""

from scheduler import ErrorCode as ErrorCode
from scheduler import InferenceRequest as InferenceRequest
from scheduler import InferenceResult as InferenceResult
from scheduler import JobError as JobError

from ._client import Client as Client
from ._config import AdmissionConfig as AdmissionConfig
from ._config import ConfigError as ConfigError
from ._config import ExecutorConfig as ExecutorConfig
from ._config import GossipConfig as GossipConfig
from ._config import NodeConfig as NodeConfig
from ._config import load_bootstrap_file as load_bootstrap_file
from ._messages import GeneratedPiece as GeneratedPiece
from ._messages import GenerateSummary as GenerateSummary
from ._node import Node as Node
from ._node import open_node as open_node
from ._psk import PreSharedKey as PreSharedKey
from ._psk import PskError as PskError
from ._psk import read_psk_file as read_psk_file
from ._repository import RepositoryError as RepositoryError
from ._repository import bundled_models_dir as bundled_models_dir
from ._stream_gen import GenerationStream as GenerationStream

__all__ = [
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
