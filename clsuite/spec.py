"""Parse strategy specs such as ``sam(rho=0.05)+ewc(lambda=100)`` without eval."""
from __future__ import annotations

import re
from typing import Any

from .errors import UserError

_TOKEN = re.compile(
    r"""\s*(?:(?P<num>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?(?![\w.]))
        |(?P<str>"[^"]*"|'[^']*')
        |(?P<name>[A-Za-z_][\w.\-]*)
        |(?P<punct>[()=,+\[\]]))""",
    re.VERBOSE,
)

Spec = list[tuple[str, dict[str, Any]]]
MAX_DEPTH = 16  # nesting of [lists] in a value; deeper input is refused instead of overflowing the stack


def _tokens(text: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    text = text.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise UserError(f"cannot parse strategy spec {text!r} at {text[pos:]!r}: "
                            "write it like sam(rho=0.05)+ewc(lambda=100)")
        kind = m.lastgroup
        out.append((kind, m.group(kind)))
        pos = m.end()
        while pos < len(text) and text[pos].isspace():
            pos += 1
    return out


class _Parser:
    def __init__(self, text: str):
        self.text, self.toks, self.i = text, _tokens(text), 0

    def peek(self) -> tuple[str, str] | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self, kind: str, value: str | None = None) -> str:
        tok = self.peek()
        if tok is None or tok[0] != kind or (value is not None and tok[1] != value):
            want = value or kind
            got = "end of spec" if tok is None else repr(tok[1])
            raise UserError(f"strategy spec {self.text!r}: expected {want!r}, got {got}; "
                            "write it like sam(rho=0.05)+ewc(lambda=100)")
        self.i += 1
        return tok[1]

    def value(self, depth: int = 0) -> Any:
        kind, text = self.peek() or ("end", "")
        if kind == "num":
            self.i += 1
            try:
                return float(text) if any(c in text for c in ".eE") else int(text)
            except ValueError:  # more digits than int() converts
                raise UserError(f"strategy spec {self.text!r}: number {text[:20]}... has {len(text)} digits; "
                                "write it with an exponent, e.g. 1e9") from None
        if kind == "str":
            self.i += 1
            return text[1:-1]
        if kind == "name":
            self.i += 1
            return {"true": True, "false": False, "none": None, "null": None}.get(text.lower(), text)
        if (kind, text) == ("punct", "["):
            if depth >= MAX_DEPTH:
                raise UserError(f"strategy spec {self.text!r}: lists nested deeper than {MAX_DEPTH} levels")
            self.i += 1
            items = []
            while self.peek() != ("punct", "]"):
                items.append(self.value(depth + 1))
                if self.peek() == ("punct", ","):
                    self.i += 1
                elif self.peek() != ("punct", "]"):
                    self.take("punct", "]")
            self.i += 1
            return items
        raise UserError(f"strategy spec {self.text!r}: expected a value, got {text or 'end of spec'!r}")

    def term(self) -> tuple[str, dict[str, Any]]:
        name = self.take("name")
        params: dict[str, Any] = {}
        if self.peek() == ("punct", "("):
            self.i += 1
            while self.peek() != ("punct", ")"):
                key = self.take("name")
                self.take("punct", "=")
                if key in params:
                    raise UserError(f"strategy spec {self.text!r}: parameter {key!r} given twice")
                params[key] = self.value()
                if self.peek() == ("punct", ","):
                    self.i += 1
                elif self.peek() != ("punct", ")"):
                    self.take("punct", ")")
            self.i += 1
        return name, params


def parse_spec(text: str) -> Spec:
    """One composed strategy: ``a(k=v)+b`` -> [("a", {"k": v}), ("b", {})]."""
    if not text or not text.strip():
        raise UserError("empty strategy spec: name at least one strategy, e.g. naive or sam(rho=0.05)")
    p = _Parser(text)
    terms = [p.term()]
    while p.peek() == ("punct", "+"):
        p.i += 1
        terms.append(p.term())
    if p.peek() is not None:
        raise UserError(f"strategy spec {text!r}: unexpected {p.peek()[1]!r}; join strategies with '+' "
                        "and separate specs with ','")
    return terms


def split_specs(text: str) -> list[str]:
    """Split ``naive,sam(rho=0.1,adaptive=true)`` on the commas outside brackets and quotes."""
    out, depth, cur, quote = [], 0, "", ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        else:
            depth += 1 if ch in "([" else -1 if ch in ")]" else 0
        if ch == "," and depth == 0 and not quote:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    out.append(cur.strip())
    if any(not s for s in out):
        raise UserError(f"strategy list {text!r} has an empty entry: separate specs with single commas")
    return out
