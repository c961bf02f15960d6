"""Render the part of Go's text/template that tunelab's Ollama Modelfiles use.

Ollama renders a Modelfile's TEMPLATE with Go's text/template. tunelab checks every template it
writes by rendering probe conversations through it here and comparing the text with the
tokenizer's own (Jinja) chat template, so a Modelfile that would prompt the model differently
from training is never written. The subset: text; `{{- ... -}}` trimming; `if` / `else if` /
`else` / `end`; `range $i, $m := PIPE`; `$x := PIPE` and `$x = PIPE`; the builtins eq, ne, and,
or, not, len, slice, index; and as arguments string/int/bool literals, variables, fields
(`.A`, `$.A`, `$m.Role`) and parenthesised calls. Anything else raises ValueError: a template
that leaves the subset has to extend this file (and its test against real Go) first.
"""

from __future__ import annotations

import json
import re
from typing import Any

_ACTION = re.compile(r"\{\{(-[ \t\r\n])?(.*?)([ \t\r\n]-)?\}\}", re.S)
_TOKEN = re.compile(r'\s*(?:(?P<str>"(?:\\.|[^"\\])*")|(?P<int>-?\d+)|(?P<op>:=|=|,|\(|\))'
                    r"|(?P<var>\$\w*(?:\.\w+)*)|(?P<field>(?:\.\w+)+|\.)|(?P<ident>\w+))")
_WS = " \t\r\n"


def render(template: str, data: Any) -> str:
    """`template` executed on `data` (dicts for Go structs/maps, lists for slices)."""
    parts = _lex(template)
    nodes, _ = _parse(parts, 0, top=True)
    out: list[str] = []
    _run(nodes, data, [{"$": data}], out)
    return "".join(out)


def _lex(template: str) -> list[tuple[str, str]]:
    """[("text", s) | ("action", s)], with the trim markers applied to the neighbouring text."""
    parts: list[tuple[str, str]] = []
    pos, trim_next = 0, False
    for m in _ACTION.finditer(template):
        text = template[pos:m.start()]
        if trim_next:
            text = text.lstrip(_WS)
        if m.group(1):
            text = text.rstrip(_WS)
        parts.append(("text", text))
        parts.append(("action", m.group(2).strip()))
        pos, trim_next = m.end(), bool(m.group(3))
    text = template[pos:]
    parts.append(("text", text.lstrip(_WS) if trim_next else text))
    return parts


def _parse(parts, i: int, top: bool = False):
    """Nodes from parts[i:] up to the next `else`/`end` action (its index is returned with them)."""
    nodes = []
    while i < len(parts):
        kind, body = parts[i]
        word = body.split(None, 1)[0] if kind == "action" and body else ""
        if kind == "text":
            node, i = ("text", body), i + 1
        elif word in ("else", "end"):
            if top:
                raise ValueError(f"unexpected {{{{ {body} }}}}")
            return nodes, i
        elif word == "if":
            node, i = _parse_if(parts, i)
        elif word == "range":
            node, i = _parse_range(parts, i)
        else:
            node, i = _statement(body), i + 1
        nodes.append(node)
    if not top:
        raise ValueError("missing {{ end }}")
    return nodes, i


def _parse_if(parts, i: int):
    branches, otherwise = [], []
    cond = parts[i][1][len("if"):]
    while True:
        body, i = _parse(parts, i + 1)
        branches.append((_expression(cond), body))
        action = parts[i][1]
        if action == "end":
            return ("if", branches, otherwise), i + 1
        if action.startswith("else if"):
            cond = action[len("else if"):]
            continue
        if action != "else":
            raise ValueError(f"unsupported {{{{ {action} }}}}")
        otherwise, i = _parse(parts, i + 1)
        if parts[i][1] != "end":
            raise ValueError("{{ else }} after {{ else }}")
        return ("if", branches, otherwise), i + 1


def _parse_range(parts, i: int):
    m = re.fullmatch(r"range\s+(?:(\$\w+)\s*,\s*(\$\w+)\s*:=\s*)?(.+)", parts[i][1], re.S)
    if not m:
        raise ValueError(f"unsupported {{{{ {parts[i][1]} }}}}")
    body, i = _parse(parts, i + 1)
    if parts[i][1] != "end":
        raise ValueError("{{ else }} inside range is not supported")
    return ("range", m.group(1), m.group(2), _expression(m.group(3)), body), i + 1


