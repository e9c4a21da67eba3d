"""Turning sampled tokens into text: incremental detokenization and stop conditions."""

from __future__ import annotations

from dataclasses import dataclass, field

from .sampling import SamplingParams


@dataclass
class OutputTracker:
    """Host-side output of one sequence: tokens so far, incremental text, stop checks.

    Shared by the offline Generator and the serving engine, so both stop and stream alike.
    """

    prompt: list[int]
    params: SamplingParams
    eos: frozenset
    decoder: object
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0  # chars of text already streamed
    finish_reason: str | None = None

    def push(self, token: int) -> None:
        """Add one token and decide whether the sequence is finished."""
        if token in self.eos:
            self._finish("stop")
            return
        self.tokens.append(token)
        before = len(self.text)
        self.text += self.decoder.push(token)
        hits = [at for s in self.params.stop if (at := self.text.find(s, max(0, before - len(s) + 1))) != -1]
        if hits:
            self.text = self.text[:min(hits)]
            self.finish_reason = "stop"
        elif len(self.tokens) >= self.params.max_tokens:
            self._finish("length")

    def _finish(self, reason: str) -> None:
        self.text += self.decoder.flush()
        self.finish_reason = reason

    def delta(self) -> str:
        """New text safe to show: holds back a tail that could still become a stop string."""
        hold = 0 if self.finish_reason else max((len(s) - 1 for s in self.params.stop), default=0)
        end = max(self.emitted, len(self.text) - hold)
        out, self.emitted = self.text[self.emitted:end], end
        return out


class NullDecoder:
    """Stand-in for a tokenizer's stream decoder when a model has no tokenizer: no text."""

    def push(self, token: int) -> str:
        return ""

    def flush(self) -> str:
        return ""
