"""Per-request validation of ``am_*`` keys at the API boundary, through vLLM's own extension point.

vLLM runs ``validate_params`` of every custom logits processor in the front-end process when a request
is admitted, and turns a ``VLLMValidationError`` into HTTP 400 (naming ``parameter``) before anything
reaches the engine. We use that hook as a validator only: the processor never changes logits, and it
declares itself argmax-invariant so greedy batches skip it entirely.
"""

from __future__ import annotations

import torch
from vllm.config import VllmConfig
from vllm.exceptions import VLLMValidationError
from vllm.sampling_params import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor

from vllm_attnmatch.config import ConfigError, parse_request_params


class AttnMatchParamsValidator(LogitsProcessor):
    """Rejects invalid ``am_*`` request keys with HTTP 400; a no-op on logits."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        try:
            parse_request_params(sampling_params.extra_args)
        except ConfigError as exc:
            raise VLLMValidationError(str(exc), parameter=exc.key, value=None) from None

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool) -> None:
        pass

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        pass

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits
