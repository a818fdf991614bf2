"""The authorization policy: which client identity may seal which paths, with what access and quotas (default deny).

The policy is a TOML file. A worked example::

    # Quotas for rules that do not set their own (optional table; built-in defaults below).
    [defaults]
    max_sessions = 16            # live sessions per identity
    max_grants = 1024            # live grants per identity, over all its sessions
    max_sealed_bytes = "64 GiB"  # sum of the lengths of the seals it holds; an int (bytes) or "N KiB|MiB|GiB|TiB"
    max_watch_streams = 64       # concurrent Watch streams per identity

    [[allow]]
    identity = "spiffe://rdax.test/client/victim"   # exact, or a glob (fnmatch: * ? [..])
    paths = ["victim/**", "shared/*.log"]          # globs relative to the export root
    create = true                                   # may Seal(create=true) make new files (default false)
    access = ["write", "read", "atomic", "flush"]   # what Grant may hand out (default: ["write", "flush"])
    max_sessions = 4                                # overrides [defaults]

Identities. Each ``[[allow]]`` names one identity: the certificate identity
the node saw (for example a SPIFFE ID), or ``anonymous``, which is every
caller of a node started with --insecure. An identity containing ``*``, ``?``
or ``[`` is a glob matched with fnmatch rules, where ``*`` also matches '/'
(``spiffe://rdax.test/team-a/*`` matches ``spiffe://rdax.test/team-a/x/y``).
An exact identity wins over every glob; among globs the first one in file
order that matches wins. Exactly one rule applies to an identity, rules are
never merged, and an identity no rule matches is denied everything. The same
identity string in two entries is a load error.

Paths. ``paths`` is a non-empty list of globs matched against the canonical
path relative to the export root (``victim/a.bin``: no leading '/', no '.',
no '..', no empty component). ``*``, ``?`` and ``[...]`` (``[!...]`` negates)
match within one component and never match '/'; like fnmatch they do match a
leading '.'. ``**`` must be a whole component:

* trailing, ``victim/**``: one or more components, i.e. every file beneath
  ``victim`` at any depth (``victim/a``, ``victim/a/b``) but NOT a file named
  ``victim`` itself: a path names a file, and ``dir/**`` means "inside dir";
* leading, ``**/*.log``: zero or more directories (``x.log``, ``d/e/x.log``);
* in the middle, ``a/**/b``: zero or more directories (``a/b``, ``a/x/y/b``);
* alone, ``**``: every path beneath the export root.

``**`` anywhere else (``a**``, ``**/**``) is a load error, as are absolute
globs, '.', '..' or empty components, and an unclosed ``[``.

Access. ``access`` lists what Grant may hand out: ``write`` (1), ``read``
(2), ``atomic`` (4), ``flush`` (8), the bits of rdax.v1.Access. ``atomic``
requires ``write``. ``create`` says whether Seal may create missing files.

Quotas. Positive integers; ``max_sealed_bytes`` may also be a string such as
``"64 GiB"``, ``"512MiB"`` or ``"1048576"``. A rule's own keys override
``[defaults]``, which override the built-in DEFAULT_QUOTAS.

Unknown keys anywhere are load errors: a typo in a security policy must not
silently widen or narrow what it grants.
"""
from __future__ import annotations

import difflib
import fnmatch
import os
import re
import tomllib
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidArgument, PermissionDenied
from .grants import ACCESS_ATOMIC, ACCESS_FLUSH, ACCESS_READ, ACCESS_WRITE, access_label

MAX_QUOTED = 200   # client-supplied strings in messages: a client can send a 4 KiB path

ACCESS_BY_NAME = {"write": ACCESS_WRITE, "read": ACCESS_READ, "atomic": ACCESS_ATOMIC, "flush": ACCESS_FLUSH}
DEFAULT_ACCESS = ACCESS_WRITE | ACCESS_FLUSH

_SIZE_UNITS = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}
_SIZE_RE = re.compile(r"\s*([0-9]+)\s*([A-Za-z]*)\s*")
_GLOB_CHARS = frozenset("*?[")
_RELOAD_HINT = "(and send SIGHUP to rdax-server)"


