"""The meaning of every config key, read from the trailing comments of the fields in ``ibot/config.py``.

The dataclasses in :mod:`ibot.config` are the one place a key is defined and explained
(``lr: float = 5e-4  # for a total batch of 256 (scaled linearly)``); this module parses those
comments from the source (``ast`` for the fields, ``tokenize`` for the comments) so that
``ibot config --explain`` never drifts from the code.
"""

from __future__ import annotations

import ast
import inspect
import io
import tokenize
from functools import cache


@cache
def field_comments() -> dict[str, str]:
    """``{"optim.lr": "for a total batch of 256 (scaled linearly)", ...}`` for every key with a comment.

    A field's comment is the one after it on its line, or else the comment lines right above it.
    """
    import ibot.config as config_module

    source = inspect.getsource(config_module)
    trailing, above = {}, {}  # line number -> comment text (after code / on a line of its own)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            own_line = not tok.line[: tok.start[1]].strip()
            (above if own_line else trailing)[tok.start[0]] = tok.string.lstrip("#").strip()
    classes = {n.name: n for n in ast.parse(source).body if isinstance(n, ast.ClassDef)}

    def fields(cls: ast.ClassDef):
        for node in cls.body:
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                yield node.target.id, node

    def comment(node) -> str | None:
        """The field's trailing comment, else the comment lines right above it."""
        if node.end_lineno in trailing:
            return trailing[node.end_lineno]
        lines, i = [], node.lineno - 1
        while i in above:
            lines.insert(0, above[i])
            i -= 1
        return " ".join(lines) or None

    out = {}
    for name, node in fields(classes["Config"]):
        section = ast.unparse(node.annotation)
        for key, sub in fields(classes[section]) if section in classes else [(None, node)]:
            text = comment(sub)
            if text:
                out[f"{name}.{key}" if key else name] = text
    return out


def explain(cfg) -> str:
    """Every key of a resolved config with its value and its meaning, one line each, by section."""
    from omegaconf import OmegaConf

    from ibot.config import flatten

    notes = field_comments()
    values = flatten(OmegaConf.to_container(cfg, resolve=True))
    width = max(len(f"{k} = {v!r}") for k, v in values.items() if k not in notes or len(notes[k]) < 200)
    lines, section = [], None
    for key, value in values.items():
        head = key.split(".")[0] if "." in key else ""
        if head != section:
            section = head
            lines.append(f"# {head or 'top level'}")
        shown = "null" if value is None else (str(value).lower() if isinstance(value, bool) else value)
        lines.append(f"{f'{key} = {shown}':<{width}}  # {notes.get(key, '(no description)')}")
    return "\n".join(lines)
