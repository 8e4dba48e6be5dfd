"""Tools: Python callables whose result fills a placeholder of the same name.

A tool's parameters name what it reads (`query` or agent names), e.g. `def search(query): ...`; the
runtime calls it with those values, in the process of the agent whose template uses it. A tool that
returns a list of texts (retrieved chunks) fills its placeholder with one segment per text, so each
keeps its own identity (and its KV can be reused) in whatever order and position it lands. Anything else
(None, a dict, a number) is refused rather than str()-ed into the prompt: that is almost always a bug.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import PipelineError, check_text

_RETURNS = "return a str (its text) or a list of str (one segment each); convert other values yourself"


@dataclass(frozen=True)
class Tool:
    name: str
    fn: Callable[..., object]
    inputs: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise PipelineError(f"tool name {self.name!r} must be a Python identifier (it is used as {{{self.name}}})")
        if not callable(self.fn):
            raise PipelineError(f"tool {self.name!r}: fn must be callable, got {type(self.fn).__name__}")
        params = inspect.signature(self.fn).parameters.values()
        names = []
        for param in params:
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                raise PipelineError(f"tool {self.name!r}: *args/**kwargs cannot name inputs; list them as parameters")
            names.append(param.name)
        object.__setattr__(self, "inputs", tuple(names))

    def __call__(self, values: dict[str, str]) -> str | tuple[str, ...]:
        try:
            result = self.fn(**{name: values[name] for name in self.inputs})
        except Exception as exc:
            raise ToolError(f"tool {self.name!r} failed: {type(exc).__name__}: {exc}") from exc
        if isinstance(result, str):
            check_text(result, f"the output of tool {self.name!r}", ToolError)
            return result
        if not isinstance(result, list | tuple):
            raise ToolError(f"tool {self.name!r} returned a value of type {type(result).__name__}; {_RETURNS}")
        for index, item in enumerate(result):
            if not isinstance(item, str):
                raise ToolError(
                    f"tool {self.name!r} returned a {type(result).__name__} whose item {index} is of type "
                    f"{type(item).__name__}; {_RETURNS}"
                )
            check_text(item, f"item {index} of the output of tool {self.name!r}", ToolError)
        return tuple(result)


def tool(fn: Callable[..., object]) -> Tool:
    """Decorator: `@tool def search(query): ...` makes a Tool named after the function."""
    return Tool(fn.__name__, fn)


class ToolError(RuntimeError):
    """A tool raised, or returned what cannot fill a placeholder; the message names the tool and the cause."""
