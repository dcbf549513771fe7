"""Scheduler layer: requests, errors, and (soon) placement over a peer view."""

from ._errors import ErrorCode as ErrorCode
from ._errors import JobError as JobError
from ._request import InferenceRequest as InferenceRequest
from ._request import InferenceResult as InferenceResult
from ._request import Tensors as Tensors
from ._request import new_job_id as new_job_id

__all__ = [
    "ErrorCode",
    "InferenceRequest",
    "InferenceResult",
    "JobError",
    "Tensors",
    "new_job_id",
]
