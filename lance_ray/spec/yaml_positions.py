"""YAML loading that remembers where every key and value came from.

PyYAML's `safe_load` throws node positions away, but a job-file error is only useful when it
points at `job.yaml:LINE:COL`.  So we compose the node tree ourselves and build plain Python
values from it, recording for every path (`("steps", 0, "params", "frames")`) the position
of its key and of its value.  While walking we also reject duplicate keys (PyYAML silently
keeps the last one) and expand `${VAR}` / `${VAR:-default}` in string values.

Hostile input gets a problem, never an exception or an unbounded cost: control characters, nesting
deeper than `MAX_DEPTH` (checked while composing, before Python's recursion limit is near), and
aliases that would expand the document by more than `MAX_ALIAS_VALUES` values (a "billion laughs"
file of a few hundred bytes; its expanded size is counted on the composed node graph, where an alias
is a shared node, so the count costs one visit per distinct node).

Nothing here knows about jobs: `loader.py` maps validation errors back through `PositionMap`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

Path = tuple[Any, ...]

_STR_TAG = "tag:yaml.org,2002:str"
_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_MERGE_TAG = "tag:yaml.org,2002:merge"

MAX_DEPTH = 64  # nested mappings/lists; a job file needs about 8, inline rows a few more
MAX_ALIAS_VALUES = 100_000  # values aliases may add to the document when expanded

# `$$` is an escaped dollar; `${NAME}` and `${NAME:-default}` are references; any other `${`
# is a mistake we report rather than pass through silently.
_ENV_TOKEN = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$\{")


@dataclass(frozen=True)
class Mark:
    """A 1-based line and column in the source text."""

    line: int
    col: int

    @classmethod
    def of(cls, yaml_mark: yaml.Mark) -> Mark:
        return cls(yaml_mark.line + 1, yaml_mark.column + 1)


@dataclass(frozen=True)
class NodePosition:
    key: Mark | None  # None for list items and the document root
    value: Mark


@dataclass
class PositionMap:
    """Positions of every key/value in a loaded document, by path."""

    by_path: dict[Path, NodePosition] = field(default_factory=dict)

    def resolve(self, loc: Path) -> Path:
        """The longest known path matching `loc`, skipping components we never saw.

        Validation libraries insert synthetic components into error locations (union member
        names, `[key]`), so unknown components are skipped rather than ending the walk.
        """
        path: Path = ()
        for part in loc:
            if path + (part,) in self.by_path:
                path = path + (part,)
        return path

    def locate(self, loc: Path, *, at_key: bool = False) -> Mark:
        """Where to point for a problem at `loc`: the key if asked and known, else the value."""
        path = self.resolve(loc)
        pos = self.by_path.get(path)
        if pos is None:
            return Mark(1, 1)
        if at_key and pos.key is not None:
            return pos.key
        return pos.value


@dataclass
class LoadedYaml:
    data: Any
    positions: PositionMap
    problems: list[tuple[Mark, str]]  # syntax, duplicate keys, env references


def load_yaml(text: str, env: Mapping[str, str]) -> LoadedYaml:
    """Parse one YAML document; never raises for bad input, problems are returned instead."""
    positions = PositionMap()
    try:
        root = _compose(text)
    except yaml.MarkedYAMLError as err:
        return LoadedYaml(None, positions, [_syntax_problem(err, text)])
    except yaml.reader.ReaderError as err:  # a character YAML does not allow (control characters, NUL)
        where = position_in(text, err.position)
        code = err.character if isinstance(err.character, int) else ord(err.character)
        message = f"the job file contains the character U+{code:04X}, which YAML does not allow"
        return LoadedYaml(None, positions, [(where, message)])
    if root is None:
        return LoadedYaml(None, positions, [(Mark(1, 1), "the job file is empty")])
    bomb = _alias_bomb(root)
    if bomb is not None:
        return LoadedYaml(None, positions, [bomb])
    builder = _Builder(env, positions)
    data = builder.build(root, (), None)
    if data is None and not builder.problems:  # `---`, `~`, `null`: a document that says nothing
        builder.problems.append((Mark.of(root.start_mark), "the job file is empty"))
    return LoadedYaml(data, positions, builder.problems)


def position_in(text: str, index: int) -> Mark:
    """The line and column of character `index` of `text`."""
    line_start = text.rfind("\n", 0, index) + 1
    return Mark(text.count("\n", 0, index) + 1, index - line_start + 1)


class _TooDeep(yaml.composer.ComposerError):
    pass


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader's composer with a nesting limit: composing is recursive, so a file of a few KB of
    `[[[[...` would otherwise end in RecursionError."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise _TooDeep(None, None, f"values are nested more than {MAX_DEPTH} levels deep", mark)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def _compose(text: str) -> Node | None:
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_node()
    finally:
        loader.dispose()


def _syntax_problem(err: yaml.MarkedYAMLError, text: str) -> tuple[Mark, str]:
    mark = err.problem_mark or err.context_mark
    where = Mark.of(mark) if mark is not None else Mark(1, 1)
    if isinstance(err, _TooDeep):
        return where, str(err.problem)
    message = err.problem or err.context or "invalid YAML"
    if err.context and err.problem and not err.context.startswith("while "):
        message = f"{err.context}, {err.problem}"  # e.g. "expected a single document ..., but found ..."
    lines = text.splitlines()
    if where.line <= len(lines) and "${" in lines[where.line - 1]:
        # `{` ends a plain scalar inside `{...}`, so `{steps: ${N}}` cannot parse.
        message += " (inside {...} or [...] write ${VAR} references in quotes, or use block style)"
    return where, f"YAML syntax error: {message}"


def _alias_bomb(root: Node) -> tuple[Mark, str] | None:
    """A problem when aliases would add more than MAX_ALIAS_VALUES values to the document.

    An alias is the very node its anchor names, so the document is a graph whose expanded size is
    one memoised walk away. The problem points at the anchor whose copies add the most values.
    """
    expanded: dict[int, int] = {}  # id(node) -> values in its expanded subtree
    uses: dict[int, int] = {}
    nodes: dict[int, Node] = {}
    in_progress: set[int] = set()

    def size(node: Node) -> int:
        key = id(node)
        uses[key] = uses.get(key, 0) + 1
        if key in expanded:
            return expanded[key]
        if key in in_progress:  # an alias inside its own anchor: the builder reports it
            return 1
        in_progress.add(key)
        total = 1
        if isinstance(node, MappingNode):
            total += sum(size(k) + size(v) for k, v in node.value)
        elif isinstance(node, SequenceNode):
            total += sum(size(item) for item in node.value)
        in_progress.discard(key)
        expanded[key] = total
        nodes[key] = node
        return total

    added = size(root) - len(expanded)
    if added <= MAX_ALIAS_VALUES:
        return None
    worst = max((k for k in uses if uses[k] > 1), key=lambda k: expanded[k] * (uses[k] - 1))
    message = (
        f"aliases would expand this document by {added:,} values (at most {MAX_ALIAS_VALUES:,} are "
        f"allowed); most come from the {uses[worst]:,} uses of the value anchored here"
    )
    return Mark.of(nodes[worst].start_mark), message


class _Builder:
    def __init__(self, env: Mapping[str, str], positions: PositionMap) -> None:
        self.env = env
        self.positions = positions
        self.problems: list[tuple[Mark, str]] = []
        self.constructor = SafeConstructor()
        self.resolver = yaml.resolver.Resolver()
        self.open_nodes: set[int] = set()  # collections being built, to catch `&a [*a]`

    def build(self, node: Node, path: Path, key_mark: Mark | None) -> Any:
        self.positions.by_path[path] = NodePosition(key_mark, Mark.of(node.start_mark))
        if isinstance(node, ScalarNode):
            return self._string(node) if node.tag == _STR_TAG else self._construct(node)
        if id(node) in self.open_nodes:
            # An alias shares its anchor's node, so the key is the only trace of where it is used.
            where = key_mark or Mark.of(node.start_mark)
            self.problems.append((where, "an alias refers to a node that contains it"))
            return None
        self.open_nodes.add(id(node))
        try:
            if isinstance(node, MappingNode) and node.tag == _MAP_TAG:
                return self._mapping(node, path)
            if isinstance(node, SequenceNode) and node.tag == _SEQ_TAG:
                return [self.build(item, path + (i,), None) for i, item in enumerate(node.value)]
            return self._construct(node)
        finally:
            self.open_nodes.discard(id(node))

    def _mapping(self, node: MappingNode, path: Path) -> dict[Any, Any]:
        # Duplicates are checked among the node's own keys only: keys pulled in by a `<<` merge
        # are meant to be overridden.
        first_seen: dict[Any, Mark] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            key = self._construct(key_node)
            here = Mark.of(key_node.start_mark)
            if _hashable(key) and key in first_seen:
                self.problems.append(
                    (here, f"duplicate key {key!r} (first defined at line {first_seen[key].line})")
                )
            elif _hashable(key):
                first_seen[key] = here
        try:
            self.constructor.flatten_mapping(node)
        except ConstructorError as err:
            self.problems.append((_mark_of(err, node), f"bad merge key: {err.problem}"))
            return {}
        result: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = self._construct(key_node)
            if not _hashable(key):
                self.problems.append(
                    (
                        Mark.of(key_node.start_mark),
                        'a mapping key must be a scalar (a Jinja template must be quoted: "{{ column }}")',
                    )
                )
                continue
            if key in result and key in first_seen and first_seen[key] != Mark.of(key_node.start_mark):
                continue  # a reported duplicate: keep the first definition
            result[key] = self.build(value_node, path + (key,), Mark.of(key_node.start_mark))
        return result

    def _string(self, node: ScalarNode) -> Any:
        text = node.value
        if "$" not in text:
            return text
        expanded = self._interpolate(text, Mark.of(node.start_mark))
        if node.style is None:
            # A plain scalar that was a reference (`steps: ${STEPS}`) gets its type from the
            # expanded text, exactly as if the value had been written there.
            tag = self.resolver.resolve(ScalarNode, expanded, (True, False))
            return self._construct(ScalarNode(tag, expanded, node.start_mark, node.end_mark))
        return expanded

    def _interpolate(self, text: str, where: Mark) -> str:
        def replace(match: re.Match[str]) -> str:
            token = match.group(0)
            if token == "$$":
                return "$"
            name, default = match.group(1), match.group(2)
            if name is None:
                self.problems.append(
                    (
                        where,
                        "malformed environment reference: use ${NAME} or ${NAME:-default} ($$ for a literal $)",
                    )
                )
                return token
            value = self.env.get(name)
            if value:
                return value
            if default is not None:
                return default
            if value is None:
                self.problems.append(
                    (
                        where,
                        f"environment variable {name} is not set (use ${{{name}:-default}} to give a default)",
                    )
                )
                return ""
            return value  # set but empty, and no default: empty is what was asked for

        return _ENV_TOKEN.sub(replace, text)

    def _construct(self, node: Node) -> Any:
        try:
            return self.constructor.construct_object(node, deep=True)
        except ConstructorError as err:
            self.problems.append((_mark_of(err, node), f"cannot read value: {err.problem}"))
        except Exception as err:  # 2024-13-45, an integer of 5000 digits, `!!int` on an empty value...
            text = str(node.value) if isinstance(node, ScalarNode) else ""
            shown = repr(text) if len(text) <= 40 else f"this value ({len(text):,} characters)"
            # Python's own advice after the `;` is not for job files; PyYAML fails on '' with IndexError.
            reason = str(err).split(";")[0] if text and isinstance(err, ValueError | OverflowError) else "invalid"
            message = f"cannot read {shown} as {node.tag.rsplit(':', 1)[-1]}: {reason} (quote it to keep it text)"
            self.problems.append((Mark.of(node.start_mark), message))
        return None


def _mark_of(err: ConstructorError, node: Node) -> Mark:
    return Mark.of(err.problem_mark) if err.problem_mark is not None else Mark.of(node.start_mark)


def _hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True
