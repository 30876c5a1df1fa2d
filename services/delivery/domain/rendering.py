"""Template rendering that never embarrasses the sender and never takes the service down.

Templates are Jinja2 in a sandbox (`SandboxedEnvironment` with `StrictUndefined`, no
autoescape: the output is plain text). A variable the template uses but the
message does not have is an error, not an empty string; the `fallback` filter
is the explicit way to say what to print instead:

    Hi {{ first_name | fallback("there") }},

Limits (documented in the README's "Templates" section; a channel may set its own sizes,
`RenderLimits`, and email's are these):

- source: subject at most 1 KiB, body at most 64 KiB (checked when saved);
- output: subject and body together at most 256 KiB; the subject is one line of at most
  998 characters: a rendered subject holding a CR or LF is refused (not folded: it goes into
  a mail header, where a line break would start headers of its own), other runs of
  whitespace become one space;
- time: a render may use at most `RENDER_TIME_LIMIT_S` seconds of CPU (thread time, so a
  busy machine does not fail a render that is merely waiting), checked at every loop
  step, call, operator and output chunk; `range()` yields at most 10,000 items;
- operators and filters that could build huge values (`*`, `+`, `~`, `**`, `%`,
  `center`, `indent`, `replace`, `join`, `format`, `batch`, ...) check the size of
  their result before building it; `str.format` and the padding methods are blocked.

Whitespace: `trim_blocks` and `lstrip_blocks` are on (a line holding only a block tag
leaves no blank line in a plain-text mail) and a trailing newline is kept.

When a template is saved (`Renderer.check`), what can only fail when rendered is refused
already (`template_safety.py`: unsafe attribute names, constant expressions over these limits,
numbers no message should print, nesting deeper than Jinja compiles); the checks above stay.

After rendering, output that still contains `{{`, `}}`, `None`, `undefined` or an
empty greeting ("Hi ,") is refused. Every refusal is a `RenderError` whose `why`
says what went wrong; the message is then not sent.
"""

from __future__ import annotations

import re
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from jinja2 import StrictUndefined, Template, TemplateSyntaxError, Undefined, nodes, pass_context
from jinja2 import filters as jinja_filters
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError
from jinja2.visitor import NodeTransformer

from services.delivery.domain.template_safety import unsafe_construct

MAX_SUBJECT_SOURCE_BYTES = 1024
MAX_BODY_SOURCE_BYTES = 64 * 1024
MAX_OUTPUT_BYTES = 256 * 1024
MAX_SUBJECT_CHARS = 998  # RFC 5322 line length
MAX_RANGE = 10_000
MAX_WIDTH = 1_000  # padding and indentation widths
RENDER_TIME_LIMIT_S = 0.25


@dataclass(frozen=True, slots=True)
class RenderLimits:
    """How large a channel's templates (when saved) and rendered messages (when sent) may be."""

    subject_source_bytes: int
    body_source_bytes: int
    # Subject and body together, rendered; never more than the renderer's own `max_output_bytes`.
    output_bytes: int
    # The rendered subject, which is always one line; 0 for a channel without one (SMS).
    subject_chars: int

    @property
    def has_subject(self) -> bool:
        """False for a channel whose messages have no subject: its templates leave it empty."""
        return self.subject_chars > 0


# The limits above, which every template had before channels brought their own.
DEFAULT_LIMITS = RenderLimits(
    subject_source_bytes=MAX_SUBJECT_SOURCE_BYTES,
    body_source_bytes=MAX_BODY_SOURCE_BYTES,
    output_bytes=MAX_OUTPUT_BYTES,
    subject_chars=MAX_SUBJECT_CHARS,
)

# str methods a template may call; the rest (format, padding, encode, ...) are blocked.
SAFE_STR_METHODS = frozenset(
    {
        "capitalize",
        "casefold",
        "count",
        "endswith",
        "find",
        "index",
        "isalnum",
        "isalpha",
        "isdecimal",
        "isdigit",
        "islower",
        "isnumeric",
        "isspace",
        "istitle",
        "isupper",
        "lower",
        "lstrip",
        "partition",
        "removeprefix",
        "removesuffix",
        "replace",
        "rfind",
        "rindex",
        "rpartition",
        "rsplit",
        "rstrip",
        "split",
        "splitlines",
        "startswith",
        "strip",
        "swapcase",
        "title",
        "upper",
    }
)

