"""Request streams for the serving benchmark. Deterministic for a given seed.

Lengths are in words of a plain English vocabulary (about one token each for BPE
tokenizers); the benchmark reports the token counts the server itself returns.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field

_WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an they "
    "you were her all she there would their we him been has when who will more no if out so said what up its about "
    "into than them can only other new some could time these two may then do first any my now such like our over "
    "man me even most made after also did many before must through back years where much your way well down should "
    "because each just those people how too little state good very make world still own see men work long get here "
    "between both life being under never day same another know while last might us great old year off come since "
    "against go came right used take three system data model server cache request token memory queue agent tool"
).split()


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(max(1, n)))


@dataclass
class RequestSpec:
    """One request: a completion prompt or a chat conversation, and how much to generate."""

    max_tokens: int
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    session: int | None = None  # agent id (agent workload)
    turn: int = 0


@dataclass
class AgentSession:
    """A multi-turn agent: every turn resends the whole history plus something new."""

    agent: int
    turns: int
    output_len: int | tuple[int, int]  # a range: each turn draws its own, so agents drift apart as real ones do
    tool_result_len: int
    messages: list[dict[str, str]] = field(default_factory=list)
    rng: random.Random = field(default_factory=random.Random)

    def request(self, turn: int) -> RequestSpec:
        out = self.output_len if isinstance(self.output_len, int) else self.rng.randint(*self.output_len)
        return RequestSpec(out, messages=list(self.messages), session=self.agent, turn=turn)

    def advance(self, reply: str, turn: int) -> None:
        """Record the reply and the next observation (a tool result or a user message)."""
        self.messages.append({"role": "assistant", "content": reply or "(no output)"})
        kind = "Tool result" if turn % 2 == 0 else "User"
        self.messages.append({"role": "user", "content": f"{kind}: {words(self.rng, self.tool_result_len)}"})


def parse_range(text: str) -> tuple[int, int]:
    """'128' -> (128, 128); '64:256' -> (64, 256)."""
    lo, _, hi = text.partition(":")
    a, b = int(lo), int(hi or lo)
    if a < 1 or b < a:
        raise ValueError(f"bad length range {text!r}: want N or MIN:MAX with 1 <= MIN <= MAX")
    return a, b


def random_workload(
    n: int, input_len: tuple[int, int], output_len: tuple[int, int], seed: int
) -> Iterator[RequestSpec]:
    rng = random.Random(seed)
    for _ in range(n):
        yield RequestSpec(rng.randint(*output_len), prompt=words(rng, rng.randint(*input_len)))


def shared_prefix_workload(
    n: int, groups: int, prefix_len: int, input_len: tuple[int, int], output_len: tuple[int, int], seed: int
) -> Iterator[RequestSpec]:
    """Groups of requests sharing a long system prompt, interleaved across groups."""
    rng = random.Random(seed)
    prefixes = [f"You are assistant number {g}. " + words(rng, prefix_len) for g in range(groups)]
    for i in range(n):
        system = prefixes[i % groups]
        messages = [
            {"role": "system", "content": system},
            {"role": "user", "content": words(rng, rng.randint(*input_len))},
        ]
        yield RequestSpec(rng.randint(*output_len), messages=messages)


def agent_sessions(
    agents: int, turns: int, system_len: int, task_len: int, tool_result_len: int,
    output_len: int | tuple[int, int], seed: int,
) -> list[AgentSession]:  # fmt: skip
    rng = random.Random(seed)
    system = "You are a coding agent. Use the tools, read their results, and reply briefly. " + words(rng, system_len)
    sessions = []
    for a in range(agents):
        s = AgentSession(a, turns, output_len, tool_result_len, rng=random.Random(seed * 1000 + a))
        s.messages = [
            {"role": "system", "content": system},
            {"role": "user", "content": f"Task {a}: " + words(s.rng, task_len)},
        ]
        sessions.append(s)
    return sessions
