"""Protocol-buffer text format, the language of Triton's ``config.pbtxt``: a tokenizer, parser and writer.

Covers what model configurations use: messages (``name { ... }`` or ``name: { ... }``), repeated fields
(repeated ``name ...`` entries or a ``name: [a, b]`` / ``name [ {...}, {...} ]`` list), map entries
(``parameters { key: "k" value: { ... } }``), strings, integers, floats, booleans and enum identifiers
(docs/SCALE_OUT.md#model-configurations). No schema: the validator (facemoe.triton.validate) checks fields.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from facemoe.errors import FaceMoEError


class PbtxtError(FaceMoEError):
    """A ``config.pbtxt`` that does not parse, or that Triton would refuse."""


class Enum(str):
    """An enum value (a bare identifier such as ``TYPE_FP32``), kept apart from quoted strings."""


@dataclass
class Message:
    """A text-format message: field name -> every value given for it, in order (repeated or not)."""

    fields: dict[str, list[object]] = field(default_factory=dict)
    # Repeated scalar fields the writer puts in ``[a, b]`` form even with one value (``dims: [ 512 ]``).
    lists: set[str] = field(default_factory=set, compare=False)

    def add(self, name: str, value: object) -> Message:
        self.fields.setdefault(name, []).append(value)
        return self

    def add_list(self, name: str, values: list[object]) -> Message:
        self.fields.setdefault(name, []).extend(values)
        self.lists.add(name)
        return self

    def all(self, name: str) -> list[object]:
        return self.fields.get(name, [])

    def one(self, name: str, default: object = None) -> object:
        """The field's value (the last one given, as protobuf does for a singular field)."""
        values = self.fields.get(name)
        return values[-1] if values else default

    def messages(self, name: str) -> list[Message]:
        return [v for v in self.all(name) if isinstance(v, Message)]


_TOKEN = re.compile(
    r"""
    (?P<space>[ \t\r\n]+|\#[^\n]*)
  | (?P<string>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
  | (?P<number>[-+]?(?:0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)[fF]?)
  | (?P<ident>[-]?[A-Za-z_][A-Za-z0-9_.]*)
  | (?P<punct>[{}\[\]:,;<>])
    """,
    re.VERBOSE,
)
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "'": "'", "\\": "\\", "a": "\a", "b": "\b", "f": "\f", "v": "\v"}


@dataclass
class _Token:
    kind: str
    text: str
    line: int


def _unescape(body: str, line: int) -> str:
    out: list[str] = []
    i = 0
    while i < len(body):
        ch = body[i]
        if ch != "\\":
            out.append(ch)
            i += 1
            continue
        nxt = body[i + 1]
        if nxt in _ESCAPES:
            out.append(_ESCAPES[nxt])
            i += 2
        elif nxt in "01234567":
            digits = re.match(r"[0-7]{1,3}", body[i + 1 :])
            assert digits is not None
            out.append(chr(int(digits.group(), 8)))
            i += 1 + len(digits.group())
        elif nxt == "x":
            digits = re.match(r"[0-9a-fA-F]{1,2}", body[i + 2 :])
            if digits is None:
                raise PbtxtError(f"line {line}: bad \\x escape")
            out.append(chr(int(digits.group(), 16)))
            i += 2 + len(digits.group())
        else:
            raise PbtxtError(f"line {line}: unknown escape \\{nxt}")
    # Strings hold bytes; decode them as UTF-8 like protobuf does for ``string`` fields.
    return "".join(out).encode("latin-1", errors="surrogateescape").decode("utf-8", errors="replace")


def tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    pos, line = 0, 1
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            raise PbtxtError(f"line {line}: unexpected character {text[pos]!r}")
        kind = match.lastgroup or ""
        if kind != "space":
            tokens.append(_Token(kind, match.group(), line))
        line += match.group().count("\n")
        pos = match.end()
    return tokens


