"""Gossip layer: what nodes announce about themselves and what each knows of its peers."""

from ._model import MAX_RANK as MAX_RANK
from ._model import TENSOR_DTYPES as TENSOR_DTYPES
from ._model import ModelDescriptor as ModelDescriptor
from ._model import SchemaError as SchemaError
from ._model import TensorSpec as TensorSpec
from ._model import descriptor_from_wire as descriptor_from_wire
from ._model import descriptor_to_wire as descriptor_to_wire
from ._model import expect_list as expect_list
from ._model import expect_map as expect_map
from ._view import PeerEntry as PeerEntry
from ._view import PeerView as PeerView
from ._view import ViewSnapshot as ViewSnapshot

__all__ = [
    "MAX_RANK",
    "TENSOR_DTYPES",
    "ModelDescriptor",
    "PeerEntry",
    "PeerView",
    "SchemaError",
    "TensorSpec",
    "ViewSnapshot",
    "descriptor_from_wire",
    "descriptor_to_wire",
    "expect_list",
    "expect_map",
]
