"""One accumulator per API: engine outputs in, protocol chunks out.

The server feeds every output of a request through its accumulator and either sends
the chunks as they come (``stream: true``) or folds them with ``merge_*_chunks`` into
the whole answer. Both answers come from the same chunks, so they cannot disagree.

An engine output is anything shaped like ``agora.engine.RequestOutput`` (see
:class:`EngineOutput`): this package stays free of the engine and of torch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from agora.openai.chat import ChatChunkChoice, ChatCompletionChunk, ChatDelta, FunctionCallDelta, ToolCallDelta
from agora.openai.common import ChoiceLogprobs, CompletionLogprobs, TokenLogprob, TopLogprob, Usage
from agora.openai.completions import Completion, CompletionChoice
from agora.openai.reasoning import ThinkSplitter
from agora.openai.tool_parsers.base import ToolParser

MIN_LOGPROB = -9999.0  # OpenAI clamps -inf


class TokenLogprobs(Protocol):
    token_id: int
    logprob: float
    rank: int
    top: list[tuple[int, float]]


class EngineOutput(Protocol):
    """What one engine step produced for one sequence (a delta)."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: Sequence[TokenLogprobs]
    finished: bool
    finish_reason: str | None
    stop_reason: int | str | None
    num_cached_tokens: int
    text_offsets: list[int]  # per token, where its text begins in the sequence's text; may be empty


class _Counts:
    def __init__(self, prompt_tokens: int, reasons: bool = False) -> None:
        self.prompt, self.completion, self.cached = prompt_tokens, 0, 0
        self.reasoning = 0 if reasons else None  # the thinking's tokens, tags included, of a reasoning model

    def add(self, out: EngineOutput) -> None:
        self.completion += len(out.token_ids)
        self.cached = max(self.cached, out.num_cached_tokens)

    def usage(self) -> Usage:
        return Usage.of(self.prompt, self.completion, self.cached, self.reasoning)


class _Thinking:
    """One choice's output split into thinking and answer, counting the thinking's tokens."""

    def __init__(self, starts: str) -> None:
        self.splitter = ThinkSplitter(starts)
        self.emitted = 0  # characters of the choice's text so far (the engine's text offsets count from 0)

    def split(self, out: EngineOutput) -> tuple[str, str, int]:
        """(thinking, answer, thinking tokens) of one output. Each token's text goes through the splitter on its
        own where the engine gave offsets, so a step of several tokens (speculation) that crosses ``</think>``
        counts each token on its side; a token is thinking if the splitter thinks before or after it, or it
        opened thinking (the tags are thinking's)."""
        text, n = out.text, len(out.token_ids)
        cuts = [0, len(text)]
        if len(out.text_offsets) == n and n > 1:
            cuts = [0, *(min(max(o - self.emitted, 0), len(text)) for o in out.text_offsets[1:]), len(text)]
        self.emitted += len(text)
        thinking, answer, tokens = [], [], 0
        for j in range(len(cuts) - 1):
            before, opened = self.splitter.thinking, self.splitter.opened
            last = j == len(cuts) - 2
            for kind, piece in self.splitter.feed(text[cuts[j] : cuts[j + 1]], final=out.finished and last):
                (thinking if kind == "thinking" else answer).append(piece)
            tokens += int(before or self.splitter.thinking or self.splitter.opened != opened)
        if len(cuts) == 2:
            tokens = n if tokens else 0
        return "".join(thinking), "".join(answer), tokens