@dataclass(frozen=True)
class Quotas:
    """What one identity may hold at once, over all its sessions."""

    max_sessions: int
    max_grants: int
    max_sealed_bytes: int
    max_watch_streams: int


DEFAULT_QUOTAS = Quotas(max_sessions=16, max_grants=1024, max_sealed_bytes=64 << 30, max_watch_streams=64)
_QUOTA_KEYS = tuple(Quotas.__dataclass_fields__)
_ALLOW_KEYS = ("identity", "paths", "create", "access") + _QUOTA_KEYS
_TOP_KEYS = ("defaults", "allow")


class PolicyError(InvalidArgument):
    """A policy file that does not load; the message names the file and what is wrong."""


class _GlobError(ValueError):
    """A path glob that cannot be compiled; the loader adds the file and entry."""


def quote(text: str, limit: int = MAX_QUOTED) -> str:
    """`text` quoted for a message, cut at `limit` characters with its real length said."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}… ({len(text)} characters)"


def is_glob(identity: str) -> bool:
    return not _GLOB_CHARS.isdisjoint(identity)


def compile_path_glob(glob: str) -> re.Pattern[str]:
    """The regex a canonical relative path must fullmatch; _GlobError if `glob` is not a valid path glob."""
    if not glob:
        raise _GlobError("path glob '' is empty: write a glob relative to the export root such as 'dir/**'")
    if glob.startswith("/"):
        raise _GlobError(f"path glob {glob!r} is absolute: globs are relative to the export root, drop the leading '/'")
    components = glob.split("/")
    for bad, why in (("..", "cannot climb out of the export root"), (".", "never matches a canonical path"),
                     ("", "never matches a canonical path (empty component: '//' or a trailing '/')")):
        if bad in components:
            raise _GlobError(f"path glob {glob!r} has a {bad!r} component, which {why}")
    out: list[str] = []
    need_sep = False   # whether the next ordinary component needs a leading '/'
    last = len(components) - 1
    for i, comp in enumerate(components):
        if comp == "**":
            if i > 0 and components[i - 1] == "**":
                raise _GlobError(f"path glob {glob!r} has '**/**': one '**' already matches any depth")
            if i == 0 and i == last:
                out.append(r"[^/]+(?:/[^/]+)*")
            elif i == 0:
                out.append(r"(?:[^/]+/)*")
            elif i == last:
                # One or more: 'dir/**' is what is inside dir, not a file named dir.
                out.append(r"(?:/[^/]+)+")
            else:
                out.append(r"(?:/[^/]+)*")
                need_sep = True
            continue
        if "**" in comp:
            raise _GlobError(
                f"path glob {glob!r} has '**' inside the component {comp!r}: '**' must be a whole component "
                "such as 'dir/**' or '**/*.log'; use '*' to match within one component")
        if need_sep:
            out.append("/")
        out.append(_translate_component(comp, glob))
        need_sep = True
    return re.compile("".join(out))


def _translate_component(comp: str, glob: str) -> str:
    """Regex of one component of a path glob: '*' and '?' and classes never match '/'."""
    out: list[str] = []
    i, n = 0, len(comp)
    while i < n:
        c = comp[i]
        i += 1
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            # As in fnmatch: '!' first negates, and ']' right after '[' or '[!' is a literal.
            j = i
            if j < n and comp[j] == "!":
                j += 1
            if j < n and comp[j] == "]":
                j += 1
            while j < n and comp[j] != "]":
                j += 1
            if j >= n:
                # fnmatch would read it as a literal '[': in a security policy that is more likely a typo.
                raise _GlobError(
                    f"path glob {glob!r} has an unclosed '[' in {comp!r}: close the class, or write '[[]' "
                    "for a literal '['")
            body = comp[i:j]
            i = j + 1
            negate = body.startswith("!")
            out.append(("[^/" if negate else "[") + _class_items(body[1:] if negate else body, glob) + "]")
        else:
            out.append(re.escape(c))
    return "".join(out)


def _class_items(body: str, glob: str) -> str:
    items: list[str] = []
    k = 0
    while k < len(body):
        if k + 2 < len(body) and body[k + 1] == "-":
            lo, hi = body[k], body[k + 2]
            if lo > hi:
                raise _GlobError(f"path glob {glob!r} has the empty range '{lo}-{hi}': write '{hi}-{lo}'")
            items.append(f"{re.escape(lo)}-{re.escape(hi)}")
            k += 3
        else:
            items.append(re.escape(body[k]))
            k += 1
    return "".join(items)


def _is_canonical(relpath: str) -> bool:
    # The caller canonicalises; refusing anything else keeps 'victim/**' from matching 'victim/../x'.
    if not relpath or relpath.startswith("/") or "\0" in relpath:
        return False
    return all(c not in ("", ".", "..") for c in relpath.split("/"))


@dataclass(frozen=True)
class Rule:
    """One [[allow]] entry: what an identity may do beneath the export root."""

    identity: str
    paths: tuple[str, ...]
    create: bool
    access: int
    quotas: Quotas
    _patterns: tuple[re.Pattern[str], ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Compiled once here, so that a request only runs regexes.
        object.__setattr__(self, "_patterns", tuple(compile_path_glob(g) for g in self.paths))

    def allows_path(self, relpath: str) -> bool:
        """Whether the canonical relative path matches one of this rule's globs."""
        return _is_canonical(relpath) and any(p.fullmatch(relpath) for p in self._patterns)


