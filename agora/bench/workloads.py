"""Request streams for the serving benchmark. Deterministic for a given seed.

Lengths are in words of a plain English vocabulary (about one token each for BPE
tokenizers); the benchmark reports the token counts the server itself returns.
"""

from __future__ import annotations

import json
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


# -- agents whose answers repeat their context (speculative decoding's case) ------------------------

_VERBS = ("load", "parse", "merge", "filter", "render", "index", "fetch", "store", "group", "score")
_NOUNS = ("records", "orders", "users", "events", "tokens", "blocks", "routes", "files", "jobs", "metrics")
_ARGS = ("items", "limit", "key", "path", "config", "batch", "prefix", "timeout")
_BODIES = (
    ["    result = {{}}", "    for item in {a}:", "        if item.get(\"{n}\") == {b}:",
     "            result[item[\"id\"]] = item", "    return result"],
    ["    out = []", "    for i, item in enumerate({a}):", "        if i >= {b}:", "            break",
     "        out.append(item.strip())", "    return out"],
    ["    with open({a}) as f:", "        data = json.load(f)", "    if \"{n}\" not in data:",
     "        raise KeyError(\"{n}\")", "    return data[\"{n}\"][: {b}]"],
    ["    total = 0", "    for item in {a}:", "        total += item.get(\"{n}\", 0)",
     "    return total / max(1, {b})"],
)  # fmt: skip


def source_file(rng: random.Random, functions: int) -> tuple[str, list[str]]:
    """A small Python module (deterministic for the rng) and the names of its functions."""
    lines = ["import json", "from pathlib import Path", "", ""]
    names: list[str] = []
    while len(names) < functions:
        name = f"{rng.choice(_VERBS)}_{rng.choice(_NOUNS)}"
        if name in names:
            continue
        names.append(name)
        a, b = rng.sample(_ARGS, 2)
        noun = rng.choice(_NOUNS)
        lines.append(f"def {name}({a}, {b}):")
        lines.append(f'    """{words(rng, 6).capitalize()}."""')
        lines += [ln.format(a=a, b=b, n=noun) for ln in rng.choice(_BODIES)]
        lines += ["", ""]
    return "\n".join(lines).rstrip() + "\n", names


def tool_result(rng: random.Random, names: list[str]) -> str:
    failures = [
        {"test": f"tests/test_{rng.choice(_NOUNS)}.py::test_{name}", "error": f"AssertionError: expected "
         f"{rng.randint(1, 9)}, got {rng.randint(10, 99)}", "line": rng.randint(10, 200)}
        for name in rng.sample(names, 2)
    ]  # fmt: skip
    return json.dumps({"tool": "run_tests", "status": "failed", "passed": rng.randint(5, 40),
                       "failures": failures, "duration_s": round(rng.uniform(0.5, 9.0), 2)}, indent=2)  # fmt: skip


@dataclass
class RepeatSession(AgentSession):
    """A coding agent whose every answer copies its context: the whole file rewritten with one edit,
    a tool result quoted back, the file again with one more edit. Greedy, natural stopping."""

    script: list[str] = field(default_factory=list)  # the user message of each turn after the first
    # Characters of what each turn's faithful answer copies (turn t: answers[t % len]): max_tokens is
    # a little more than that in tokens (about 3 characters each), so a model that loops instead of
    # stopping cannot stretch a turn past what the copy needs.
    answers: list[int] = field(default_factory=list)

    def request(self, turn: int) -> RequestSpec:
        spec = super().request(turn)
        if self.answers:
            spec.max_tokens = min(spec.max_tokens, self.answers[turn % len(self.answers)] // 3 + 32)
        return spec

    def advance(self, reply: str, turn: int) -> None:
        self.messages.append({"role": "assistant", "content": reply or "(no output)"})
        self.messages.append({"role": "user", "content": self.script[turn % len(self.script)]})


def repeat_sessions(agents: int, turns: int, output_len: int | tuple[int, int], seed: int,
                    functions: int = 4) -> list[RepeatSession]:  # fmt: skip
    rng = random.Random(seed)
    system = "You are a coding agent. When asked for a file, reply with the whole file and nothing else."
    sessions = []
    for a in range(agents):
        srng = random.Random(seed * 1000 + a)
        code, names = source_file(srng, functions)
        old, new = names[0], names[0].replace("_", "_all_", 1)
        path = f"src/{rng.choice(_NOUNS)}_{a}.py"
        results = [tool_result(srng, names), tool_result(srng, names)]
        script = [
            f"Tool result:\n```json\n{results[0]}\n```\nQuote the tool result above exactly.",
            f"Now add the comment `# checked` as the first line of {path} and reply with the whole file again.",
            f"Tool result:\n```json\n{results[1]}\n```\nQuote the tool result above exactly.",
            f"Now remove the comment `# checked` from {path} and reply with the whole file again.",
        ]
        answers = [len(code), len(results[0]), len(code), len(results[1])]
        s = RepeatSession(a, turns, output_len, 0, rng=srng, script=script, answers=answers)
        s.messages = [
            {"role": "system", "content": system},
            {"role": "user", "content": f"Here is {path}:\n```python\n{code}```\nRename `{old}` to `{new}` "
                                        "everywhere and reply with the whole updated file."},
        ]  # fmt: skip
        sessions.append(s)
    return sessions