class ChatStream:
    """Outputs of the ``n`` sequences of one chat request -> ``chat.completion.chunk`` objects.

    With a tool parser, each choice's text goes through its own parser: tool-call markup
    never reaches ``content``; calls leave as ``delta.tool_calls`` (id, type and name in
    a call's first delta, then argument fragments), and a choice that called tools ends
    with ``finish_reason: "tool_calls"``. A reasoning model's thinking is split out first
    (``delta.reasoning``, vLLM's field): only the answer is parsed for calls.
    """

    def __init__(self, request_id: str, model: str, n: int, prompt_tokens: int, *, logprobs: bool,
                 token_text: Callable[[int], str], tool_parser: Callable[[], ToolParser] | None = None,
                 usage_every_chunk: bool = False, prompt_k: int | None = None,
                 prompt_ids: list[int] | None = None, label: Callable[[int], str] | None = None,
                 echo: str = "", think: str | None = None, include_reasoning: bool = True) -> None:  # fmt: skip
        """``prompt_ids``: vLLM's ``return_token_ids`` (the prompt's ids on the first chunk, each chunk's own
        token ids on its choice); ``label``: how logprobs name a token (default: its text); ``echo``: the text
        every choice starts with (vLLM's chat ``echo``); ``think``: where a reasoning model's output starts
        (``Reasoning.starts``; None: the model does not reason), ``include_reasoning`` whether its thinking is
        sent (vLLM's field; it is counted either way)."""
        self.id, self.model, self.n = request_id, model, n
        self.created = int(time.time())
        self.prompt_k = prompt_k  # vLLM's prompt_logprobs asked for: the answer carries them, once
        self.logprobs = logprobs
        self.token_text = token_text
        self.label = label or token_text
        self.prompt_ids, self.echo = prompt_ids, echo
        self.parsers = [tool_parser() for _ in range(n)] if tool_parser is not None else None
        self.usage_every_chunk = usage_every_chunk
        self.counts = _Counts(prompt_tokens, reasons=think is not None)
        self.thinking = [_Thinking(think) for _ in range(n)] if think is not None else None
        self.include_reasoning = include_reasoning

    def _chunk(self, choices: list[ChatChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
        if usage is None and self.usage_every_chunk:
            usage = self.counts.usage()
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)

    def start(self) -> list[ChatCompletionChunk]:
        """The role chunk of every choice (the first with the prompt's token ids, where they are asked for)."""
        chunks = [self._chunk([ChatChunkChoice(index=j, delta=ChatDelta(role="assistant", content=self.echo),
                                               token_ids=[] if self.prompt_ids is not None else None)])
                  for j in range(self.n)]  # fmt: skip
        if self.prompt_ids is not None:
            chunks[0].prompt_token_ids = self.prompt_ids
        return chunks

    def feed(self, prompt_index: int, out: EngineOutput) -> list[ChatCompletionChunk]:
        """``prompt_index`` is always 0: a chat request has one prompt (the same signature as text completions)."""
        self.counts.add(out)
        content, calls, reasoning = out.text, [], ""
        if self.thinking is not None:
            reasoning, content, tokens = self.thinking[out.index].split(out)
            self.counts.reasoning += tokens
            reasoning = reasoning if self.include_reasoning else ""
        chunks = []
        if self.prompt_k is not None and (prompt := getattr(out, "prompt_logprobs", None)) is not None:
            chunks.append(self._chunk([]).model_copy(update={"prompt_logprobs": vllm_prompt_logprobs(
                prompt, self.token_text, self.prompt_k)}))  # fmt: skip
            self.prompt_k = None
        ids = list(out.token_ids) if self.prompt_ids is not None else None  # return_token_ids: this chunk's
        parser = self.parsers[out.index] if self.parsers is not None else None
        if parser is not None:
            parsed = parser.feed(content)
            if out.finished:
                parsed = parsed.then(parser.finish())
            content, calls = parsed.content, parsed.calls
        lps = _chat_logprobs(out.logprobs, self.label) if self.logprobs and out.logprobs else None
        if content or calls or reasoning or lps is not None or ids:
            deltas = [
                ToolCallDelta(
                    index=c.index,
                    id=c.id,
                    type="function" if c.id else None,
                    function=FunctionCallDelta(name=c.name, arguments=c.arguments),
                )  # fmt: skip
                for c in calls
            ]
            delta = ChatDelta(reasoning=reasoning or None, content=content if content or not (deltas or reasoning)
                              else None, tool_calls=deltas or None)  # fmt: skip
            chunks.append(self._chunk([ChatChunkChoice(index=out.index, delta=delta, logprobs=lps, token_ids=ids)]))
        if out.finished:
            reason = out.finish_reason
            if reason == "stop" and parser is not None and parser.has_calls:
                reason = "tool_calls"
            chunks.append(self._chunk([ChatChunkChoice(index=out.index, delta=ChatDelta(), finish_reason=reason,
                                                       stop_reason=out.stop_reason)]))  # fmt: skip
        return chunks

    def usage(self) -> Usage:
        return self.counts.usage()

    def usage_chunk(self) -> ChatCompletionChunk:
        return self._chunk([], self.counts.usage())


class CompletionStream:
    """Outputs of one text-completion request (``prompts x n`` choices) -> ``text_completion`` chunks.

    Choice ``i * n + j`` is sequence ``j`` of prompt ``i``; with ``echo`` each choice
    starts with its prompt's text.
    """

    def __init__(self, request_id: str, model: str, n: int, prompt_tokens: int, echo_texts: list[str], *,
                 logprobs: bool, token_text: Callable[[int], str], usage_every_chunk: bool = False,
                 echo_ids: list[list[int]] | None = None, prompt_only: bool = False, echo_k: int | None = None,
                 prompt_k: int | None = None, prompt_ids: list[list[int]] | None = None,
                 label: Callable[[int], str] | None = None) -> None:  # fmt: skip
        """``prompt_ids``: vLLM's ``return_token_ids`` (each choice's first chunk carries its prompt's ids, every
        chunk its own token ids); ``label``: how logprobs name a token (default: its text)."""
        self.id, self.model, self.n = request_id, model, n
        self.created = int(time.time())
        self.echo_texts = echo_texts
        # echo with logprobs: each choice's echoed prompt carries its tokens' logprobs, which come with the
        # sequence's first output (the engine's prompt_logprobs), so the echo waits for them
        self.echo_ids = echo_ids
        self.echo_k = echo_k  # the top logprobs the echo shows (the engine may have computed more)
        self.echoed: set[int] = set()
        self.prompt_k = prompt_k  # vLLM's prompt_logprobs asked for: each choice's first chunk carries them
        self.prompt_lps: dict[int, list[dict[str, Any] | None]] = {}
        # echo with max_tokens 0 (scoring a text): the engine makes one token, which no choice shows or counts
        self.prompt_only = prompt_only
        self.logprobs = logprobs
        self.token_text = token_text
        self.label = label or token_text
        self.prompt_ids = prompt_ids
        self.ids_sent: set[int] = set()  # choices whose prompt ids went out
        self.usage_every_chunk = usage_every_chunk
        self.counts = _Counts(prompt_tokens)
        self.offsets = [len(echo_texts[i]) for i in range(len(echo_texts)) for _ in range(n)]

    def _chunk(self, choices: list[CompletionChoice], usage: Usage | None = None) -> Completion:
        if usage is None and self.usage_every_chunk:
            usage = self.counts.usage()
        if self.prompt_ids is not None:  # return_token_ids: a choice's first chunk names its prompt's tokens
            for c in choices:
                c.token_ids = c.token_ids or []
                if c.index not in self.ids_sent:
                    self.ids_sent.add(c.index)
                    c.prompt_token_ids = self.prompt_ids[c.index // self.n]
        return Completion(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)

    def start(self) -> list[Completion]:
        """With echo, the prompt text of every choice (the whole prompt, never an empty chunk)."""
        if self.echo_ids is not None:
            return []  # sent with each choice's first output, its logprobs with it
        return [
            self._chunk([CompletionChoice(index=i * self.n + j, text=text)])
            for i, text in enumerate(self.echo_texts) if text for j in range(self.n)
        ]  # fmt: skip

    def feed(self, prompt_index: int, out: EngineOutput) -> list[Completion]:
        index = prompt_index * self.n + out.index
        prompt = getattr(out, "prompt_logprobs", None)
        echo = self._echo(prompt_index, index, prompt)
        if self.prompt_k is not None and prompt is not None:
            self.prompt_lps[index] = vllm_prompt_logprobs(prompt, self.token_text, self.prompt_k)
        if self.prompt_only:
            self.counts.cached = max(self.counts.cached, out.num_cached_tokens)
            if not out.finished:
                return echo
            return [*echo, self._chunk([CompletionChoice(index=index, text="", finish_reason="length",
                                                         prompt_logprobs=self.prompt_lps.pop(index, None))])]  # fmt: skip
        self.counts.add(out)
        ids = list(out.token_ids) if self.prompt_ids is not None else None
        if not out.text and not out.finished and not out.logprobs and index not in self.prompt_lps and not ids:
            return echo
        lps = None
        if self.logprobs and out.logprobs:
            starts = None
            if len(out.text_offsets) >= len(out.logprobs):  # the decoder's own offsets, past the echoed prompt
                starts = [len(self.echo_texts[prompt_index]) + o for o in out.text_offsets]
            lps = _completion_logprobs(out.logprobs, self.token_text, self.offsets[index], starts, label=self.label)
        self.offsets[index] += len(out.text)
        choice = CompletionChoice(index=index, text=out.text, logprobs=lps, finish_reason=out.finish_reason,
                                  stop_reason=out.stop_reason, prompt_logprobs=self.prompt_lps.pop(index, None),
                                  token_ids=ids)  # fmt: skip
        return [*echo, self._chunk([choice])]

    def _echo(self, prompt_index: int, index: int, prompt_lps: Sequence[TokenLogprobs] | None) -> list[Completion]:
        """The echoed prompt of choice ``index`` with its tokens' logprobs (the first token has none)."""
        if self.echo_ids is None or index in self.echoed or prompt_lps is None:
            return []
        self.echoed.add(index)
        ids, text = self.echo_ids[prompt_index], self.echo_texts[prompt_index]
        # each token begins where the text before it ends; one the text does not show (a BOS token) takes no room
        starts, at = [], 0
        for token in ids:
            starts.append(at)
            piece = self.token_text(token)
            if text.startswith(piece, at):
                at += len(piece)
        lps = _completion_logprobs(prompt_lps, self.token_text, 0, starts[1:], self.echo_k, self.label)
        lps.tokens.insert(0, self.label(ids[0]))
        lps.token_logprobs.insert(0, None)
        lps.top_logprobs.insert(0, None)
        lps.text_offset.insert(0, 0)
        return [self._chunk([CompletionChoice(index=index, text=text, logprobs=lps)])]

    def usage(self) -> Usage:
        return self.counts.usage()

    def usage_chunk(self) -> Completion:
        return self._chunk([], self.counts.usage())


def _entry(token_text: Callable[[int], str], token: int, logprob: float) -> dict[str, Any]:
    text = token_text(token)
    return {"token": text, "logprob": max(logprob, MIN_LOGPROB), "bytes": list(text.encode())}


def _chat_logprobs(items: Sequence[TokenLogprobs], token_text: Callable[[int], str]) -> ChoiceLogprobs:
    return ChoiceLogprobs(content=[
        TokenLogprob(**_entry(token_text, x.token_id, x.logprob),
                     top_logprobs=[TopLogprob(**_entry(token_text, t, v)) for t, v in x.top])
        for x in items
    ])  # fmt: skip


def _completion_logprobs(items: Sequence[TokenLogprobs], token_text: Callable[[int], str], offset: int,
                         starts: Sequence[int] | None, top_k: int | None = None,
                         label: Callable[[int], str] | None = None) -> CompletionLogprobs:  # fmt: skip
    """Legacy logprobs; ``starts`` are the tokens' text offsets where the decoder gave them, else each
    token is taken to begin where the previous token's own text ends. ``label`` names the tokens (default:
    their text)."""
    label = label or token_text
    out = CompletionLogprobs()
    for i, x in enumerate(items):
        out.tokens.append(label(x.token_id))
        out.token_logprobs.append(max(x.logprob, MIN_LOGPROB))
        top = x.top if top_k is None else x.top[:top_k]
        out.top_logprobs.append({label(t): max(v, MIN_LOGPROB) for t, v in top} if top else None)
        out.text_offset.append(starts[i] if starts is not None else offset)
        if starts is None:
            offset += len(token_text(x.token_id))
    return out


def vllm_prompt_logprobs(items: Sequence[TokenLogprobs], token_text: Callable[[int], str],
                         k: int) -> list[dict[str, Any] | None]:  # fmt: skip
    """vLLM's ``prompt_logprobs``: for each prompt position (the first has none) the prompt token there and the
    ``k`` most likely, by token id: ``{"logprob", "rank", "decoded_token"}``."""
    out: list[dict[str, Any] | None] = [None]
    for x in items:
        entry = {str(x.token_id): {"logprob": max(x.logprob, MIN_LOGPROB), "rank": x.rank,
                                   "decoded_token": token_text(x.token_id)}}  # fmt: skip
        for rank, (token, logprob) in enumerate(x.top[:k], 1):
            entry.setdefault(str(token), {"logprob": max(logprob, MIN_LOGPROB), "rank": rank,
                                          "decoded_token": token_text(token)})  # fmt: skip
        out.append(entry)
    return out
