"""Tests for service.policy: loading a TOML policy and the default-deny checks made before Seal and Grant."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from rdax.service.errors import InvalidArgument, PermissionDenied
from rdax.service.grants import ACCESS_ATOMIC, ACCESS_FLUSH, ACCESS_READ, ACCESS_WRITE
from rdax.service.policy import DEFAULT_QUOTAS, Policy, PolicyError, Quotas, Rule, parse_size, quote

VICTIM = "spiffe://rdax.test/client/victim"

EXAMPLE = """
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
"""


def _policy(*entries: str, defaults: str = "") -> Policy:
    return Policy.parse(defaults + "\n" + "\n".join("[[allow]]\n" + e for e in entries), "/etc/rdax/policy.toml")


def _path_rule(*globs: str) -> Rule:
    return Rule(identity="x", paths=globs, create=False, access=ACCESS_WRITE, quotas=DEFAULT_QUOTAS)


# --- the documented example -------------------------------------------------

def test_example_loads_as_documented() -> None:
    policy = Policy.parse(EXAMPLE, "example.toml")
    rule = policy.rule_for(VICTIM)
    assert rule is not None
    assert rule.paths == ("victim/**", "shared/*.log")
    assert rule.create is True
    assert rule.access == ACCESS_WRITE | ACCESS_READ | ACCESS_ATOMIC | ACCESS_FLUSH
    assert rule.quotas == Quotas(max_sessions=4, max_grants=1024, max_sealed_bytes=64 << 30, max_watch_streams=64)
    assert policy.source == "example.toml"


def test_policy_module_docstring_holds_the_example() -> None:
    import rdax.service.policy as module
    # The README copies the example from the docstring: it must stay the one tested here.
    for line in EXAMPLE.strip().splitlines():
        assert line.strip() in module.__doc__


def test_policy_error_is_invalid_argument() -> None:
    assert issubclass(PolicyError, InvalidArgument)
    assert PolicyError.code == "INVALID_ARGUMENT"


# --- identity matching ------------------------------------------------------

def test_rule_for_exact_over_glob() -> None:
    policy = _policy(
        'identity = "spiffe://rdax.test/client/*"\npaths = ["glob/**"]',
        f'identity = "{VICTIM}"\npaths = ["exact/**"]',
    )
    assert policy.rule_for(VICTIM).paths == ("exact/**",)
    assert policy.rule_for("spiffe://rdax.test/client/other").paths == ("glob/**",)


def test_rule_for_first_glob_wins() -> None:
    policy = _policy(
        'identity = "spiffe://rdax.test/team-a/*"\npaths = ["first/**"]',
        'identity = "spiffe://rdax.test/*"\npaths = ["second/**"]',
    )
    assert policy.rule_for("spiffe://rdax.test/team-a/x").paths == ("first/**",)
    assert policy.rule_for("spiffe://rdax.test/team-b/x").paths == ("second/**",)


def test_rule_for_identity_glob_star_crosses_slash() -> None:
    # Identity globs are fnmatch: '*' matches '/' (unlike path globs).
    policy = _policy('identity = "spiffe://rdax.test/team-a/*"\npaths = ["a/**"]')
    assert policy.rule_for("spiffe://rdax.test/team-a/x/y") is not None
    assert policy.rule_for("spiffe://rdax.test/team-b/x") is None


def test_rule_for_identity_case_sensitive() -> None:
    policy = _policy(f'identity = "{VICTIM}"\npaths = ["a/**"]')
    assert policy.rule_for(VICTIM.upper()) is None


def test_rule_for_anonymous_is_an_exact_identity() -> None:
    policy = _policy('identity = "anonymous"\npaths = ["pub/*"]')
    assert policy.may_see("anonymous", "pub/f")
    assert not policy.may_see("anonymous2", "pub/f")


def test_rules_not_merged() -> None:
    # The exact rule applies alone: the glob rule's paths do not add to it.
    policy = _policy(
        'identity = "spiffe://rdax.test/*"\npaths = ["glob/**"]\naccess = ["read"]',
        f'identity = "{VICTIM}"\npaths = ["exact/**"]',
    )
    assert not policy.may_see(VICTIM, "glob/f")
    assert policy.allowed_access(VICTIM, "exact/f") == ACCESS_WRITE | ACCESS_FLUSH


def test_check_seal_unknown_identity_bad_flow() -> None:
    policy = _policy(f'identity = "{VICTIM}"\npaths = ["victim/**"]')
    with pytest.raises(PermissionDenied) as info:
        policy.check_seal("spiffe://x/y", "victim/f", create=False)
    assert "'spiffe://x/y'" in info.value.message
    assert "/etc/rdax/policy.toml" in info.value.message
    assert "[[allow]]" in info.value.message
    assert info.value.code == "PERMISSION_DENIED"


def test_empty_policy_denies_everything_bad_flow() -> None:
    policy = Policy.parse("", "empty.toml")
    assert policy.rules == ()
    assert policy.rule_for("anonymous") is None
    assert policy.allowed_access("anonymous", "f") == 0
    assert not policy.may_see("anonymous", "f")
    with pytest.raises(PermissionDenied):
        policy.check_grant("anonymous", "f", ACCESS_WRITE)


def test_load_duplicate_identity_bad_flow() -> None:
    with pytest.raises(PolicyError, match="already has an entry"):
        _policy(f'identity = "{VICTIM}"\npaths = ["a/*"]', f'identity = "{VICTIM}"\npaths = ["b/*"]')


# --- path globs -------------------------------------------------------------

def test_allows_path_star_not_crossing_slash() -> None:
    rule = _path_rule("shared/*.log")
    assert rule.allows_path("shared/a.log")
    assert rule.allows_path("shared/.log")
    assert not rule.allows_path("shared/d/a.log")
    assert not rule.allows_path("shared/a.log.bak")
    assert not rule.allows_path("other/shared/a.log")


def test_allows_path_question_mark_one_character() -> None:
    rule = _path_rule("d/f?.bin")
    assert rule.allows_path("d/f1.bin")
    assert not rule.allows_path("d/f.bin")
    assert not rule.allows_path("d/f12.bin")
    assert not _path_rule("a?b").allows_path("a/b")


def test_allows_path_trailing_double_star() -> None:
    rule = _path_rule("victim/**")
    assert rule.allows_path("victim/a")
    assert rule.allows_path("victim/a/b")
    assert rule.allows_path("victim/a/b/c.bin")
    # 'dir/**' is what is inside dir, not a file named dir.
    assert not rule.allows_path("victim")
    assert not rule.allows_path("victims/a")
    assert not rule.allows_path("other/victim/a")


def test_allows_path_leading_double_star() -> None:
    rule = _path_rule("**/*.log")
    assert rule.allows_path("x.log")
    assert rule.allows_path("d/x.log")
    assert rule.allows_path("d/e/x.log")
    assert not rule.allows_path("d/x.log/y")


def test_allows_path_middle_double_star() -> None:
    rule = _path_rule("a/**/b.bin")
    assert rule.allows_path("a/b.bin")
    assert rule.allows_path("a/x/b.bin")
    assert rule.allows_path("a/x/y/b.bin")
    assert not rule.allows_path("ab.bin")
    assert not rule.allows_path("a/x/b.bin2")
    assert not rule.allows_path("z/a/b.bin")


def test_allows_path_lone_double_star() -> None:
    rule = _path_rule("**")
    assert rule.allows_path("f")
    assert rule.allows_path("d/e/f")
    assert not rule.allows_path("")


def test_allows_path_character_classes() -> None:
    rule = _path_rule("d/[ab]-[0-9].bin", "n/[!x]")
    assert rule.allows_path("d/a-7.bin")
    assert rule.allows_path("d/b-0.bin")
    assert not rule.allows_path("d/c-7.bin")
    assert not rule.allows_path("d/a-x.bin")
    assert rule.allows_path("n/y")
    assert not rule.allows_path("n/x")
    # A negated class still never matches '/'.
    assert not _path_rule("n[!x]m").allows_path("n/m")


def test_allows_path_literal_regex_characters() -> None:
    rule = _path_rule("d/a.b+(c)")
    assert rule.allows_path("d/a.b+(c)")
    assert not rule.allows_path("d/aXb+(c)")
    assert not rule.allows_path("d/a.bb(c)")


def test_allows_path_non_canonical_bad_flow() -> None:
    rule = _path_rule("victim/**")
    for path in ("victim/../etc/passwd", "victim/./a", "/victim/a", "victim//a", "victim/a/"):
        assert not rule.allows_path(path), path


@pytest.mark.parametrize("glob, complaint", [
    ("/abs/*", "absolute"),
    ("a/../b", "'..'"),
    ("../a", "'..'"),
    ("a/./b", "'.'"),
    ("a//b", "empty component"),
    ("a/", "empty component"),
    ("", "empty"),
    ("a**", "whole component"),
    ("a/**b/c", "whole component"),
    ("a/**/**/b", "'\\*\\*/\\*\\*'"),
    ("a/[bc", "unclosed"),
    ("a/[z-a]", "empty range"),
])
def test_load_bad_path_glob_bad_flow(glob: str, complaint: str) -> None:
    with pytest.raises(PolicyError, match=complaint) as info:
        _policy(f'identity = "{VICTIM}"\npaths = [{glob!r}]'.replace("'", '"'))
    assert "/etc/rdax/policy.toml" in info.value.message
    assert "[[allow]] entry 1" in info.value.message


def test_load_paths_missing_bad_flow() -> None:
    with pytest.raises(PolicyError, match="'paths'"):
        _policy(f'identity = "{VICTIM}"')
    with pytest.raises(PolicyError, match="'paths'"):
        _policy(f'identity = "{VICTIM}"\npaths = []')
    with pytest.raises(PolicyError, match="'paths'"):
        _policy(f'identity = "{VICTIM}"\npaths = "victim/**"')


def test_check_seal_path_denied_bad_flow() -> None:
    policy = _policy(f'identity = "{VICTIM}"\npaths = ["victim/**", "shared/*.log"]')
    with pytest.raises(PermissionDenied) as info:
        policy.check_seal(VICTIM, "other/f", create=False)
    message = info.value.message
    assert "'other/f'" in message
    assert f"'{VICTIM}'" in message
    assert "'victim/**'" in message and "'shared/*.log'" in message
    assert policy.check_seal(VICTIM, "victim/f", create=False).identity == VICTIM


def test_may_see_follows_paths() -> None:
    policy = _policy(f'identity = "{VICTIM}"\npaths = ["victim/**"]')
    assert policy.may_see(VICTIM, "victim/a/b")
    assert not policy.may_see(VICTIM, "attacker/a")
    assert not policy.may_see("spiffe://rdax.test/client/attacker", "victim/a")


# --- create -----------------------------------------------------------------

def test_check_seal_create_allowed() -> None:
    policy = _policy(f'identity = "{VICTIM}"\npaths = ["victim/**"]\ncreate = true')
    assert policy.check_seal(VICTIM, "victim/new", create=True).create is True


def test_check_seal_create_default_false_bad_flow() -> None:
    policy = _policy(f'identity = "{VICTIM}"\npaths = ["victim/**"]')
    assert policy.check_seal(VICTIM, "victim/existing", create=False).create is False
    with pytest.raises(PermissionDenied) as info:
        policy.check_seal(VICTIM, "victim/new", create=True)
    assert "seal an existing file" in info.value.message
    assert "create = true" in info.value.message
    assert "'victim/new'" in info.value.message


def test_load_create_not_bool_bad_flow() -> None:
    with pytest.raises(PolicyError, match="'create'"):
        _policy(f'identity = "{VICTIM}"\npaths = ["a/*"]\ncreate = "yes"')


# --- access -----------------------------------------------------------------

def test_access_default_write_flush() -> None:
    policy = _policy(f'identity = "{VICTIM}"\npaths = ["victim/**"]')
    assert policy.allowed_access(VICTIM, "victim/f") == ACCESS_WRITE | ACCESS_FLUSH
    assert policy.allowed_access(VICTIM, "other/f") == 0
    assert policy.allowed_access("nobody", "victim/f") == 0


def test_check_grant_subsets() -> None:
    policy = _policy(f'identity = "{VICTIM}"\npaths = ["victim/**"]\naccess = ["write", "read", "flush"]')
    for access in (ACCESS_WRITE, ACCESS_READ, ACCESS_FLUSH, ACCESS_WRITE | ACCESS_FLUSH,
                   ACCESS_WRITE | ACCESS_READ | ACCESS_FLUSH):
        assert policy.check_grant(VICTIM, "victim/f", access).access == ACCESS_WRITE | ACCESS_READ | ACCESS_FLUSH


def test_check_grant_superset_bad_flow() -> None:
    policy = _policy(f'identity = "{VICTIM}"\npaths = ["victim/**"]\naccess = ["write", "flush"]')
    with pytest.raises(PermissionDenied) as info:
        policy.check_grant(VICTIM, "victim/f", ACCESS_WRITE | ACCESS_READ)
    message = info.value.message
    assert "WRITE|READ" in message        # what was asked for
    assert "WRITE|FLUSH" in message       # what is allowed
    assert "'read'" in message            # what the operator would add
    assert "'ATOMIC'" not in message


def test_check_grant_path_denied_bad_flow() -> None:
    policy = _policy(f'identity = "{VICTIM}"\npaths = ["victim/**"]')
    with pytest.raises(PermissionDenied, match="may not use path"):
        policy.check_grant(VICTIM, "victim", ACCESS_WRITE)


def test_load_access_names_case_insensitive() -> None:
    policy = _policy(f'identity = "{VICTIM}"\npaths = ["a/*"]\naccess = ["READ"]')
    assert policy.rule_for(VICTIM).access == ACCESS_READ


def test_load_atomic_without_write_bad_flow() -> None:
    with pytest.raises(PolicyError) as info:
        _policy(f'identity = "{VICTIM}"\npaths = ["a/*"]\naccess = ["read", "atomic"]')
    message = info.value.message
    assert "rxe checks ATOMIC_WRITE against remote-write permission" in message
    assert "atomic requires write" in message
    assert "/etc/rdax/policy.toml" in message


def test_load_atomic_with_write() -> None:
    policy = _policy(f'identity = "{VICTIM}"\npaths = ["a/*"]\naccess = ["atomic", "write"]')
    assert policy.rule_for(VICTIM).access == ACCESS_ATOMIC | ACCESS_WRITE


def test_load_unknown_access_bad_flow() -> None:
    with pytest.raises(PolicyError, match="unknown access 'execute'"):
        _policy(f'identity = "{VICTIM}"\npaths = ["a/*"]\naccess = ["write", "execute"]')
    with pytest.raises(PolicyError, match="'access'"):
        _policy(f'identity = "{VICTIM}"\npaths = ["a/*"]\naccess = "write"')


def test_load_empty_access_grants_nothing() -> None:
    policy = _policy(f'identity = "{VICTIM}"\npaths = ["a/*"]\naccess = []')
    assert policy.may_see(VICTIM, "a/f")
    with pytest.raises(PermissionDenied):
        policy.check_grant(VICTIM, "a/f", ACCESS_READ)


# --- unknown keys -----------------------------------------------------------

def test_load_unknown_key_in_allow_bad_flow() -> None:
    text = (f'[[allow]]\nidentity = "a"\npaths = ["x/*"]\n\n'
            f'[[allow]]\nidentity = "{VICTIM}"\npaths = ["a/*"]\nacess = ["read"]\n')
    with pytest.raises(PolicyError) as info:
        Policy.parse(text, "/etc/rdax/policy.toml")
    message = info.value.message
    assert "'acess'" in message
    assert "did you mean 'access'" in message
    assert "/etc/rdax/policy.toml" in message
    assert "entry 2 (line 5)" in message


def test_load_unknown_key_in_defaults_bad_flow() -> None:
    with pytest.raises(PolicyError, match=r"\[defaults\]: unknown key 'max_session'"):
        Policy.parse("[defaults]\nmax_session = 3\n")


def test_load_unknown_key_top_level_bad_flow() -> None:
    with pytest.raises(PolicyError, match="top level: unknown key 'alow'"):
        Policy.parse('[[alow]]\nidentity = "a"\npaths = ["x/*"]\n')


def test_load_allow_not_array_of_tables_bad_flow() -> None:
    with pytest.raises(PolicyError, match=r"\[\[allow\]\]"):
        Policy.parse('[allow]\nidentity = "a"\npaths = ["x/*"]\n')


def test_load_identity_missing_bad_flow() -> None:
    with pytest.raises(PolicyError, match="'identity'"):
        _policy('paths = ["x/*"]')
    with pytest.raises(PolicyError, match="white space"):
        _policy(f'identity = " {VICTIM}"\npaths = ["x/*"]')


# --- quotas -----------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("64 GiB", 64 << 30),
    ("512MiB", 512 << 20),
    ("1 TiB", 1 << 40),
    ("4 KiB", 4096),
    ("1048576", 1 << 20),
    (123, 123),
])
def test_parse_size_forms(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["64 GB", "64 gib", "GiB", "1.5 GiB", "-1 GiB", "", True, 1.0])
def test_parse_size_bad_flow(text: object) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_load_size_string_in_rule() -> None:
    policy = _policy(f'identity = "{VICTIM}"\npaths = ["a/*"]\nmax_sealed_bytes = "512MiB"')
    assert policy.rule_for(VICTIM).quotas.max_sealed_bytes == 512 << 20


def test_load_bad_size_bad_flow() -> None:
    with pytest.raises(PolicyError, match="KiB, MiB, GiB, TiB"):
        Policy.parse('[defaults]\nmax_sealed_bytes = "10 GB"\n', "p.toml")


def test_load_defaults_builtin() -> None:
    policy = _policy(f'identity = "{VICTIM}"\npaths = ["a/*"]')
    assert policy.rule_for(VICTIM).quotas == Quotas(16, 1024, 64 << 30, 64)
    assert DEFAULT_QUOTAS == Quotas(16, 1024, 64 << 30, 64)


def test_load_defaults_applied_and_overridden() -> None:
    policy = _policy(
        'identity = "a"\npaths = ["a/*"]',
        'identity = "b"\npaths = ["b/*"]\nmax_grants = 7\nmax_sealed_bytes = 4096',
        defaults='[defaults]\nmax_sessions = 2\nmax_grants = 100\n',
    )
    assert policy.rule_for("a").quotas == Quotas(2, 100, 64 << 30, 64)
    assert policy.rule_for("b").quotas == Quotas(2, 7, 4096, 64)


@pytest.mark.parametrize("value", ["0", "-1", "true", '"4"', "1.5"])
def test_load_bad_quota_bad_flow(value: str) -> None:
    with pytest.raises(PolicyError, match="max_sessions"):
        _policy(f'identity = "{VICTIM}"\npaths = ["a/*"]\nmax_sessions = {value}')


def test_load_zero_sealed_bytes_bad_flow() -> None:
    with pytest.raises(PolicyError, match="positive"):
        Policy.parse('[defaults]\nmax_sealed_bytes = "0 GiB"\n')


# --- files and TOML ---------------------------------------------------------

def test_load_from_file(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(EXAMPLE, encoding="utf-8")
    policy = Policy.load(path)
    assert policy.source == os.fspath(path)
    assert policy.check_grant(VICTIM, "shared/x.log", ACCESS_READ).identity == VICTIM
    with pytest.raises(PermissionDenied) as info:
        policy.check_seal("anonymous", "shared/x.log", create=False)
    assert os.fspath(path) in info.value.message


def test_load_bad_toml_bad_flow(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text('[[allow]]\nidentity = "a\npaths = ["x/*"]\n', encoding="utf-8")
    with pytest.raises(PolicyError) as info:
        Policy.load(path)
    assert os.fspath(path) in info.value.message
    assert "not valid TOML" in info.value.message
    assert "line 2" in info.value.message


def test_load_missing_file_bad_flow(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(PolicyError) as info:
        Policy.load(path)
    assert os.fspath(path) in info.value.message
    assert "cannot be read" in info.value.message


def test_load_not_utf8_bad_flow(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[[allow]]\nidentity = "caf\xe9"\npaths = ["x/*"]\n')
    with pytest.raises(PolicyError, match="UTF-8") as info:
        Policy.load(path)
    assert os.fspath(path) in info.value.message


# --- messages ---------------------------------------------------------------

def test_quote_truncates_long_strings() -> None:
    assert quote("short") == "'short'"
    long = "a" * 4096
    quoted = quote(long)
    assert quoted.startswith("'" + "a" * 200 + "'…")
    assert "(4096 characters)" in quoted
    assert len(quoted) < 250


def test_check_seal_long_path_truncated_bad_flow() -> None:
    policy = _policy(f'identity = "{VICTIM}"\npaths = ["victim/**"]')
    path = "other/" + "p" * 4090
    with pytest.raises(PermissionDenied) as info:
        policy.check_seal(VICTIM, path, create=False)
    message = info.value.message
    assert "p" * 300 not in message
    assert "(4096 characters)" in message
    assert len(message) < 1000


def test_check_grant_long_identity_truncated_bad_flow() -> None:
    policy = _policy(f'identity = "{VICTIM}"\npaths = ["victim/**"]')
    identity = "spiffe://rdax.test/" + "i" * 5000
    with pytest.raises(PermissionDenied) as info:
        policy.check_grant(identity, "victim/f", ACCESS_WRITE)
    assert "i" * 300 not in info.value.message
    assert f"({len(identity)} characters)" in info.value.message


def test_check_seal_control_characters_escaped_bad_flow() -> None:
    policy = _policy(f'identity = "{VICTIM}"\npaths = ["victim/**"]')
    with pytest.raises(PermissionDenied) as info:
        policy.check_seal(VICTIM, "other/a\nFAKE LOG LINE", create=False)
    assert "\n" not in info.value.message
