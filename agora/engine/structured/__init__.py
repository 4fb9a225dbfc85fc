"""Structured outputs: grammars compiled off the step loop (``compiler``), one matcher per
sequence that keeps a valid ending in reserve (``state``), and the endings themselves
(``endings``). The sampler's ``GrammarMask`` link applies the masks."""

from agora.engine.structured.compiler import Constraint, GrammarCompiler, GrammarError
from agora.engine.structured.state import GrammarState

__all__ = ["Constraint", "GrammarCompiler", "GrammarError", "GrammarState"]
