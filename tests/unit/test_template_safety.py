"""Templates whose unsafe constructs are refused when saved (`Renderer.check`, `template_safety`),
while the sandbox keeps refusing them when rendered (test_delivery_domain.py renders them unchecked)."""

from __future__ import annotations

import itertools

import pytest

from services.delivery.domain.rendering import Renderer, RenderError


@pytest.fixture
def renderer() -> Renderer:
    return Renderer()


@pytest.mark.parametrize(
    ("source", "why"),
    [
        ("{{ ''.__class__.__mro__ }}", "line 1: '__class__' is not available"),
        ("Hi\n{{ event.__mro__ }}", "line 2: '__mro__' is not available"),
        ("{{ event._private }}", "'_private' is not available"),
        ("{{ event['__class__'] }}", "'__class__' is not available"),
        ("{{ event | attr('__globals__') }}", "'__globals__' is not available"),
        ("{{ cycler.mro() }}", "'mro' is not available"),
        ("{{ items.gi_frame }}", "'gi_frame' is not available"),
        ("{{ '{0.__class__}'.format(event) }}", "'format' of a str is not available"),
        ("{{ 'a'.ljust(10**9) }}", "'ljust' of a str is not available"),
        ("{{ [1, 2].append(3) }}", "'append' of a list is not available"),
        ("{{ 'abc'.nothing }}", "'nothing' of a str is not available"),
        ("{% for i in range(10**9) %}x{% endfor %}", "range() may yield at most 10000 items"),
        ("{{ range(0, 10**6, 2) | list }}", "range() may yield at most 10000 items"),
        ("{{ 'a' * 10**9 }}", "a repetition would be larger than"),
        ("{{ ['a'] * 10**9 }}", "a repetition would be larger than"),
        ("{{ ('a' * 200000) ~ ('b' * 200000) }}", "a ~ concatenation would be larger than"),
        ("{{ 7 ** 100000 }}", "a power too large"),
        ("{{ 9 ** 16000 * 9 ** 16000 }}", "a whole number of more than 65536 bits"),
        ("{{ 'a' | center(10**9) }}", "center() width may be at most"),
        ("{{ 'x' | indent(5000) }}", "indent() width may be at most"),
        ("{{ '%99999s' % 'a' }}", "format widths may be at most"),
        ("{{ 1e999 }}", "not finite"),
        ("{{ 1e308 * 10 }}", "not finite"),
        ("{{ " + "9" * 5000 + " }}", "a number literal of more than 4300 digits"),
        ("a\nb\n{{ " + "9" * 5000 + " }}", "line 3: a number literal"),
        ("{{ 1 / 0 }}", "always fails: division by zero"),
        ("{{ 'a' - 1 }}", "always fails: unsupported operand"),
        ("{{ [1, 2][5] }}", "always fails: list index out of range"),
        ("{{ " + "(" * 100 + "1" + ")" * 100 + " }}", "nested too deeply"),
        ("{% if x %}" * 101 + "y" + "{% endif %}" * 101, "nested too deeply"),
    ],
)
def test_what_can_only_fail_when_rendered_is_refused_when_saved(
    renderer: Renderer, source: str, why: str
) -> None:
    problem = renderer.check(source)
    assert problem is not None and why in problem, problem
    assert problem.startswith("line ")


@pytest.mark.parametrize(
    "source",
    [
        "Hi {{ first_name | fallback('there') }},\nyou left {{ event.product_name }} in your cart.\n",
        "{{ 'Hi'.upper() }} {{ event.items() | list | length }} {{ range(3) | list }} {{ 2 ** 10 }}",
        "{{ '-' * 40 }} {{ 'a' ~ 'b' }} {{ 1.5 * 2 }} {{ -3 }} {{ not x }} {{ 'abc'[0] }} {{ [1][0:1] }}",
        "{{ '%s items' % 3 }} {{ 'x' | center(20) }} {{ range(10000) | join('-') | length }}",
        "{% for i in range(n) %}{{ i }}{% endfor %} {{ event | attr(name) }} {{ event[key] }}",
        "{% if false %}{{ x.y }}{% endif %}{{ event.mro_discount | fallback(0) }}",
        "{{ true and false }} {{ 1 or 2 }} {{ 1 < 2 }} {{ 3 in [1, 2] }} {{ 1 if true else 2 }}",
        "{{ 5 // 2 }} {{ 5 % 3 }} {{ 5 - 1 }} {{ (1, 2) | first }} {{ [3, 1] | sort | first }}",
        # `range` a template defines itself is not the sandbox's: left to the render.
        "{% set range = event.ranges %}{{ range(10**9) }}",
    ],
)
def test_usual_templates_are_accepted(renderer: Renderer, source: str) -> None:
    assert renderer.check(source) is None


def test_computing_constants_stops_at_the_time_limit_and_leaves_the_rest_to_the_render() -> None:
    ticks = itertools.count()
    slow = Renderer(timer=lambda: next(ticks) * 0.01, time_limit_s=0.05)
    source = "{{ 1 + 1 }}" * 10 + "{{ 'a' * 10**9 }}"
    assert slow.check(source) is None
    with pytest.raises(RenderError) as caught:
        Renderer().render("s", source, {})
    assert "a repetition would be larger than" in caught.value.why


def test_attribute_names_are_refused_whatever_the_render_would_be_given(renderer: Renderer) -> None:
    # Refused when saved although a message could have such a key: no data has a reason to.
    assert renderer.check("{{ event.__len__ }}") is not None
    assert renderer.check("{{ event.len }}") is None
