"""Local accounts of the web review: names, roles and argon2 password hashes (never the password).

`chromobatch users add|passwd|list` and the login page use these functions. A password change invalidates
the user's open sessions (the session carries a fingerprint of the hash, `session_key`).
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from datetime import datetime

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from chromobatch.errors import UserError
from chromobatch.store.db import Database, User, utcnow
from chromobatch.store.states import UserRole

log = logging.getLogger(__name__)

MIN_PASSWORD = 10
MAX_PASSWORD = 1024
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
_hasher = PasswordHasher()
#: Verified against when the user does not exist, so a wrong name costs as long as a wrong password.
_DUMMY_HASH = _hasher.hash("not a password of anyone")


@dataclass(frozen=True)
class UserInfo:
    id: int
    name: str
    role: str
    active: bool
    created_at: datetime | None
    #: Changes when the password does: a session made before a password change is no longer valid.
    session_key: str

    @property
    def can_edit(self) -> bool:
        return self.role in (UserRole.REVIEWER, UserRole.ADMIN)

    @property
    def is_admin(self) -> bool:
        return self.role == UserRole.ADMIN


def _info(u: User) -> UserInfo:
    key = hashlib.sha256(u.password_hash.encode()).hexdigest()[:16]
    return UserInfo(u.id, u.name, u.role, bool(u.active), u.created_at, key)


def check_name(name: str) -> str:
    name = (name or "").strip()
    if not _NAME.match(name):
        raise UserError(f"user name {name!r} is not allowed: 1-64 letters, digits, '.', '_', '@' or '-', "
                        "starting with a letter or digit")
    return name


def check_role(role: str) -> str:
    try:
        return UserRole(role.strip().lower()).value
    except ValueError:
        raise UserError(f"unknown role {role!r}: use viewer, reviewer or admin") from None


def check_password(password: str) -> str:
    if len(password) < MIN_PASSWORD:
        raise UserError(f"the password must have at least {MIN_PASSWORD} characters")
    if len(password) > MAX_PASSWORD:
        raise UserError(f"the password must have at most {MAX_PASSWORD} characters")
    return password


def add_user(database: Database, name: str, role: str, password: str) -> UserInfo:
    name, role = check_name(name), check_role(role)
    hashed = _hasher.hash(check_password(password))
    try:
        with database.session() as s:
            if s.execute(select(User.id).where(User.name == name)).first() is not None:
                raise UserError(f"user {name} already exists", hint="Change the password with `chromobatch users "
                                                                    "passwd NAME`.")
            user = User(name=name, role=role, password_hash=hashed, created_at=utcnow())
            s.add(user)
            s.flush()
            info = _info(user)
    except IntegrityError:
        raise UserError(f"user {name} already exists") from None
    log.info("user %s added with role %s", name, role)
    return info


def set_password(database: Database, name: str, password: str) -> UserInfo:
    hashed = _hasher.hash(check_password(password))
    with database.session() as s:
        user = s.execute(select(User).where(User.name == name)).scalar_one_or_none()
        if user is None:
            raise UserError(f"no user named {name!r}")
        user.password_hash = hashed
        user.password_changed_at = utcnow()
        info = _info(user)
    log.info("password of user %s changed", name)
    return info


def set_role(database: Database, name: str, role: str) -> UserInfo:
    role = check_role(role)
    with database.session() as s:
        user = s.execute(select(User).where(User.name == name)).scalar_one_or_none()
        if user is None:
            raise UserError(f"no user named {name!r}")
        user.role = role
        return _info(user)


def set_active(database: Database, name: str, active: bool) -> UserInfo:
    """Disable an account (it can no longer sign in, its open sessions end) or enable it again; accounts are
    never deleted, their names stay in the audit trail."""
    with database.session() as s:
        user = s.execute(select(User).where(User.name == name)).scalar_one_or_none()
        if user is None:
            raise UserError(f"no user named {name!r}")
        user.active = active
        info = _info(user)
    log.info("user %s %s", name, "enabled" if active else "disabled")
    return info


def list_users(database: Database) -> list[UserInfo]:
    with database.session() as s:
        return [_info(u) for u in s.execute(select(User).order_by(User.name)).scalars()]


def get_user(database: Database, user_id: int) -> UserInfo | None:
    with database.session() as s:
        user = s.get(User, user_id)
        return _info(user) if user is not None and user.active else None


def authenticate(database: Database, name: str, password: str) -> UserInfo | None:
    """The user when name and password match an active account, else None (same cost either way)."""
    with database.session() as s:
        user = s.execute(select(User).where(User.name == (name or "").strip())).scalar_one_or_none()
        stored = user.password_hash if user is not None else _DUMMY_HASH
        try:
            _hasher.verify(stored, password[:MAX_PASSWORD])
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return None
        if user is None or not user.active:
            return None
        if _hasher.check_needs_rehash(user.password_hash):
            user.password_hash = _hasher.hash(password)
        return _info(user)