_FORMAT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")
_LONG_NUMBER = re.compile(rf"\d{{{sys.get_int_max_str_digits() + 1},}}")
_LEFTOVER_MARKUP = ("{{", "}}")
_NONE_WORD = re.compile(r"\bNone\b")
_UNDEFINED_WORD = re.compile(r"\bundefined\b")
_GREETINGS = r"hi|hello|hey|dear|hallo|hej|hola|bonjour|ciao|salut|moin|servus|greetings|good morning"
# "Hi ," / "Hello !" at the start of a line: the name between them rendered empty.
_EMPTY_GREETING = re.compile(rf"(?im)^[ \t]*(?:{_GREETINGS})[ \t]+[,!.;:]")
# "Dear," / "Dear ," / a line that is just "Dear": nobody is addressed.
_EMPTY_DEAR = re.compile(r"(?im)^[ \t]*dear[ \t]*(?:[,!.;:]|$)")


class RenderError(Exception):
    """The template cannot be rendered safely; `why` says what went wrong."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why

    @property
    def reason(self) -> str:
        """The stable reason recorded on a suppressed message."""
        return f"render_failed: {self.why}"


class RenderLimitExceeded(SecurityError):
    """A render went over its time or size budget."""


@dataclass(frozen=True, slots=True)
class Rendered:
    subject: str
    body_text: str


# ---- the fallback filter ----------------------------------------------------------------------


def is_blank(value: Any) -> bool:
    """Undefined, None, an empty or whitespace-only string, or an empty collection."""
    if value is None or isinstance(value, Undefined):
        return True
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, (list, tuple, dict, set, frozenset)):
        return not value
    return False


def fallback(value: Any, default: Any = "") -> Any:
    """`{{ first_name | fallback("there") }}`: the value, or `default` when it is blank."""
    return default if is_blank(value) else value


# ---- the sandbox ------------------------------------------------------------------------------


class _Budget:
    """Time and size budget of one render; checked from inside the template's code."""

    __slots__ = ("deadline", "max_chars", "ticks", "timer")

    def __init__(self, timer: Callable[[], float], time_limit_s: float, max_chars: int) -> None:
        self.timer = timer
        self.deadline = timer() + time_limit_s
        self.max_chars = max_chars
        self.ticks = 0

    def tick(self) -> None:
        self.ticks += 1
        if self.ticks & 0x3F == 0:
            self.check_time()

    def check_time(self) -> None:
        if self.timer() > self.deadline:
            raise RenderLimitExceeded("render time limit exceeded")

    def check_size(self, chars: int, what: str) -> None:
        if chars > self.max_chars:
            raise RenderLimitExceeded(f"{what} would be larger than {self.max_chars} characters")