def _statement(body: str):
    m = re.fullmatch(r"(\$\w+)\s*(:=|=)\s*(.+)", body, re.S)
    if m:
        return ("assign", m.group(1), m.group(2) == ":=", _expression(m.group(3)))
    return ("output", _expression(body))


def _tokens(text: str) -> list[tuple[str, str]]:
    tokens, pos = [], 0
    while text[pos:].strip():
        m = _TOKEN.match(text, pos)
        if not m:
            raise ValueError(f"cannot read {text[pos:]!r}")
        tokens.append((m.lastgroup, m.group(m.lastgroup)))
        pos = m.end()
    return tokens


def _expression(text: str):
    tokens = _tokens(text)
    expr, i = _pipeline(tokens, 0)
    if i != len(tokens):
        raise ValueError(f"unexpected {tokens[i][1]!r} in {text!r}")
    return expr


def _pipeline(tokens, i: int):
    """A command: `fn arg...` or a single operand."""
    if i < len(tokens) and tokens[i][0] == "ident" and tokens[i][1] not in ("true", "false"):
        name, args, i = tokens[i][1], [], i + 1
        while i < len(tokens) and tokens[i][1] != ")":
            arg, i = _operand(tokens, i)
            args.append(arg)
        return ("call", name, args), i
    return _operand(tokens, i)


def _operand(tokens, i: int):
    kind, value = tokens[i]
    if value == "(":
        inner, i = _pipeline(tokens, i + 1)
        if i >= len(tokens) or tokens[i][1] != ")":
            raise ValueError("missing )")
        return inner, i + 1
    if kind == "str":
        return ("lit", json.loads(value)), i + 1
    if kind == "int":
        return ("lit", int(value)), i + 1
    if kind == "ident" and value in ("true", "false"):
        return ("lit", value == "true"), i + 1
    if kind == "var":
        name, *fields = value.split(".")
        return ("var", name, fields), i + 1
    if kind == "field":
        return ("field", [f for f in value.split(".") if f]), i + 1
    raise ValueError(f"unexpected {value!r}")


def _truth(value: Any) -> bool:
    return value not in (None, False, 0, "") and not (isinstance(value, (list, dict)) and not value)


def _get(value: Any, fields: list[str]) -> Any:
    for field in fields:
        if not isinstance(value, dict) or field not in value:
            raise ValueError(f"no field {field!r} in {value!r}")
        value = value[field]
    return value


def _lookup(scopes: list[dict], name: str) -> dict:
    for scope in reversed(scopes):
        if name in scope:
            return scope
    raise ValueError(f"undefined variable {name}")


def _eval(expr, dot: Any, scopes: list[dict]) -> Any:
    kind = expr[0]
    if kind == "lit":
        return expr[1]
    if kind == "var":
        return _get(_lookup(scopes, expr[1])[expr[1]], expr[2])
    if kind == "field":
        return _get(dot, expr[1])
    name, args = expr[1], expr[2]
    if name in ("and", "or"):  # short-circuit, as Go 1.18+ does
        value = None
        for arg in args:
            value = _eval(arg, dot, scopes)
            if _truth(value) != (name == "and"):
                return value
        return value
    values = [_eval(arg, dot, scopes) for arg in args]
    if name == "eq":
        return any(values[0] == v for v in values[1:])
    if name == "ne":
        return values[0] != values[1]
    if name == "not":
        return not _truth(values[0])
    if name == "len":
        return len(values[0])
    if name == "slice":
        return values[0][values[1]:values[2] if len(values) > 2 else None]
    if name == "index":
        value = values[0]
        for key in values[1:]:
            value = value[key]
        return value
    raise ValueError(f"unsupported function {name!r}")


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "<no value>" if value is None else str(value)


def _run(nodes, dot: Any, scopes: list[dict], out: list[str]) -> None:
    for node in nodes:
        kind = node[0]
        if kind == "text":
            out.append(node[1])
        elif kind == "output":
            out.append(_text(_eval(node[1], dot, scopes)))
        elif kind == "assign":
            _, name, declare, expr = node
            value = _eval(expr, dot, scopes)
            (scopes[-1] if declare else _lookup(scopes, name))[name] = value
        elif kind == "if":
            for cond, body in node[1]:
                if _truth(_eval(cond, dot, scopes)):
                    _run(body, dot, [*scopes, {}], out)
                    break
            else:
                _run(node[2], dot, [*scopes, {}], out)
        else:  # range
            _, key, value, expr, body = node
            for index, item in enumerate(_eval(expr, dot, scopes)):
                _run(body, item, [*scopes, {key: index, value: item} if key else {}], out)
