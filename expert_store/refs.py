"""Refs and version specs: name rules, resolving ``HEAD~2``-style specs, compare-and-swap.

Spec grammar: ``BASE`` followed by any number of ``~N`` or ``^`` (first parent, N times).
``BASE`` is a ref or tag name (looked up first), a version id (``12``) or ``v12``.
"""

from __future__ import annotations

import re

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from .errors import ConflictError, RefError, UnknownVersionError
from .schema import Ref, Reflog, Version, utcnow

__all__ = ["HEAD", "validate_ref_name", "resolve", "move_ref", "create_tag"]

HEAD = "HEAD"

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9._/-]{0,254}")
_VERSION_LITERAL = re.compile(r"v?(\d+)")
_SUFFIX = re.compile(r"(~(\d*)|\^)")


def validate_ref_name(name: str) -> str:
    """Return ``name`` if it can be a ref or tag; :class:`RefError` otherwise."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise RefError(
            f"invalid ref name {name!r}: use letters, digits, '.', '_', '/', '-', "
            "starting with a letter or '_'"
        )
    if _VERSION_LITERAL.fullmatch(name):
        raise RefError(f"invalid ref name {name!r}: it reads as a version id")
    return name


def _split_spec(spec: str) -> tuple[str, int]:
    """``"HEAD~2^"`` -> ``("HEAD", 3)``."""
    cut = min((i for i in (spec.find("~"), spec.find("^")) if i >= 0), default=len(spec))
    base, rest = spec[:cut], spec[cut:]
    back = 0
    pos = 0
    while pos < len(rest):
        match = _SUFFIX.match(rest, pos)
        if match is None:
            raise UnknownVersionError(f"cannot parse version spec {spec!r}")
        back += 1 if match.group(1) == "^" else int(match.group(2) or 1)
        pos = match.end()
    return base, back


def _known_names(session: Session) -> str:
    names = list(session.scalars(select(Ref.name).order_by(Ref.name)))
    return ", ".join(names) if names else "none"


def resolve(session: Session, spec: int | str) -> int:
    """The version id that ``spec`` names; :class:`UnknownVersionError` if none."""
    if isinstance(spec, bool) or not isinstance(spec, (int, str)):
        raise UnknownVersionError(f"a version spec is an int or a str, not {spec!r}")
    if isinstance(spec, int):
        base, back, version_id = str(spec), 0, spec
    else:
        base, back = _split_spec(spec.strip())
        ref = session.get(Ref, base)
        literal = _VERSION_LITERAL.fullmatch(base)
        if ref is not None:
            version_id = ref.version_id
        elif literal is not None:
            version_id = int(literal.group(1))
        else:
            raise UnknownVersionError(
                f"unknown version {spec!r}: no ref or tag named {base!r} "
                f"(known: {_known_names(session)}) and not a version id"
            )
    row = session.get(Version, version_id) if 0 < version_id < 2**63 else None  # ids are 64-bit integers
    if row is None:
        raise UnknownVersionError(f"unknown version {spec!r}: there is no version {version_id}")
    for step in range(back):
        if row.parent_id is None:
            raise UnknownVersionError(
                f"unknown version {spec!r}: version {row.id} ({step} back from {base}) has no parent"
            )
        row = session.get(Version, row.parent_id)
    return row.id


def move_ref(
    session: Session, name: str, new: int, *, expected: int | None, who: str, why: str
) -> None:
    """Compare-and-swap ref ``name`` from ``expected`` to ``new`` and log the move.

    ``expected=None`` means the ref must not exist yet (it is created). Raises
    :class:`ConflictError` when the ref is elsewhere, :class:`RefError` for tags. Runs
    inside the caller's transaction; the caller commits.
    """
    validate_ref_name(name)
    current = session.get(Ref, name)
    if current is not None and current.kind == "tag":
        raise RefError(f"{name!r} is a tag; tags do not move (create a new tag instead)")
    if expected is None:
        if current is not None:
            raise ConflictError(
                f"ref {name!r} already points at version {current.version_id}; expected it not to exist"
            )
        session.add(Ref(name=name, version_id=new, kind="ref"))
        try:
            session.flush()
        except IntegrityError as exc:
            raise ConflictError(f"ref {name!r} was created concurrently") from exc
    else:
        result = session.execute(
            update(Ref)
            .where(Ref.name == name, Ref.version_id == expected)
            .values(version_id=new)
            .execution_options(synchronize_session=False)
        )
        if result.rowcount != 1:
            session.expire_all()
            now = session.get(Ref, name)
            where = f"version {now.version_id}" if now is not None else "nothing (it does not exist)"
            raise ConflictError(
                f"ref {name!r} moved: expected version {expected}, but it points at {where}; "
                "re-read it and retry"
            )
    session.add(Reflog(ref=name, old=expected, new=new, when=utcnow(), who=who, why=why))


def create_tag(session: Session, name: str, version_id: int, *, who: str, why: str) -> None:
    """Create tag ``name`` at ``version_id``; :class:`RefError` if the name is taken."""
    validate_ref_name(name)
    if name == HEAD:
        raise RefError("HEAD cannot be a tag")
    existing = session.get(Ref, name)
    if existing is not None:
        raise RefError(f"{name!r} already exists ({existing.kind} at version {existing.version_id})")
    session.add(Ref(name=name, version_id=version_id, kind="tag"))
    try:
        session.flush()
    except IntegrityError as exc:
        raise RefError(f"{name!r} was created concurrently") from exc
    session.add(Reflog(ref=name, old=None, new=version_id, when=utcnow(), who=who, why=why))