class _Parser:
    def __init__(self, tokens: list[_Token]) -> None:
        self.tokens = tokens
        self.i = 0

    def peek(self) -> _Token | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self, what: str = "a token") -> _Token:
        token = self.peek()
        if token is None:
            last = self.tokens[-1].line if self.tokens else 1
            raise PbtxtError(f"line {last}: unexpected end of file, expected {what}")
        self.i += 1
        return token

    def expect(self, text: str) -> _Token:
        token = self.take(repr(text))
        if token.text != text:
            raise PbtxtError(f"line {token.line}: expected {text!r}, got {token.text!r}")
        return token

    def message(self, closer: str | None) -> Message:
        msg = Message()
        while True:
            token = self.peek()
            if token is None:
                if closer is not None:
                    self.take(repr(closer))
                return msg
            if closer is not None and token.text == closer:
                self.i += 1
                return msg
            self.field(msg)
            nxt = self.peek()
            if nxt is not None and nxt.text in (",", ";"):
                self.i += 1

    def field(self, msg: Message) -> None:
        name = self.take("a field name")
        if name.kind != "ident" or name.text.startswith("-"):
            raise PbtxtError(f"line {name.line}: expected a field name, got {name.text!r}")
        token = self.take(f"a value for {name.text}")
        colon = token.text == ":"
        if colon:
            token = self.take(f"a value for {name.text}")
        if token.text == "[":
            msg.add_list(name.text, self.list_values(name.text))
        elif token.text in ("{", "<"):
            msg.add(name.text, self.message("}" if token.text == "{" else ">"))
        elif colon:
            msg.add(name.text, self.scalar(token))
        else:
            raise PbtxtError(f"line {token.line}: expected ':' or '{{' after {name.text}, got {token.text!r}")

    def list_values(self, name: str) -> list[object]:
        values: list[object] = []
        if self.peek() is not None and self.peek().text == "]":  # type: ignore[union-attr]
            self.i += 1
            return values
        while True:
            token = self.take(f"a value in {name}")
            if token.text in ("{", "<"):
                values.append(self.message("}" if token.text == "{" else ">"))
            else:
                values.append(self.scalar(token))
            sep = self.take(f"',' or ']' in {name}")
            if sep.text == "]":
                return values
            if sep.text != ",":
                raise PbtxtError(f"line {sep.line}: expected ',' or ']' in {name}, got {sep.text!r}")

    def scalar(self, token: _Token) -> object:
        if token.kind == "string":
            parts = [_unescape(token.text[1:-1], token.line)]
            while self.peek() is not None and self.peek().kind == "string":  # type: ignore[union-attr]
                nxt = self.take()
                parts.append(_unescape(nxt.text[1:-1], nxt.line))  # adjacent strings concatenate
            return "".join(parts)
        if token.kind == "number":
            text = token.text.rstrip("fF") if not token.text.lower().startswith(("0x", "-0x", "+0x")) else token.text
            if re.fullmatch(r"[-+]?(0[xX][0-9a-fA-F]+)", text):
                return int(text, 16)
            if re.fullmatch(r"[-+]?\d+", text):
                return int(text)
            return float(text)
        if token.kind == "ident":
            lowered = token.text.lower()
            if lowered in ("true", "t"):
                return True
            if lowered in ("false", "f"):
                return False
            if lowered.lstrip("-") in ("inf", "infinity", "nan"):
                return float(lowered)
            return Enum(token.text)
        raise PbtxtError(f"line {token.line}: expected a value, got {token.text!r}")


def parse(text: str) -> Message:
    """Parse protobuf text format into a ``Message`` tree; ``PbtxtError`` names the line of a problem."""
    return _Parser(tokenize(text)).message(None)


def _quote(text: str) -> str:
    out = []
    for ch in text:
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\{ord(ch):03o}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def format_scalar(value: object) -> str:
    if isinstance(value, Enum):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return _quote(value)
    if isinstance(value, (int, float)):
        return repr(value)
    raise TypeError(f"cannot write {type(value).__name__} in text format")


def format_message(msg: Message, indent: int = 0) -> str:
    """Text format, one field a line; scalar lists in ``[a, b]`` form, messages as ``name { ... }``."""
    pad = "  " * indent
    lines: list[str] = []
    for name, values in msg.fields.items():
        scalars = [v for v in values if not isinstance(v, Message)]
        if len(scalars) == len(values) and (len(scalars) > 1 or name in msg.lists):
            lines.append(f"{pad}{name}: [ {', '.join(format_scalar(v) for v in scalars)} ]")
            continue
        for value in values:
            if isinstance(value, Message):
                lines.append(f"{pad}{name} {{")
                body = format_message(value, indent + 1)
                if body:
                    lines.append(body.rstrip("\n"))
                lines.append(f"{pad}}}")
            else:
                lines.append(f"{pad}{name}: {format_scalar(value)}")
    return "\n".join(lines) + ("\n" if lines else "")


__all__ = ["Enum", "Message", "PbtxtError", "format_message", "format_scalar", "parse", "tokenize"]