class Policy:
    """A loaded policy: rule lookup by identity and the checks the node makes before Seal and Grant."""

    def __init__(self, rules: tuple[Rule, ...], source: str = "<string>") -> None:
        self.source = source
        self.rules = rules
        self._exact: dict[str, Rule] = {}
        self._globs: list[tuple[re.Pattern[str], Rule]] = []
        for rule in rules:
            if is_glob(rule.identity):
                self._globs.append((re.compile(fnmatch.translate(rule.identity)), rule))
            else:
                self._exact.setdefault(rule.identity, rule)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Policy:
        """Read and check the policy file at `path`; PolicyError if it is unreadable, not TOML or invalid."""
        source = os.fspath(path)
        try:
            with open(source, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise PolicyError(
                f"policy {source} cannot be read: {exc.strerror or exc}: check the path given to "
                "rdax-server and that the file is readable by the user it runs as") from exc
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PolicyError(f"policy {source} is not UTF-8 ({exc.reason} at byte {exc.start}): "
                              "TOML files are UTF-8; re-save it as UTF-8") from exc
        return cls.parse(text, source)

    @classmethod
    def parse(cls, text: str, source: str = "<string>") -> Policy:
        """Check the policy in `text`; `source` names it in messages."""
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise PolicyError(f"policy {source} is not valid TOML: {exc}: fix the syntax there") from exc
        return _Loader(text, source).build(doc)

    def rule_for(self, identity: str) -> Rule | None:
        """The one rule for `identity`: its exact entry, else the first glob entry matching it, else None."""
        rule = self._exact.get(identity)
        if rule is not None:
            return rule
        for pattern, rule in self._globs:
            if pattern.match(identity):
                return rule
        return None

    def check_seal(self, identity: str, relpath: str, *, create: bool) -> Rule:
        """The rule letting `identity` seal `relpath` (creating it if `create`); PermissionDenied if none does."""
        rule = self._path_rule(identity, relpath)
        if create and not rule.create:
            raise PermissionDenied(
                f"identity {quote(identity)} may not create {quote(relpath)}: its rule "
                f"({self._describe(rule)}) has create = false: seal an existing file, or ask the operator "
                f"to set create = true in that rule {_RELOAD_HINT}")
        return rule

    def check_grant(self, identity: str, relpath: str, access: int) -> Rule:
        """The rule letting `identity` be granted `access` on `relpath`; PermissionDenied if none does."""
        rule = self._path_rule(identity, relpath)
        refused = access & ~rule.access
        if refused:
            names = ", ".join(repr(n) for n, bit in ACCESS_BY_NAME.items() if refused & bit)
            operator = (f", or ask the operator to add {names} to that rule's access {_RELOAD_HINT}" if names
                        else "")   # bits with no name: no rule can allow them
            raise PermissionDenied(
                f"identity {quote(identity)} may not be granted {access_label(access)} (access {access:#x}) "
                f"on {quote(relpath)}: its rule ({self._describe(rule)}) allows only "
                f"{access_label(rule.access)}: ask for a subset of that{operator}")
        return rule

    def allowed_access(self, identity: str, relpath: str) -> int:
        """The access bits `identity` may be granted on `relpath`: 0 if it may not use the path at all."""
        rule = self.rule_for(identity)
        if rule is None or not rule.allows_path(relpath):
            return 0
        return rule.access

    def may_see(self, identity: str, relpath: str) -> bool:
        """Whether `relpath` is one of the paths `identity` may use (for listing and Watch)."""
        rule = self.rule_for(identity)
        return rule is not None and rule.allows_path(relpath)

    def _path_rule(self, identity: str, relpath: str) -> Rule:
        rule = self.rule_for(identity)
        if rule is None:
            raise PermissionDenied(
                f"identity {quote(identity)} is not in the policy {self.source}: add an [[allow]] entry "
                f"for it there {_RELOAD_HINT}")
        if not rule.allows_path(relpath):
            raise PermissionDenied(
                f"identity {quote(identity)} may not use path {quote(relpath)}: its rule "
                f"({self._describe(rule)}) allows only paths matching {_list_globs(rule.paths)}: use a path "
                f"matching one of those, or ask the operator to add a glob to that rule's paths {_RELOAD_HINT}")
        return rule

    def _describe(self, rule: Rule) -> str:
        return f"identity {quote(rule.identity)} in {self.source}"


def _list_globs(globs: tuple[str, ...], limit: int = 10) -> str:
    shown = ", ".join(repr(g) for g in globs[:limit])
    return shown if len(globs) <= limit else f"{shown} and {len(globs) - limit} more"


def parse_size(value: Any) -> int:
    """Bytes from an int or a string such as '64 GiB', '512MiB' or '4096'; ValueError if it is neither."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{value!r} is not a size: write an integer of bytes or a string such as \"64 GiB\"")
    if isinstance(value, int):
        return value
    m = _SIZE_RE.fullmatch(value)
    if m is None:
        raise ValueError(f"{value!r} is not a size: write \"N KiB\", \"N MiB\", \"N GiB\", \"N TiB\" or an integer")
    number, unit = int(m.group(1)), m.group(2)
    if not unit:
        return number
    if unit not in _SIZE_UNITS:
        # 'GB' is refused rather than guessed: 10^9 and 2^30 differ by 7%.
        raise ValueError(f"{value!r} has the unit {unit!r}: use one of KiB, MiB, GiB, TiB (powers of 1024)")
    return number * _SIZE_UNITS[unit]


class _Loader:
    """Turns a decoded TOML document into a Policy, naming the file and entry in every error."""

    def __init__(self, text: str, source: str) -> None:
        self.source = source
        # tomllib gives no positions for values: find the [[allow]] headers so that
        # errors can name a line, if they all use that form.
        self.allow_lines = [n for n, line in enumerate(text.splitlines(), 1)
                            if re.match(r"\s*\[\[\s*allow\s*\]\]", line)]

    def error(self, where: str, what: str) -> PolicyError:
        return PolicyError(f"policy {self.source}: {where}: {what}")

    def build(self, doc: dict[str, Any]) -> Policy:
        self.check_keys(doc, _TOP_KEYS, "top level")
        defaults_table = doc.get("defaults", {})
        if not isinstance(defaults_table, dict):
            raise self.error("top level", "'defaults' must be a table: write it as [defaults]")
        self.check_keys(defaults_table, _QUOTA_KEYS, "[defaults]")
        defaults = self.quotas(defaults_table, DEFAULT_QUOTAS, "[defaults]")
        entries = doc.get("allow", [])
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise self.error("top level", "'allow' must be an array of tables: write each entry as [[allow]]")
        if len(self.allow_lines) != len(entries):
            self.allow_lines = []
        rules: list[Rule] = []
        seen: dict[str, str] = {}
        for index, entry in enumerate(entries):
            where = self.where(index, entry)
            rule = self.rule(entry, defaults, where)
            if rule.identity in seen:
                raise self.error(where, f"identity {rule.identity!r} already has an entry ({seen[rule.identity]}): "
                                        "exactly one rule applies to an identity; merge the two entries")
            seen[rule.identity] = where
            rules.append(rule)
        return Policy(tuple(rules), self.source)

    def where(self, index: int, entry: dict[str, Any]) -> str:
        where = f"[[allow]] entry {index + 1}"
        if self.allow_lines:
            where += f" (line {self.allow_lines[index]})"
        identity = entry.get("identity")
        if isinstance(identity, str):
            where += f" for {quote(identity)}"
        return where

    def check_keys(self, table: dict[str, Any], known: tuple[str, ...], where: str) -> None:
        for key in table:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise self.error(where, f"unknown key {key!r}: {hint}known keys are {', '.join(known)}")

    def rule(self, entry: dict[str, Any], defaults: Quotas, where: str) -> Rule:
        self.check_keys(entry, _ALLOW_KEYS, where)
        identity = entry.get("identity")
        if not isinstance(identity, str) or not identity:
            raise self.error(where, "'identity' is missing or not a non-empty string: name the client identity, "
                                    "e.g. identity = \"spiffe://example.org/client/a\", or \"anonymous\"")
        if identity != identity.strip():
            raise self.error(where, f"identity {identity!r} has leading or trailing white space: remove it")
        paths = entry.get("paths")
        if not isinstance(paths, list) or not paths or not all(isinstance(p, str) for p in paths):
            raise self.error(where, "'paths' is missing or not a non-empty list of strings: list globs relative "
                                    "to the export root, e.g. paths = [\"victim/**\"]")
        create = entry.get("create", False)
        if not isinstance(create, bool):
            raise self.error(where, f"'create' is {create!r}: write true or false")
        access = self.access(entry.get("access"), where)
        quotas = self.quotas(entry, defaults, where)
        try:
            return Rule(identity=identity, paths=tuple(paths), create=create, access=access, quotas=quotas)
        except _GlobError as exc:
            raise self.error(where, str(exc)) from exc

    def access(self, names: Any, where: str) -> int:
        if names is None:
            return DEFAULT_ACCESS
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise self.error(where, f"'access' is {names!r}: write a list such as [\"write\", \"flush\"]")
        access = 0
        for name in names:
            bit = ACCESS_BY_NAME.get(name.lower())
            if bit is None:
                raise self.error(where, f"unknown access {name!r}: use {', '.join(map(repr, ACCESS_BY_NAME))}")
            access |= bit
        if access & ACCESS_ATOMIC and not access & ACCESS_WRITE:
            # rxe checks ATOMIC_WRITE against remote-write permission: an atomic-only
            # rule would hand out regions that accept plain RDMA WRITE as well.
            raise self.error(where, "access lists \"atomic\" without \"write\": rxe checks ATOMIC_WRITE against "
                                    "remote-write permission, so atomic requires write; add \"write\" or drop "
                                    "\"atomic\"")
        return access

    def quotas(self, table: dict[str, Any], base: Quotas, where: str) -> Quotas:
        values: dict[str, int] = {}
        for key in _QUOTA_KEYS:
            if key not in table:
                values[key] = getattr(base, key)
                continue
            raw = table[key]
            if key == "max_sealed_bytes":
                try:
                    value = parse_size(raw)
                except ValueError as exc:
                    raise self.error(where, f"{key}: {exc}") from exc
            elif isinstance(raw, bool) or not isinstance(raw, int):
                raise self.error(where, f"{key} is {raw!r}: write a positive integer")
            else:
                value = raw
            if value <= 0:
                raise self.error(where, f"{key} is {raw!r}: it must be positive (remove the entry to deny "
                                        "the identity instead)")
            values[key] = value
        return Quotas(**values)