class _Guard(NodeTransformer):
    """Rewrites a parsed template so loops and `~` go through the budget checks."""

    def visit_For(self, node: nodes.For) -> nodes.Node:
        self.generic_visit(node)
        node.iter = nodes.Filter(node.iter, "rv_checked_iter", [], [], None, None, lineno=node.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        items = nodes.List(list(node.nodes), lineno=node.lineno)
        return nodes.Filter(items, "rv_checked_concat", [], [], None, None, lineno=node.lineno)


def _length(value: Any) -> int:
    try:
        return len(value)
    except TypeError:
        return 0


class SafeEnvironment(ImmutableSandboxedEnvironment):
    """`SandboxedEnvironment(undefined=StrictUndefined, autoescape=False)` with budgets.

    (Immutable: templates cannot change the variables they are given.)
    """

    intercepted_binops = frozenset({"*", "**", "%", "+"})

    def __init__(self, *, max_output_chars: int = MAX_OUTPUT_BYTES, max_range: int = MAX_RANGE) -> None:
        super().__init__(
            undefined=StrictUndefined,
            autoescape=False,
            keep_trailing_newline=True,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.max_output_chars = max_output_chars
        self.max_range = max_range
        self.budget: _Budget | None = None
        self.globals.pop("lipsum", None)
        self.globals["range"] = self.checked_range
        self.filters.update(
            {
                "fallback": fallback,
                "rv_checked_iter": self._checked_iter,
                "rv_checked_concat": self._checked_concat,
                "center": self._center,
                "indent": self._indent,
                "wordwrap": self._wordwrap,
                "format": self._format,
                "replace": self._replace,
                "join": self._join,
                "tojson": self._tojson,
                "batch": self._batch,
                "slice": self._slice,
            }
        )

    # -- budget helpers

    def _tick(self) -> None:
        if self.budget is not None:
            self.budget.tick()

    def _size(self, chars: int, what: str) -> None:
        if self.budget is not None:
            self.budget.check_size(chars, what)
        elif chars > self.max_output_chars:
            raise RenderLimitExceeded(f"{what} would be larger than {self.max_output_chars} characters")

    def checked_range(self, *args: int) -> range:
        rng = range(*args)
        if len(rng) > self.max_range:
            raise RenderLimitExceeded(f"range() may yield at most {self.max_range} items, not {len(rng)}")
        return rng

    # -- sandbox hooks

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        if isinstance(obj, str) and attr not in SAFE_STR_METHODS:
            return False
        return bool(super().is_safe_attribute(obj, attr, value))

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        return None  # str.format / format_map are not allowed at all (see is_safe_attribute)

    def call(self, context: Context, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        self._tick()
        owner = getattr(obj, "__self__", None)
        if isinstance(owner, str) and getattr(obj, "__name__", "") == "replace":
            return self._replace_size(owner, *args, **kwargs)
        return super().call(context, obj, *args, **kwargs)

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        self._tick()
        sequences = (str, list, tuple)
        if operator == "+" and isinstance(left, sequences) and isinstance(right, sequences):
            self._size(len(left) + len(right), "a concatenation")
        elif operator == "*":
            seq, n = (left, right) if isinstance(left, sequences) else (right, left)
            if isinstance(seq, sequences) and isinstance(n, int):
                self._size(len(seq) * max(n, 0), "a repetition")
        elif operator == "**" and isinstance(left, int) and isinstance(right, int):
            if right > 0 and abs(left) > 1 and right * abs(left).bit_length() > 64 * 1024:
                raise RenderLimitExceeded("a power too large to compute")
        elif operator == "%" and isinstance(left, str):
            self._check_format(left, right)
        return self.binop_table[operator](left, right)

    # -- checks shared by operators, filters and methods

    def _check_format(self, fmt: str, values: Any) -> None:
        for width, precision in _FORMAT_SPEC.findall(fmt):
            for n in (width, precision):
                if n == "*" or (n and int(n) > MAX_WIDTH):
                    raise RenderLimitExceeded(f"format widths may be at most {MAX_WIDTH}")
        parts = values if isinstance(values, (tuple, list)) else [values]
        self._size(len(fmt) + sum(_length(str(p)) for p in parts), "a formatted string")

    def _replace_size(self, s: str, old: str, new: str, count: int = -1) -> str:
        if not isinstance(s, str) or not isinstance(old, str) or not isinstance(new, str):
            return s.replace(old, new, count)
        hits = s.count(old) if old else len(s) + 1
        if count is not None and count >= 0:
            hits = min(hits, count)
        self._size(len(s) + hits * (len(new) - len(old)), "a replacement")
        return s.replace(old, new, count if count is not None else -1)

    # -- internal filters the guard inserts

    @pass_context
    def _checked_iter(self, context: Context, value: Any) -> Any:
        if isinstance(value, Undefined):
            return value  # iterating it raises the usual "is undefined" error
        return self._iterate(value)

    def _iterate(self, value: Iterable[Any]) -> Iterator[Any]:
        for item in value:
            self._tick()
            yield item

    @pass_context
    def _checked_concat(self, context: Context, items: list[Any]) -> str:
        parts = [str(item) for item in items]
        self._size(sum(len(p) for p in parts), "a ~ concatenation")
        return "".join(parts)

    # -- size-checked versions of Jinja's filters

    def _center(self, value: Any, width: int = 80) -> str:
        if width > MAX_WIDTH:
            raise RenderLimitExceeded(f"center() width may be at most {MAX_WIDTH}")
        return str(jinja_filters.do_center(value, width))

    def _indent(self, s: str, width: int | str = 4, first: bool = False, blank: bool = False) -> str:
        text = str(s)
        pad = len(width) if isinstance(width, str) else int(width)
        if pad > MAX_WIDTH:
            raise RenderLimitExceeded(f"indent() width may be at most {MAX_WIDTH}")
        self._size(len(text) + pad * (text.count("\n") + 1), "an indentation")
        return str(jinja_filters.do_indent(text, width, first, blank))

    def _wordwrap(
        self,
        s: str,
        width: int = 79,
        break_long_words: bool = True,
        wrapstring: str | None = None,
        break_on_hyphens: bool = True,
    ) -> str:
        if wrapstring is not None and len(str(wrapstring)) > 10:
            raise RenderLimitExceeded("wordwrap() wrapstring may be at most 10 characters")
        if width < 1:
            raise RenderLimitExceeded("wordwrap() width must be positive")
        self._size(len(str(s)) * 2, "a wrapped text")
        return str(jinja_filters.do_wordwrap(self, s, width, break_long_words, wrapstring, break_on_hyphens))

    def _format(self, value: str, *args: Any, **kwargs: Any) -> str:
        if args and kwargs:
            raise jinja_filters.FilterArgumentError("can't handle positional and keyword arguments")
        values: Any = kwargs or args
        self._check_format(str(value), values)
        return str(value) % values

    def _replace(self, s: Any, old: str, new: str, count: int | None = None) -> str:
        return self._replace_size(str(s), str(old), str(new), -1 if count is None else count)

    def _join(self, value: Iterable[Any], d: str = "", attribute: str | int | None = None) -> str:
        if attribute is not None:
            value = [self.getitem(item, attribute) for item in value]
        parts = [str(item) for item in value]
        self._size(sum(len(p) for p in parts) + len(str(d)) * max(len(parts) - 1, 0), "a join")
        return str(d).join(parts)

    def _tojson(self, value: Any, indent: int | None = None) -> str:
        if indent is not None and indent > 8:
            raise RenderLimitExceeded("tojson() indent may be at most 8")
        from jinja2.utils import htmlsafe_json_dumps

        return str(htmlsafe_json_dumps(value, dumps=None, indent=indent))

    def _batch(self, value: Iterable[Any], linecount: int, fill_with: Any = None) -> Iterator[list[Any]]:
        if linecount > self.max_range:
            raise RenderLimitExceeded(f"batch() size may be at most {self.max_range}")
        return jinja_filters.do_batch(value, linecount, fill_with)

    def _slice(self, value: Iterable[Any], slices: int, fill_with: Any = None) -> Iterator[list[Any]]:
        if slices > self.max_range:
            raise RenderLimitExceeded(f"slice() count may be at most {self.max_range}")
        return jinja_filters.do_slice(value, slices, fill_with)


# ---- the renderer -----------------------------------------------------------------------------


def syntax_error(exc: TemplateSyntaxError) -> str:
    return f"line {exc.lineno}: {exc.message or 'syntax error'}"


_UNSUPPORTED_NODES: tuple[tuple[type[nodes.Node], str], ...] = (
    (nodes.Extends, "extends"),
    (nodes.Include, "include"),
    (nodes.Import, "import"),
    (nodes.FromImport, "from ... import"),
)


class Renderer:
    """Compiles (with a cache) and renders templates within the limits above."""

    def __init__(
        self,
        *,
        time_limit_s: float = RENDER_TIME_LIMIT_S,
        max_output_bytes: int = MAX_OUTPUT_BYTES,
        max_range: int = MAX_RANGE,
        timer: Callable[[], float] = time.thread_time,
        cache_size: int = 512,
    ) -> None:
        self.env = SafeEnvironment(max_output_chars=max_output_bytes, max_range=max_range)
        self.time_limit_s = time_limit_s
        self.max_output_bytes = max_output_bytes
        self.timer = timer
        self.cache_size = cache_size
        self._cache: OrderedDict[str, Template] = OrderedDict()

    def check(self, source: str) -> str | None:
        """Why `source` is not a usable template ("line 3: unexpected '}'"), or None if it is:
        its syntax, then what it may not do (`template_safety`), then whether it compiles."""
        try:
            tree = self.parse(source)
        except TemplateSyntaxError as exc:
            return syntax_error(exc)
        for kind, name in _UNSUPPORTED_NODES:
            found = next(iter(tree.find_all(kind)), None)
            if found is not None:
                return f"line {found.lineno}: {name} is not supported in templates"
        unsafe = unsafe_construct(
            tree, self.env, max_chars=self.max_output_bytes, time_limit_s=self.time_limit_s, timer=self.timer
        )
        if unsafe:
            return unsafe
        try:
            self.compile(source)
        except TemplateSyntaxError as exc:
            return syntax_error(exc)
        return None

    def parse(self, source: str) -> nodes.Template:
        """The template's syntax tree; TemplateSyntaxError also for what Jinja itself cannot
        take: a number literal longer than Python reads, nesting deeper than its recursion."""
        try:
            return self.env.parse(source)
        except ValueError:  # int() of a literal of more than 4,300 digits
            long_number = _LONG_NUMBER.search(source)
            lineno = source.count("\n", 0, long_number.start()) + 1 if long_number else 1
            limit = sys.get_int_max_str_digits()
            raise TemplateSyntaxError(f"a number literal of more than {limit} digits", lineno) from None
        except RecursionError:
            raise TemplateSyntaxError("nested too deeply", 1) from None

    def compile(self, source: str) -> Template:
        template = self._cache.get(source)
        if template is not None:
            self._cache.move_to_end(source)
            return template
        tree = _Guard().visit(self.parse(source))
        try:
            template = self.env.from_string(tree)
        except (RecursionError, SyntaxError):  # the Python Jinja generates nests too deeply
            raise TemplateSyntaxError("nested too deeply", 1) from None
        self._cache[source] = template
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return template

    def render(
        self,
        subject: str,
        body_text: str,
        variables: Mapping[str, Any],
        limits: RenderLimits = DEFAULT_LIMITS,
    ) -> Rendered:
        """Both parts rendered and checked against `limits` (the channel's); RenderError says why not."""
        max_output_bytes = min(self.max_output_bytes, limits.output_bytes)
        budget = _Budget(self.timer, self.time_limit_s, max_output_bytes)
        context = {k: v for k, v in variables.items() if v is not None}
        raw_subject = self._render_part("subject", subject, context, budget)
        if "\r" in raw_subject or "\n" in raw_subject:
            # refused, not folded: a line break that came from a variable is an attempt to add headers
            raise RenderError("subject: contains a line break (CR or LF)")
        rendered_subject = " ".join(raw_subject.split())
        budget.max_chars = max_output_bytes - len(rendered_subject.encode())
        rendered_body = self._render_part("body_text", body_text, context, budget)
        if not rendered_subject and limits.has_subject:
            raise RenderError("subject: rendered empty")
        if len(rendered_subject) > limits.subject_chars:
            raise RenderError(f"subject: longer than {limits.subject_chars} characters")
        if not rendered_body.strip():
            raise RenderError("body_text: rendered empty")
        if len(rendered_subject.encode()) + len(rendered_body.encode()) > max_output_bytes:
            raise RenderError(f"output larger than {max_output_bytes} bytes")
        for part, text in (("subject", rendered_subject), ("body_text", rendered_body)):
            problem = unsafe_output(text)
            if problem:
                raise RenderError(f"{part}: {problem}")
        return Rendered(rendered_subject, rendered_body)

    def render_line(self, part: str, source: str, variables: Mapping[str, Any], max_chars: int) -> str:
        """One more part of a message (a banner's link), rendered as one line of at most `max_chars`
        and checked as the subject is; RenderError names `part`."""
        budget = _Budget(self.timer, self.time_limit_s, min(self.max_output_bytes, 4 * max_chars))
        context = {k: v for k, v in variables.items() if v is not None}
        line = "".join(self._render_part(part, source, context, budget).split())
        if len(line) > max_chars:
            raise RenderError(f"{part}: longer than {max_chars} characters")
        problem = unsafe_output(line)
        if problem:
            raise RenderError(f"{part}: {problem}")
        return line

    def _render_part(self, part: str, source: str, context: Mapping[str, Any], budget: _Budget) -> str:
        try:
            template = self.compile(source)
        except TemplateSyntaxError as exc:
            raise RenderError(f"{part}: {syntax_error(exc)}") from exc
        chunks: list[str] = []
        size = 0
        self.env.budget = budget
        try:
            for chunk in template.generate(context):
                size += len(chunk)
                budget.check_size(size, "the output")
                # The CPU clock is a system call: read every 16th chunk (loops tick on their own).
                if len(chunks) & 0xF == 0xF:
                    budget.check_time()
                chunks.append(chunk)
        except RenderLimitExceeded as exc:
            raise RenderError(f"{part}: {exc}") from exc
        except RecursionError as exc:
            raise RenderError(f"{part}: recursion too deep") from exc
        except Exception as exc:  # the template is untrusted: any error it raises means "not sent"
            raise RenderError(f"{part}: {_describe(exc)}") from exc
        finally:
            self.env.budget = None
        return "".join(chunks)


def _describe(exc: Exception) -> str:
    message = str(exc) or type(exc).__name__
    if len(message) > 300:
        message = message[:297] + "..."
    return message


def unsafe_output(text: str) -> str | None:
    """Why rendered text must not be sent, or None: leftover markup, None, undefined, "Hi ,"."""
    for marker in _LEFTOVER_MARKUP:
        if marker in text:
            return f"output contains {marker!r}"
    if _NONE_WORD.search(text):
        return "output contains 'None'"
    if _UNDEFINED_WORD.search(text):
        return "output contains 'undefined'"
    if _EMPTY_GREETING.search(text) or _EMPTY_DEAR.search(text):
        return "output contains an empty greeting"
    return None
