"""Gossip layer: what nodes announce about themselves and what each knows of its peers.

Pure values and logic (records and their codec, validation, the publish law,
the peer view); the libp2p GossipSub adapter lives in p2p_node.
"""

from ._model import MAX_RANK as MAX_RANK
from ._model import TENSOR_DTYPES as TENSOR_DTYPES
from ._model import ModelDescriptor as ModelDescriptor
from ._model import SchemaError as SchemaError
from ._model import TensorSpec as TensorSpec
from ._model import descriptor_to_wire as descriptor_to_wire
from ._pacing import DEFAULT_BUDGET as DEFAULT_BUDGET
from ._pacing import DEFAULT_INTERVAL as DEFAULT_INTERVAL
from ._pacing import PublishPacer as PublishPacer
from ._pacing import publish_interval as publish_interval
from ._record import MAX_BOOT_ID_LENGTH as MAX_BOOT_ID_LENGTH
from ._record import MAX_DEPARTED as MAX_DEPARTED
from ._record import MAX_RECORD_BYTES as MAX_RECORD_BYTES
from ._record import Capabilities as Capabilities
from ._record import Departure as Departure
from ._record import DigestEntry as DigestEntry
from ._record import GpuInfo as GpuInfo
from ._record import Load as Load
from ._record import ModelEntry as ModelEntry
from ._record import ModelPerformance as ModelPerformance
from ._record import PeerRecord as PeerRecord
from ._record import RecordError as RecordError
from ._record import Rejection as Rejection
from ._record import StageOf as StageOf
from ._record import check_record as check_record
from ._record import decode_record as decode_record
from ._record import digest_entry as digest_entry
from ._record import encode_record as encode_record
from ._record import is_entry_newer as is_entry_newer
from ._record import is_newer as is_newer
from ._record import is_newer_than_entry as is_newer_than_entry
from ._view import EventKind as EventKind
from ._view import KnownPeer as KnownPeer
from ._view import PeerState as PeerState
from ._view import PeerView as PeerView
from ._view import ViewEvent as ViewEvent
from ._view import ViewSnapshot as ViewSnapshot
from ._view import expire_forever as expire_forever

__all__ = [
    "DEFAULT_BUDGET",
    "DEFAULT_INTERVAL",
    "MAX_BOOT_ID_LENGTH",
    "MAX_DEPARTED",
    "MAX_RANK",
    "MAX_RECORD_BYTES",
    "TENSOR_DTYPES",
    "Capabilities",
    "Departure",
    "DigestEntry",
    "EventKind",
    "GpuInfo",
    "KnownPeer",
    "Load",
    "ModelDescriptor",
    "ModelEntry",
    "StageOf",
    "ModelPerformance",
    "PeerRecord",
    "PeerState",
    "PeerView",
    "PublishPacer",
    "RecordError",
    "Rejection",
    "SchemaError",
    "TensorSpec",
    "ViewEvent",
    "ViewSnapshot",
    "check_record",
    "decode_record",
    "digest_entry",
    "descriptor_to_wire",
    "encode_record",
    "expire_forever",
    "is_entry_newer",
    "is_newer",
    "is_newer_than_entry",
    "publish_interval",
]
