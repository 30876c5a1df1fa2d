"""Segment and trigger conditions as data: a typed expression tree, its validation and fast
evaluation. One language, shared by the profile and trigger services.

A condition is one of

- `All(children)` / `Any(children)`: every / at least one child holds (`All(())` is true, `Any(())` false,
  though `parse_condition` rejects empty lists);
- `Not(child)`;
- `Compare(field, op, value)`: a field of the profile view against a constant;
- `CountInWindow(event_type, window, op, value, property, property_value)`: how many events of a type
  (optionally with `properties[property] == property_value`) the person had in the last `window`,
  answered from the counters.

Fields are dotted paths into a `ProfileView`:

| field                          | type      | ops                                        |
|--------------------------------|-----------|--------------------------------------------|
| `trait.<name>`                 | any       | eq ne lt le gt ge (numbers) in contains exists |
| `tag`                          | tags      | contains (has the tag), in (has any of them) |
| `counter.<name>`               | number    | eq ne lt le gt ge in exists                |
| `score`                        | number    | eq ne lt le gt ge in                       |
| `consent.<purpose>.<channel>`  | status    | eq ne in exists                            |
| `last_seen.<event_type>`       | datetime  | eq ne lt le gt ge exists                   |
| `event.<property>`             | any       | as traits (trigger conditions only)        |

`event.<property>` is a property of the event a trigger condition is evaluated on: the property of
that exact name first, else the dotted path into nested objects (`event.page.url`). Segments have no
event, so `parse_condition` refuses it unless `trigger=True`; a trigger condition in turn refuses
`count` (the trigger service has no counters to answer it from; a threshold trigger counts events).

A value that is missing (no such trait, counter, consent or last-seen time, or a trait of another type)
compares false, except that `ne` is then true and `exists` is what it says.

The JSON-like form, for storage and the API:

    {"all": [{"compare": {"field": "trait.vip", "op": "eq", "value": true}},
             {"count": {"event_type": "page_view", "property": "category", "property_value": "toys",
                        "window_days": 7, "op": "ge", "value": 11}}]}

`parse_condition` validates it fully and raises `InvalidArgument` naming every offending path
(`condition.all[1].count.window_days`); `to_dict` is its inverse. `compile_condition` turns a tree into
a closure once, so evaluating it per event costs a few microseconds.

Pure: stdlib only, no I/O.

The package, by role (each module imports only those listed before it, and only relative to this
package):

- `fields`: the field paths, the ops each kind of field allows, the vocabulary they are checked against;
- `nodes`: the tree's node types and walks over it;
- `json_form`: a tree to its JSON-like form;
- `parsing`: the JSON-like form to a tree, with every violation named by path, and the limits;
- `evaluation`: `ProfileView` and compiling a tree into a closure over it.
"""

from .evaluation import (
    Predicate,
    ProfileView,
    WindowCounts,
    compile_condition,
    evaluate,
)
from .fields import (
    CHANNELS,
    CONSENT,
    CONTAINS,
    COUNT_OPS,
    COUNTER,
    COUNTER_NAME_RE,
    EQ,
    EVENT,
    EVENT_TYPE_RE,
    EXISTS,
    FIELD_HELP,
    FIELD_OPS,
    GE,
    GT,
    IN,
    LAST_SEEN,
    LE,
    LT,
    NE,
    OPS,
    ORDER_OPS,
    PROPERTY_NAME_RE,
    PURPOSES,
    SCORE,
    STATUSES,
    TAG,
    TRAIT,
    TRAIT_NAME_RE,
    field_help,
    split_field,
)
from .json_form import (
    to_dict,
)
from .nodes import (
    All,
    Any,
    Compare,
    Condition,
    CountInWindow,
    Not,
    Scalar,
    iter_nodes,
    needs_profile,
    window_counts_needed,
)
from .parsing import (
    COMPARE_KEYS,
    COUNT_KEYS,
    MAX_COUNT_VALUE,
    MAX_DEPTH,
    MAX_IN_VALUES,
    MAX_NODES,
    MAX_STRING_CHARS,
    MAX_WINDOW_DAYS,
    MIN_WINDOW_DAYS,
    NODE_KEYS,
    check_condition,
    parse_condition,
)

__all__ = [
    "CHANNELS",
    "COMPARE_KEYS",
    "CONSENT",
    "CONTAINS",
    "COUNTER",
    "COUNTER_NAME_RE",
    "COUNT_KEYS",
    "COUNT_OPS",
    "EQ",
    "EVENT",
    "EVENT_TYPE_RE",
    "EXISTS",
    "FIELD_HELP",
    "FIELD_OPS",
    "GE",
    "GT",
    "IN",
    "LAST_SEEN",
    "LE",
    "LT",
    "MAX_COUNT_VALUE",
    "MAX_DEPTH",
    "MAX_IN_VALUES",
    "MAX_NODES",
    "MAX_STRING_CHARS",
    "MAX_WINDOW_DAYS",
    "MIN_WINDOW_DAYS",
    "NE",
    "NODE_KEYS",
    "OPS",
    "ORDER_OPS",
    "PROPERTY_NAME_RE",
    "PURPOSES",
    "SCORE",
    "STATUSES",
    "TAG",
    "TRAIT",
    "TRAIT_NAME_RE",
    "All",
    "Any",
    "Compare",
    "Condition",
    "CountInWindow",
    "Not",
    "Predicate",
    "ProfileView",
    "Scalar",
    "WindowCounts",
    "check_condition",
    "compile_condition",
    "evaluate",
    "field_help",
    "iter_nodes",
    "needs_profile",
    "parse_condition",
    "split_field",
    "to_dict",
    "window_counts_needed",
]
