"""One request's state as the engine sees it: tokens, progress through the KV cache, pages, slot.

The model never sees a `Sequence`; the runner reads `block_table`, `num_computed_tokens` and
`slot` to pack arrays. The scheduler changes `status`, `slot` and `num_computed_tokens` (the
block manager sets the latter at admission, to the prefix-cache hits); only the block manager
changes `block_table` and `num_cached_tokens`.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the engine's host side never needs jax at import time
    from ..sampling import SamplingParams

FINISH_REASONS = ("stop", "length", "abort")


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued, holds no pages and no slot (new, or preempted)
    RUNNING = "running"  # holds pages and a slot
    FINISHED = "finished"  # done; holds nothing


@dataclass(eq=False)  # identity equality: a Sequence is a dict key in the block manager
class Sequence:
    """A request: prompt, sampled tokens so far, and where its K/V live."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    num_cached_tokens: int = 0  # of those, how many came from the prefix cache at the last admission
    block_table: list[int] = field(default_factory=list)  # page ids, in order
    slot: int | None = None  # row 0..max_num_seqs-1 in the runner's per-sequence tables, held while RUNNING
    num_preemptions: int = 0
    lora: tuple[tuple[str, float], ...] = ()  # (adapter name, weight) the step adds, resolved by the engine
    cache_salt: bytes = b""  # root of the prefix-cache hash chain: the adapter mix, so K/V never cross mixes

    def __post_init__(self):
        self.prompt_token_ids = list(self.prompt_token_ids)
        if not self.prompt_token_ids:
            raise ValueError(f"request {self.request_id!r}: prompt_token_ids is empty; a prompt needs >= 1 token")

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt then output tokens (a new list)."""
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def num_uncomputed(self) -> int:
        """Tokens still to feed to the model before it can sample the next one."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def in_decode(self) -> bool:
        """Only the last sampled (or last prompt) token is left to feed."""
        return self.num_uncomputed == 1

    def append_token(self, token_id: int) -> None:
        """Record a sampled token (its K/V are computed when it is fed next step)."""
        self.output_token_ids.append(token_id)
