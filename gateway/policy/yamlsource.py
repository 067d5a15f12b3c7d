"""YAML with positions: policy files parsed into plain values that remember their lines.

The strict validators need to say *where* a bad key is, so mappings are loaded
as :class:`Located` dicts that carry their file, their own line and the line of
every key. Only YAML's safe types are constructed; duplicate keys are errors.
"""

from __future__ import annotations

from typing import Any

import yaml


class PolicyError(ValueError):
    """A policy file problem, always pointing at a file, a line and a key."""

    def __init__(self, file: str, line: int, key: str, message: str) -> None:
        super().__init__(f"{file}:{line}: {key}: {message}")
        self.file = file
        self.line = line
        self.key = key
        self.message = message


class Located(dict[str, Any]):
    """A mapping from a policy file, with the position of itself and of each key."""

    file: str
    line: int
    key_lines: dict[str, int]

    def line_of(self, key: str) -> int:
        return self.key_lines.get(key, self.line)

    def position(self, key: str) -> tuple[str, int]:
        """Where the value of ``key`` is written: this file and the key's line."""
        return self.file, self.line_of(key)

    def error(self, key: str, message: str) -> PolicyError:
        return PolicyError(self.file, self.line_of(key.split(".")[-1]), key, message)


class LocatedList(list[Any]):
    """A sequence from policy files, with its own position and the file and line of each item.

    Items keep their own file because list sections (``routes``, ``tests``) are concatenated
    across files with :meth:`extend_located`.
    """

    file: str
    line: int
    item_positions: list[tuple[str, int]]

    def position(self, index: int) -> tuple[str, int]:
        """Where item ``index`` is written (the list's own position if there is no such item)."""
        if 0 <= index < len(self.item_positions):
            return self.item_positions[index]
        return self.file, self.line

    def extend_located(self, other: LocatedList) -> None:
        """Append another file's items, keeping each item's own position."""
        self.extend(other)
        self.item_positions.extend(other.item_positions)


def _convert(node: yaml.Node, file: str, loader: yaml.SafeLoader, path: str) -> Any:
    line = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out = Located()
        out.file, out.line, out.key_lines = file, line, {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            key_line = key_node.start_mark.line + 1
            if not isinstance(key, str):
                raise PolicyError(file, key_line, path or "<top>", f"keys must be strings, got {key!r}")
            if key in out:
                raise PolicyError(file, key_line, _join(path, key), "duplicate key")
            out.key_lines[key] = key_line
            out[key] = _convert(value_node, file, loader, _join(path, key))
        return out
    if isinstance(node, yaml.SequenceNode):
        seq = LocatedList(
            _convert(item, file, loader, f"{path}[{i}]") for i, item in enumerate(node.value)
        )
        seq.file, seq.line = file, line
        seq.item_positions = [(file, item.start_mark.line + 1) for item in node.value]
        return seq
    return loader.construct_object(node, deep=True)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def load_file(path: str, text: str | None = None) -> Located | None:
    """Parse one policy file; None for an empty file."""
    if text is None:
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
        except UnicodeDecodeError as exc:
            line = exc.object[:exc.start].count(b"\n") + 1
            raise PolicyError(path, line, "<file>", "this file is not UTF-8 text; save it as UTF-8") from None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        value = _convert(node, path, loader, "")
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        raise PolicyError(path, line, "<yaml>", plain_yaml_error(exc)) from None
    except yaml.YAMLError as exc:
        raise PolicyError(path, 1, "<yaml>", f"this file is not valid YAML ({exc})") from None
    finally:
        loader.dispose()
    if not isinstance(value, Located):
        raise PolicyError(path, 1, "<top>", "a policy file must be a mapping of sections")
    return value


def plain_yaml_error(exc: yaml.MarkedYAMLError) -> str:
    """One plain sentence for a YAML syntax error (PyYAML's own wording is about its parser's states)."""
    problem = exc.problem or ""
    opened = exc.context_mark.line + 1 if exc.context_mark is not None else None
    problem_line = exc.problem_mark.line + 1 if exc.problem_mark is not None else None
    since = f" (it opens on line {opened})" if opened is not None and opened != problem_line else ""
    if problem.startswith("found character '\\t'"):
        sentence = "a tab character is used for indentation; YAML indents with spaces only"
    elif problem.startswith("found character"):
        char = problem.split("'")[1] if problem.count("'") >= 2 else "?"
        sentence = f"a value cannot start with {char!r}; put the value in quotes"
    elif problem == "mapping values are not allowed here":
        sentence = ("a 'key: value' appears where it cannot: check this line's indentation, or put a value "
                    "that contains ': ' in quotes")
    elif "while scanning a quoted scalar" in (exc.context or ""):
        sentence = f"a quoted string is never closed{since}"
    elif problem.startswith("expected ',' or ']'"):
        sentence = f"a list in square brackets is not closed with ']' (or an item lacks a comma){since}"
    elif problem.startswith("expected ',' or '}'"):
        sentence = f"a mapping in braces is not closed with '}}' (or an entry lacks a comma){since}"
    elif problem.startswith("expected <block end>") or problem.startswith("did not find expected key"):
        block = f" (the block it belongs to starts on line {opened})" if since else ""
        sentence = ("this line's indentation does not match the lines above it: a key or list item is out of "
                    f"line{block}")
    elif problem.startswith("did not find expected '-' indicator"):
        sentence = f"a list item is not indented like the items before it{since}"
    elif problem.startswith("could not find expected ':'"):
        sentence = "a line has no ':' after its key (or a quoted string is not closed)"
    elif problem.startswith("found undefined alias"):
        sentence = "an alias (*name) refers to an anchor (&name) that is not defined before it"
    else:
        sentence = f"this is not valid YAML: {problem or exc}"
    return f"YAML syntax error: {sentence}"
