"""The one validator of package names and versions, and of the paths the registry builds from them.

Every entry point (the CLI, `Registry`'s methods, a manifest) goes through `check_name` /
`check_version` before a path is built, and `inside` resolves a path and refuses it unless it lies
under the folder it must stay in.
"""

from __future__ import annotations

import re
from pathlib import Path

from imoe_ray.packaging import PackageError

NAME_PATTERN = r"^[a-z0-9](?:[a-z0-9_-]{0,62}[a-z0-9])?$"
# semver.org 2.0.0, the official regular expression
SEMVER_PATTERN = (r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)"
                  r"(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$")
# Built-in roles and the names of the store's own files and folders: a package may not take them.
RESERVED = frozenset({"base", "summarizer", "dense", "index", "experts", "registry", "router", "manifests", "kb",
                      "fusion", "baselines", "config", "runs", "jobs", "active", "tmp", "lock", "trust"})
_NAME = re.compile(NAME_PATTERN)
_SEMVER = re.compile(SEMVER_PATTERN)


def short(text: object, limit: int = 60) -> str:
    """A name as error messages quote it: repr of at most `limit` characters."""
    text = str(text)
    return repr(text[:limit] + "…") if len(text) > limit else repr(text)


def check_name(name: object) -> str:
    """`name` if it is a package name (a lowercase slug, 1-64 characters, not reserved), else PackageError."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise PackageError(f"{short(name)} is not a package name: lowercase letters, digits, '-' and '_', "
                           "1 to 64 characters, starting and ending with a letter or digit")
    if name in RESERVED:
        raise PackageError(f"{name!r} is reserved (a built-in role or a file of the store); choose another name")
    return name


def check_version(version: object) -> str:
    if not isinstance(version, str) or len(version) > 64 or not _SEMVER.match(version):
        raise PackageError(f"{short(version)} is not a semantic version (MAJOR.MINOR.PATCH, e.g. 1.2.0)")
    return version


def semver_key(version: str) -> tuple:
    """Sort key of a semantic version by semver.org's precedence (build metadata ignored)."""
    core, _, pre = version.split("+")[0].partition("-")
    nums = tuple(int(x) for x in core.split("."))
    if not pre:
        return nums + (1,)
    ids = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in pre.split("."))
    return nums + (0, ids)


def inside(root: Path, *parts: str) -> Path:
    """root/parts resolved, refused unless it lies strictly inside `root` (resolved too)."""
    base = root.resolve()
    path = base.joinpath(*parts).resolve()
    if path == base or base not in path.parents:
        raise PackageError(f"{short('/'.join(parts))} is not inside {base}")
    return path
