"""What a template may not do, refused when it is saved instead of found out when it is sent.

`unsafe_construct` walks the parsed template (jinja2.nodes) once and names the first construct
that can only fail when rendered:

- attribute access the sandbox never allows: a name starting with '_' (`x.__class__`,
  `x['__mro__']`, `x | attr('__globals__')`) or one of the interpreter's internals (`mro`,
  `gi_frame`, ...), and, on a value the source spells out (`'{}'.format(x)`), whatever the
  sandbox itself refuses on it (the str methods outside `SAFE_STR_METHODS`);
- constant expressions, computed here as the sandbox computes them when rendering, under the
  same limits: `range(10**9)`, `'a' * 10**9`, `7 ** 10 ** 7`, `'a' | center(10**9)`, `1 / 0`;
  and numbers no message should print: an infinite one (`1e999`) or a whole number of more than
  `MAX_INTEGER_BITS` bits.

The sandbox keeps every render-time check (a template saved before these checks, or a value only
the message knows, still fails safely there); this is the earlier answer for what the source
alone shows. Computing constants is bounded by the render time limit: past it the rest is left
to the render.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any

from jinja2 import nodes
from jinja2.sandbox import (
    UNSAFE_ASYNC_GENERATOR_ATTRIBUTES,
    UNSAFE_COROUTINE_ATTRIBUTES,
    UNSAFE_FUNCTION_ATTRIBUTES,
    UNSAFE_GENERATOR_ATTRIBUTES,
    UNSAFE_METHOD_ATTRIBUTES,
    SandboxedEnvironment,
    SecurityError,
)

# As large a whole number as a power may build when rendering (the sandbox's limit on `**`).
MAX_INTEGER_BITS = 64 * 1024

# Names the sandbox refuses on whatever they are looked up on: Python's internals.
INTERNAL_NAMES = frozenset(
    {"mro"}
    | UNSAFE_FUNCTION_ATTRIBUTES
    | UNSAFE_METHOD_ATTRIBUTES
    | UNSAFE_GENERATOR_ATTRIBUTES
    | UNSAFE_COROUTINE_ATTRIBUTES
    | UNSAFE_ASYNC_GENERATOR_ATTRIBUTES
)

_UNARY: dict[type[nodes.UnaryExpr], Callable[[Any], Any]] = {
    nodes.Neg: operator.neg,
    nodes.Pos: operator.pos,
    nodes.Not: operator.not_,
}


class _Unsafe(Exception):
    def __init__(self, node: nodes.Node, why: str) -> None:
        super().__init__(why)
        self.lineno = node.lineno
        self.why = why


class _NotConstant:
    """What an expression whose value only the render knows evaluates to here."""


NOT_CONSTANT = _NotConstant()


def unsafe_construct(
    tree: nodes.Template,
    env: SandboxedEnvironment,
    *,
    max_chars: int,
    time_limit_s: float,
    timer: Callable[[], float],
) -> str | None:
    """Why `tree` can only fail when rendered by `env` ("line 3: ..."), or None. `env`'s `range`
    global, operators and filters enforce its limits; strings may be at most `max_chars`."""
    # `range` is the sandbox's only while no `set`, loop or macro argument takes the name.
    shadowed = any(n.name == "range" and n.ctx in ("store", "param") for n in tree.find_all(nodes.Name))
    walker = _Walker(env, max_chars, timer() + time_limit_s, timer, computes_range=not shadowed)
    try:
        walker.visit(tree)
    except _Unsafe as exc:
        return f"line {exc.lineno}: {exc.why}"
    return None


class _Walker:
    """Visits every node once; `visit` returns an expression's constant value, or NOT_CONSTANT."""

    def __init__(
        self,
        env: SandboxedEnvironment,
        max_chars: int,
        deadline: float,
        timer: Callable[[], float],
        *,
        computes_range: bool,
    ) -> None:
        self.env = env
        self.max_chars = max_chars
        self.deadline = deadline
        self.timer = timer
        self.computes_range = computes_range

    def visit(self, node: nodes.Node) -> Any:
        if isinstance(node, nodes.Const):
            return self._number(node, node.value)
        if isinstance(node, nodes.Getattr):
            return self._attribute(node, self.visit(node.node), node.attr)
        if isinstance(node, nodes.Getitem):
            return self._item(node)
        if isinstance(node, nodes.Filter) and node.name == "attr" and node.args:
            name = node.args[0]
            if isinstance(name, nodes.Const) and isinstance(name.value, str):
                self._attribute(node, NOT_CONSTANT, name.value)
        if isinstance(node, nodes.Call) and self._is_range(node):
            values = [self.visit(arg) for arg in node.args]
            checked_range: Callable[..., range] = self.env.globals["range"]  # type: ignore[assignment]
            if self._known(values):
                return self._computed(node, lambda: checked_range(*values))
            return NOT_CONSTANT
        values = [self.visit(child) for child in node.iter_child_nodes()]
        if not self._known(values):
            return NOT_CONSTANT
        return self._evaluate(node, values)

    def _known(self, values: list[Any]) -> bool:
        """Whether every value is a constant, and there is time left to compute with them."""
        return all(v is not NOT_CONSTANT for v in values) and self.timer() <= self.deadline

    def _attribute(self, node: nodes.Node, owner: Any, name: str) -> Any:
        if name.startswith("_") or name in INTERNAL_NAMES:
            raise _Unsafe(node, f"'{name[:64]}' is not available to templates")
        if owner is NOT_CONSTANT:
            return NOT_CONSTANT
        value = getattr(owner, name, NOT_CONSTANT)
        if value is NOT_CONSTANT or not self.env.is_safe_attribute(owner, name, value):
            raise _Unsafe(node, f"'{name[:64]}' of a {type(owner).__name__} is not available to templates")
        return NOT_CONSTANT  # a method: calls are not computed here

    def _item(self, node: nodes.Getitem) -> Any:
        owner = self.visit(node.node)
        key = self.visit(node.arg)
        if isinstance(key, str) and (key.startswith("_") or key in INTERNAL_NAMES):
            # the sandbox looks a string key up as an attribute too
            raise _Unsafe(node, f"'{key[:64]}' is not available to templates")
        if not self._known([owner, key]):
            return NOT_CONSTANT
        return self._computed(node, lambda: owner[key])

    def _is_range(self, node: nodes.Call) -> bool:
        return (
            self.computes_range
            and isinstance(node.node, nodes.Name)
            and node.node.name == "range"
            and not node.kwargs
            and node.dyn_args is None
            and node.dyn_kwargs is None
        )

    def _evaluate(self, node: nodes.Node, values: list[Any]) -> Any:
        """The value of `node` from its children's constant values (in `iter_child_nodes` order)."""
        if isinstance(node, nodes.BinExpr):
            if node.operator not in self.env.binop_table:  # `and`, `or`: nothing to limit
                return NOT_CONSTANT
            left, right = values
            return self._computed(node, lambda: self.env.call_binop(None, node.operator, left, right))  # type: ignore[arg-type]
        if type(node) in _UNARY:
            return self._computed(node, lambda: _UNARY[type(node)](values[0]))  # type: ignore[index]
        if isinstance(node, nodes.Tuple):
            return tuple(values)
        if isinstance(node, nodes.List):
            return list(values)
        if isinstance(node, nodes.Concat):
            parts = [str(v) for v in values]
            if sum(len(p) for p in parts) > self.max_chars:
                raise _Unsafe(node, f"a ~ concatenation would be larger than {self.max_chars} characters")
            return "".join(parts)
        if isinstance(node, nodes.Filter) and node.node is not None:
            return self._filtered(node, values)
        return NOT_CONSTANT

    def _filtered(self, node: nodes.Filter, values: list[Any]) -> Any:
        """A filter on constants, called as the render would call it. One that needs the render's
        context, takes keywords, or fails for any reason but a limit, is left to the render."""
        if node.kwargs or node.dyn_args is not None or node.dyn_kwargs is not None:
            return NOT_CONSTANT
        try:
            return self._number(node, self.env.call_filter(node.name, values[0], values[1:]))
        except SecurityError as exc:
            raise _Unsafe(node, str(exc)) from None
        except _Unsafe:
            raise
        except Exception:
            return NOT_CONSTANT

    def _computed(self, node: nodes.Node, compute: Callable[[], Any]) -> Any:
        """`compute()` as the sandbox computes it, or why that always fails: a limit (`'a' * 10**9`),
        or an error (`1 / 0`, `'a' - 1`, a float overflow)."""
        try:
            value = compute()
        except SecurityError as exc:
            raise _Unsafe(node, str(exc)) from None
        except (ArithmeticError, TypeError, ValueError, LookupError) as exc:
            raise _Unsafe(node, f"always fails: {str(exc)[:200] or type(exc).__name__}") from None
        return self._number(node, value)

    def _number(self, node: nodes.Node, value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            raise _Unsafe(node, "a number that is not finite (too large to print)")
        if isinstance(value, int) and value.bit_length() > MAX_INTEGER_BITS:
            raise _Unsafe(node, f"a whole number of more than {MAX_INTEGER_BITS} bits")
        return value
