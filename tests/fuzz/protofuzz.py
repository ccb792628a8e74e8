"""Hypothesis strategies that build request messages from protobuf descriptors.

Nothing here knows a service: every field of every message is generated from its
descriptor, so a field added to a contract is fuzzed without touching this file.

- strings: printable and hostile Unicode (astral planes, RTL override, zero-width, NUL,
  combining marks), SQL/format payloads, sizes around every documented limit and far
  past them (up to beyond the 16 MiB message cap);
- integers: the whole range of the field's wire type, with the extremes always in play;
- doubles/floats: NaN, ±inf, ±0, subnormals, the largest finite values;
- enums: known values and unknown ones (proto3 enums are open);
- repeated fields and maps: usually short, sometimes huge (up to 100,000 entries, bounded
  so one request stays within a few MiB);
- nested messages to a bounded depth; proto3 `optional` and oneofs both set and unset.

`hints` steer a field (by name) towards values the service knows (an existing user id,
an ingested symbol), so that generated requests also reach past validation.

Invalid UTF-8 cannot be built with the Python protobuf API (it refuses it), so
`poison` appends, on the wire, a string field (found by walking the descriptor, nested
fields and map entries included) holding bytes that are not UTF-8: lone surrogates
encoded WTF-8 style, overlong forms, code points past U+10FFFF, stray continuation bytes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

FD = FieldDescriptor

SQL_PAYLOADS = [
    "'; DROP TABLE messages; --",
    "' OR '1'='1",
    "1; DELETE FROM facts WHERE 1=1; --",
    '"; DROP TABLE bars; --',
    "x' UNION SELECT tenant, user_id, content FROM messages --",
    "'); ATTACH '/tmp/evil.duckdb' AS evil; --",
    "$1 ? $name :name %s {0} ${x}",
    "\\'; COPY messages TO '/tmp/leak.csv'; --",
]
HOSTILE_TEXT = [
    "",
    " ",
    "\t\n\r",
    "\x00",
    "a\x00b",
    "\u202eevil\u202c",  # right-to-left override
    "\u200b\u200d\ufeff",  # zero-width characters, BOM
    "e\u0301\u0301\u0301",  # stacked combining marks
    "\U0001f4a9\U0001f600" * 3,  # astral plane
    "\U0010ffff",  # the last code point
    "\ufffd",
    "%s%n%x{}[]",
    "../../etc/passwd",
    "AAPL\n",
    "ÅÆØ ß ǅ ﬁ",  # case-folding / normalisation traps
]
# (length, character): around limits (128 ids, 2 KiB facts, 4 KiB questions, 32 KiB
# contents, 1 MiB batches) and past the 16 MiB message cap.
BIG_TEXT = [
    (129, "a"),
    (2049, "b"),
    (4097, "\u00e9"),
    (32 * 1024 + 1, "c"),
    (1024 * 1024 + 7, "d"),
    (17 * 1024 * 1024, "e"),
]
INT_EDGES = {
    32: [0, 1, -1, 2, 255, 256, 2**31 - 1, -(2**31), 2**15, 65_536],
    64: [0, 1, -1, 2**63 - 1, -(2**63), 2**31, -(2**31) - 1, 10**18, 10**18 - 1],
}
UINT_EDGES = {32: [0, 1, 2**32 - 1, 2**31], 64: [0, 1, 2**64 - 1, 2**63]}
FLOAT_EDGES = [
    0.0,
    -0.0,
    math.nan,
    math.inf,
    -math.inf,
    5e-324,
    -5e-324,
    1.7976931348623157e308,
    -1.7976931348623157e308,
    1e-9,
    0.999999999,
    1.0000000001,
]
INVALID_UTF8 = [
    b"\xff",
    b"\xc3\x28",  # bad continuation
    b"\xed\xa0\x80",  # a lone high surrogate, WTF-8/CESU style
    b"\xed\xbf\xbf",  # a lone low surrogate
    b"\xf4\x90\x80\x80",  # past U+10FFFF
    b"\xc0\xaf",  # overlong '/'
    b"ok\x80",  # stray continuation after valid text
    b"\xe2\x82",  # truncated sequence
]
# One huge repeated field stays within this many bytes (so a request is at most a few MiB).
HUGE_BYTES = 4 * 1024 * 1024
HUGE_COUNTS = [101, 1_001, 10_001, 100_000]

_INT_BITS = {
    FD.TYPE_INT32: (32, True),
    FD.TYPE_SINT32: (32, True),
    FD.TYPE_SFIXED32: (32, True),
    FD.TYPE_INT64: (64, True),
    FD.TYPE_SINT64: (64, True),
    FD.TYPE_SFIXED64: (64, True),
    FD.TYPE_UINT32: (32, False),
    FD.TYPE_FIXED32: (32, False),
    FD.TYPE_UINT64: (64, False),
    FD.TYPE_FIXED64: (64, False),
}

Hints = Mapping[str, st.SearchStrategy[Any]]


@dataclass(frozen=True)
class Options:
    max_depth: int = 4
    list_max: int = 4  # usual length of repeated fields
    huge: bool = True  # sometimes make repeated fields huge
    big_text: bool = True  # sometimes make strings huge
    hint_weight: int = 3  # a hinted field uses its hint this many times in (weight + 1)


def sub(field: FieldDescriptor) -> Descriptor:
    """The message type of a message field."""
    assert field.message_type is not None, field.full_name
    return field.message_type


def is_map(field: FieldDescriptor) -> bool:
    return field.type == FD.TYPE_MESSAGE and bool(sub(field).GetOptions().map_entry)


def message_class(desc: Descriptor) -> type[Message]:
    return message_factory.GetMessageClass(desc)  # type: ignore[no-any-return]


def text_strategy(opts: Options) -> st.SearchStrategy[str]:
    parts: list[st.SearchStrategy[str]] = [
        st.text(max_size=40),
        st.text(
            st.characters(codec="utf-8", categories=["L", "M", "N", "P", "S", "Z", "Cf"]),
            max_size=20,
        ),
        st.from_regex(r"[A-Za-z0-9._:@-]{1,16}", fullmatch=True),
        st.sampled_from(HOSTILE_TEXT),
        st.sampled_from(SQL_PAYLOADS),
    ]
    if opts.big_text:
        parts.append(st.sampled_from(BIG_TEXT).map(lambda nc: nc[1] * nc[0]))
    return st.one_of(*parts)


def scalar_strategy(field: FieldDescriptor, opts: Options) -> st.SearchStrategy[Any]:
    t = field.type
    if t in _INT_BITS:
        bits, signed = _INT_BITS[t]
        if signed:
            lo, hi, edges = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1, INT_EDGES[bits]
        else:
            lo, hi, edges = 0, 2**bits - 1, UINT_EDGES[bits]
        return st.one_of(
            st.integers(lo, hi),
            st.sampled_from(edges),
            st.integers(-1000, 100_000).filter(lambda x: lo <= x <= hi),
        )
    if t == FD.TYPE_DOUBLE:
        return st.one_of(st.floats(), st.sampled_from(FLOAT_EDGES), st.floats(-2, 2))
    if t == FD.TYPE_FLOAT:
        return st.one_of(
            st.floats(width=32),
            st.sampled_from([x for x in FLOAT_EDGES if abs(x) < 3e38 or not math.isfinite(x)]),
        )
    if t == FD.TYPE_BOOL:
        return st.booleans()
    if t == FD.TYPE_STRING:
        return text_strategy(opts)
    if t == FD.TYPE_BYTES:
        return st.binary(max_size=64)
    if t == FD.TYPE_ENUM:
        assert field.enum_type is not None
        known = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(known), st.integers(-(2**31), 2**31 - 1))
    raise TypeError(f"unsupported field type {t} of {field.full_name}")


def _size_of(value: Any) -> int:
    if isinstance(value, Message):
        return value.ByteSize() + 2
    if isinstance(value, str):
        return len(value.encode("utf-8")) + 2
    if isinstance(value, bytes):
        return len(value) + 2
    return 10


def _huge(element: st.SearchStrategy[Any]) -> st.SearchStrategy[list[Any]]:
    """One drawn element repeated many times, bounded by HUGE_BYTES in total."""

    def build(value: Any, count: int) -> list[Any]:
        return [value] * max(1, min(count, HUGE_BYTES // _size_of(value)))

    return st.builds(build, element, st.sampled_from(HUGE_COUNTS))


def field_strategy(
    field: FieldDescriptor, hints: Hints, opts: Options, depth: int
) -> st.SearchStrategy[Any]:
    hinted = hints.get(field.name)
    if is_map(field):
        key_f = sub(field).fields_by_name["key"]
        val_f = sub(field).fields_by_name["value"]
        small = Options(opts.max_depth, 2, False, False)
        keys = scalar_strategy(key_f, small)
        values = (
            messages(sub(val_f), hints, small, depth + 1)
            if val_f.type == FD.TYPE_MESSAGE
            else scalar_strategy(val_f, small)
        )
        maps = st.dictionaries(keys, values, max_size=opts.list_max)
        if opts.huge and depth <= 2 and key_f.type == FD.TYPE_STRING:
            # Many distinct keys: a map cannot repeat one.
            many = st.integers(17, 2000).map(lambda n: {f"k{i}": "v" for i in range(n)})
            return st.one_of(maps, maps, many)
        return maps
    if field.type == FD.TYPE_MESSAGE:
        element: st.SearchStrategy[Any] = messages(sub(field), hints, opts, depth + 1)
    else:
        element = scalar_strategy(field, opts)
    if hinted is not None:
        element = st.one_of(*([hinted] * opts.hint_weight), element)
    if not field.is_repeated:
        return element
    inner = Options(opts.max_depth, max(1, opts.list_max // 2), opts.huge, opts.big_text)
    if field.type == FD.TYPE_MESSAGE:
        element = messages(sub(field), hints, inner, depth + 1)
        if hinted is not None:
            element = st.one_of(*([hinted] * opts.hint_weight), element)
    normal = st.lists(element, max_size=opts.list_max)
    if opts.huge and depth <= 2:
        small_element = (
            element
            if field.type != FD.TYPE_MESSAGE
            else messages(sub(field), hints, Options(2, 1, False, False), depth + 1)
        )
        return st.one_of(normal, normal, normal, _huge(small_element))
    return normal


def messages(
    desc: Descriptor, hints: Hints | None = None, opts: Options | None = None, depth: int = 0
) -> st.SearchStrategy[Message]:
    """Messages of type `desc`: each field present or absent, with hostile values."""
    hints = hints or {}
    opts = opts or Options()
    cls = message_class(desc)
    if depth >= opts.max_depth:
        return st.just(cls())
    deeper = Options(opts.max_depth, opts.list_max, opts.huge and depth < 2, opts.big_text)
    fields = {
        f.name: st.deferred(lambda f=f: field_strategy(f, hints, deeper, depth))  # type: ignore[misc]
        for f in desc.fields
    }

    def build(values: dict[str, Any]) -> Message:
        out = cls()
        for name, value in values.items():
            _assign(out, desc.fields_by_name[name], value)
        return out

    return st.fixed_dictionaries({}, optional=fields).map(build)


# -- mutants of valid requests -----------------------------------------------------------------
def field_paths(desc: Descriptor, depth: int = 0, max_depth: int = 3) -> list[list[FD]]:
    """Every path of fields from `desc` (into nested messages, not into map entries)."""
    out: list[list[FD]] = []
    for f in desc.fields:
        out.append([f])
        if f.type == FD.TYPE_MESSAGE and not is_map(f) and depth < max_depth:
            out.extend([f, *rest] for rest in field_paths(sub(f), depth + 1, max_depth))
    return out


def _assign(node: Message, f: FD, value: Any) -> None:
    if is_map(f):
        target = getattr(node, f.name)
        target.clear()
        for k, v in value.items():
            if isinstance(v, Message):
                target[k].CopyFrom(v)
            else:
                target[k] = v
    elif f.is_repeated:
        del getattr(node, f.name)[:]
        getattr(node, f.name).extend(value)
    elif f.type == FD.TYPE_MESSAGE:
        getattr(node, f.name).CopyFrom(value)
    else:
        setattr(node, f.name, value)


def mutants(
    templates: list[Message], desc: Descriptor, opts: Options | None = None
) -> st.SearchStrategy[Message]:
    """A valid request with one or two of its fields (at any depth) replaced by hostile
    values, so generated input gets past the checks of the other fields."""
    opts = opts or Options()
    paths = field_paths(desc)
    cache: dict[tuple[str, int], st.SearchStrategy[Any]] = {}

    def leaf_strategy(path: list[FD]) -> st.SearchStrategy[Any]:
        key = (path[-1].full_name, len(path))
        if key not in cache:
            cache[key] = field_strategy(path[-1], {}, opts, len(path) - 1)
        return cache[key]

    @st.composite
    def build(draw: st.DrawFn) -> Message:
        msg = draw(st.sampled_from(templates))
        out = type(msg)()
        out.CopyFrom(msg)
        for _ in range(draw(st.integers(1, 2))):
            path = draw(st.sampled_from(paths))
            node = out
            for f in path[:-1]:
                if f.is_repeated:
                    items = getattr(node, f.name)
                    node = items[draw(st.integers(0, len(items) - 1))] if items else items.add()
                else:
                    node = getattr(node, f.name)
            _assign(node, path[-1], draw(leaf_strategy(path)))
        return out

    return build()


# -- invalid UTF-8 on the wire --------------------------------------------------------------
def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def length_delimited(number: int, payload: bytes) -> bytes:
    return _varint((number << 3) | 2) + _varint(len(payload)) + payload


def string_paths(desc: Descriptor, depth: int = 0, max_depth: int = 4) -> list[list[FD]]:
    """Every path of fields from `desc` down to a string field (maps included)."""
    out: list[list[FD]] = []
    for f in desc.fields:
        if f.type == FD.TYPE_STRING:
            out.append([f])
        elif f.type == FD.TYPE_MESSAGE and depth < max_depth:
            out.extend([f, *rest] for rest in string_paths(sub(f), depth + 1, max_depth))
    return out


def poison_bytes(path: list[FD], bad: bytes) -> bytes:
    """Wire bytes that set the string at `path` to `bad` when appended to a message."""
    payload = bad
    for f in reversed(path):
        payload = length_delimited(f.number, payload)
    return payload


def expected_field_path(path: list[FD]) -> str:
    """The name a field violation is expected to start with (indices left out)."""
    return ".".join(f.name for f in path)


@dataclass(frozen=True)
class Poisoned:
    data: bytes
    path: str


def poisoned(
    desc: Descriptor, base: st.SearchStrategy[Message]
) -> st.SearchStrategy[Poisoned] | None:
    """A valid message with an invalid-UTF-8 string appended on the wire (None: no strings)."""
    paths = string_paths(desc)
    if not paths:
        return None

    def build(msg: Message, path: list[FD], bad: bytes) -> Poisoned:
        return Poisoned(
            msg.SerializeToString() + poison_bytes(path, bad), expected_field_path(path)
        )

    return st.builds(build, base, st.sampled_from(paths), st.sampled_from(INVALID_UTF8))


def unknown_fields(desc: Descriptor) -> st.SearchStrategy[bytes]:
    """Wire bytes of fields the message does not define (every wire type, the largest field
    number): a parser must skip them."""
    known = {f.number for f in desc.fields}
    numbers = st.sampled_from([n for n in (15, 99, 1000, 2**29 - 1) if n not in known])

    def encode(number: int, wire: int, value: int, blob: bytes) -> bytes:
        key = _varint((number << 3) | wire)
        if wire == 0:
            return key + _varint(value)
        if wire == 1:
            return key + value.to_bytes(8, "little")
        if wire == 5:
            return key + (value & 0xFFFFFFFF).to_bytes(4, "little")
        return key + _varint(len(blob)) + blob

    one = st.builds(
        encode,
        numbers,
        st.sampled_from([0, 1, 2, 5]),
        st.integers(0, 2**64 - 1),
        st.binary(max_size=64),
    )
    return st.lists(one, min_size=1, max_size=4).map(b"".join)


def strip_indices(field_path: str) -> str:
    """`messages[3].message.content` -> `messages.message.content`; map keys dropped too."""
    out, depth = [], 0
    for ch in field_path:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif depth == 0:
            out.append(ch)
    return "".join(out)


Check = Callable[[Any], None]
