"""Per-request sampling parameters (vLLM's names and meanings)."""

from __future__ import annotations

from dataclasses import dataclass, field

# Caps on what a client controls; the server names them in its 400 errors.
MAX_N = 16
MAX_LOGPROBS = 20
MAX_STOP_SEQUENCES = 16
MAX_STOP_STRING_LEN = 256
MAX_SEED = 2**63 - 1
MAX_BAD_WORDS = 128
MAX_BAD_WORD_LEN = 256
MAX_BAD_WORD_TOKENS = 4096  # all bad words' tokens together: each step compares them with the output's end


class ParamError(ValueError):
    """A request parameter with a value that can never work; ``param`` names it (vLLM's name)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param

    def __reduce__(self) -> tuple:  # picklable with both arguments (a remote engine raises it across Ray)
        return (ParamError, (self.param, str(self)))


@dataclass(frozen=True, slots=True)
class StructuredOutputsParams:
    """One constraint on the output (vLLM's names); exactly one field is set.

    ``json`` is a JSON schema as JSON text, ``json_object`` any JSON object, ``regex`` a
    regular expression, ``choice`` a list of allowed outputs, ``grammar`` an EBNF grammar
    (xgrammar's dialect), ``structural_tag`` xgrammar's structural-tag JSON (the server
    builds one for tool calls). ``strict`` (JSON schemas): properties the schema does not
    list are refused unless ``additionalProperties`` allows them.
    """

    json: str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    structural_tag: str | None = None
    strict: bool = True

    def __post_init__(self) -> None:
        given = [self.json, self.regex, self.choice, self.grammar, self.structural_tag]
        if sum(x is not None for x in given) + self.json_object != 1:
            raise ParamError("structured_outputs", "structured_outputs takes exactly one constraint")

    @property
    def kind(self) -> str:
        for name in ("json", "regex", "choice", "grammar", "structural_tag"):
            if getattr(self, name) is not None:
                return name
        return "json_object"


@dataclass(slots=True)
class SamplingParams:
    """How to pick tokens for one request. ``temperature == 0`` means greedy.

    ``max_tokens=None`` means "up to the context length". Validated on creation:
    a bad value raises :class:`ParamError` naming the parameter, with a message fit
    for the client.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top logprobs per token; 0 = just the chosen one
    prompt_logprobs: int | None = None  # the same for each prompt token after the first (vLLM's name)
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None  # only these tokens may be sampled
    # Words that must not appear in the output (vLLM's): the engine tokenizes each with and without a leading
    # space into ``bad_words_token_ids``; a sequence's last token is banned where the output ends with the rest.
    bad_words: list[str] = field(default_factory=list)
    bad_words_token_ids: list[list[int]] = field(default_factory=list)
    structured_outputs: StructuredOutputsParams | None = None
    # A reasoning model's thinking budget (vLLM's thinking_token_budget): once it has thought this many tokens,
    # the end of its thinking is written for it. The server gives the tags' tokens: the end (</think>), and the
    # start (<think>) where the output opens the thinking itself (none: the prompt opened it).
    thinking_token_budget: int | None = None
    thinking_start_token_ids: list[int] = field(default_factory=list)
    thinking_end_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        if isinstance(self.bad_words, str):
            self.bad_words = [self.bad_words]
        self.bad_words = list(self.bad_words)
        self.bad_words_token_ids = [list(ids) for ids in self.bad_words_token_ids]
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = list(self.allowed_token_ids)
        self.thinking_start_token_ids = list(self.thinking_start_token_ids)
        self.thinking_end_token_ids = list(self.thinking_end_token_ids)
        if self.top_k == -1:
            self.top_k = 0
        self.validate()

    def validate(self) -> None:
        """Raise ParamError for a value that can never work (run on creation, and again after a change)."""

        def bad(param: str, msg: str) -> None:
            raise ParamError(param, msg)

        if not 1 <= self.n <= MAX_N:
            bad("n", f"n must be between 1 and {MAX_N}, got {self.n}")
        if not 0.0 <= self.temperature <= 2.0:
            bad("temperature", f"temperature must be between 0 and 2, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            bad("top_p", f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            bad("top_k", f"top_k must be -1 (disabled) or >= 0, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            bad("min_p", f"min_p must be in [0, 1], got {self.min_p}")
        if not 0.0 < self.repetition_penalty <= 2.0:
            bad("repetition_penalty", f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}")
        if not -2.0 <= self.presence_penalty <= 2.0:
            bad("presence_penalty", f"presence_penalty must be between -2 and 2, got {self.presence_penalty}")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            bad("frequency_penalty", f"frequency_penalty must be between -2 and 2, got {self.frequency_penalty}")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            bad("seed", f"seed must be between 0 and {MAX_SEED}, got {self.seed}")
        if self.max_tokens is not None and self.max_tokens < 1:
            bad("max_tokens", f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.min_tokens < 0:
            bad("min_tokens", f"min_tokens must be >= 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad("min_tokens", f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            bad("logprobs", f"logprobs must be between 0 and {MAX_LOGPROBS}, got {self.logprobs}")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= MAX_LOGPROBS:
            bad("prompt_logprobs", f"prompt_logprobs must be between 0 and {MAX_LOGPROBS}, got {self.prompt_logprobs}")
        if len(self.stop) > MAX_STOP_SEQUENCES:
            bad("stop", f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed, got {len(self.stop)}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                bad("stop", "stop sequences must be non-empty strings")
            if len(s) > MAX_STOP_STRING_LEN:
                bad("stop", f"stop sequences must be at most {MAX_STOP_STRING_LEN} characters")
        if len(self.stop_token_ids) > 1024:
            bad("stop_token_ids", "at most 1024 stop_token_ids are allowed")
        if self.logit_bias is not None and len(self.logit_bias) > 1024:
            bad("logit_bias", "logit_bias may hold at most 1024 entries")
        if self.allowed_token_ids is not None and not self.allowed_token_ids:
            bad("allowed_token_ids", "allowed_token_ids must not be empty (leave it out to allow every token)")
        if len(self.bad_words) > MAX_BAD_WORDS:
            bad("bad_words", f"at most {MAX_BAD_WORDS} bad_words are allowed, got {len(self.bad_words)}")
        for w in self.bad_words:
            if not isinstance(w, str) or not w.strip() or len(w) > MAX_BAD_WORD_LEN:
                bad("bad_words", f"bad_words must be non-blank strings of at most {MAX_BAD_WORD_LEN} characters")
        if len(self.bad_words_token_ids) > 2 * MAX_BAD_WORDS or any(not ids for ids in self.bad_words_token_ids):
            bad("bad_words", f"bad_words_token_ids takes at most {2 * MAX_BAD_WORDS} non-empty token sequences")
        if sum(len(ids) for ids in self.bad_words_token_ids) > MAX_BAD_WORD_TOKENS:
            bad("bad_words", f"the bad words are more than {MAX_BAD_WORD_TOKENS} tokens together")
        if self.thinking_token_budget is not None:
            if self.thinking_token_budget < 0:
                bad("thinking_token_budget", f"thinking_token_budget must be >= 0, got {self.thinking_token_budget}")
            if not self.thinking_end_token_ids or len(self.thinking_end_token_ids) > 16 or \
                    len(self.thinking_start_token_ids) > 16:  # fmt: skip
                bad("thinking_token_budget", "a thinking budget needs the tokens that end the thinking (this model "
                                             "does not reason)")  # fmt: skip

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def uses_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def uses_history(self) -> bool:
        """Whether a token's logits depend on the output before it (penalties, bad words, a thinking budget):
        speculative verification then gives each draft position the drafts before it."""
        return self.uses_penalties or bool(self.bad_words_token_ids) or self.thinking_token_budget is not None

    @property
    def uses_truncation(self) -> bool:
        return self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0
