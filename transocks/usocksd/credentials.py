"""The user/password file (RFC 1929 authentication): salted hashes, never plain text.

One ``user:hash`` per line; blank lines and lines starting with # are ignored.
Two hash formats, both from hashlib so nothing else is needed:

  $scrypt$ln=14,r=8,p=1$<salt>$<hash>        (the default: memory-hard)
  $pbkdf2-sha256$<iterations>$<salt>$<hash>

salt and hash are base64 without padding.  ``usocksd --hash-password``
prints one.  Why a cache: transocks opens one SOCKS connection per redirected
connection, so every connection authenticates; a deliberately slow hash on
each would cap a worker at a few dozen connections a second.  A verified
login is remembered as a keyed digest of (user, stored hash, password) in
memory the master maps before it forks, so every worker of every generation
shares it: a HUP keeps the logins of users whose hash did not change, and a
changed or removed user is never found in it.  Concurrent checks of one login
wait for one hash (single flight).

Both schemes feed the password to HMAC-SHA256 as its key, and HMAC pads a
short key with zero bytes: ``pw`` and ``pw + NUL`` derive the same hash.  So
a password ending in a NUL byte never matches (and cannot be hashed).

An unknown user is checked against a dummy hash with the parameters of a real
user, chosen by a keyed digest of the name: a name costs what a user of that
scheme costs, the same on every connection and in every worker.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import mmap
import os
from collections.abc import Callable
from typing import Any

from gevent.event import AsyncResult

from ..core.names import ascii_number

SCRYPT_LN = 14
SCRYPT_R = 8
SCRYPT_P = 1
MAX_SCRYPT_MEMORY = 256 << 20
PBKDF2_ITERATIONS = 600_000
SALT_BYTES = 16
HASH_BYTES = 32
CACHE_SLOTS = 8192  # verified logins remembered (32 bytes each, shared by the workers)

Offload = Callable[..., Any]


class CredentialsError(Exception):
    """The credentials file or a hash in it is unusable; the message says where."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise CredentialsError(f"bad base64 {text!r}") from None


def _as_bytes(password: str | bytes) -> bytes:
    return password.encode() if isinstance(password, str) else password


def _padding_twin(pw: bytes) -> bool:
    """True for a password HMAC cannot tell from the same without its trailing NUL bytes."""
    return pw.endswith(b"\0")


def hash_password(password: str | bytes, scheme: str = "scrypt") -> str:
    """A fresh salted hash of password in one of the two formats."""
    salt = os.urandom(SALT_BYTES)
    pw = _as_bytes(password)
    if _padding_twin(pw):
        raise ValueError("a password must not end with a NUL byte")
    if scheme == "scrypt":
        digest = _scrypt(pw, salt, SCRYPT_LN, SCRYPT_R, SCRYPT_P)
        return f"$scrypt$ln={SCRYPT_LN},r={SCRYPT_R},p={SCRYPT_P}${_b64(salt)}${_b64(digest)}"
    if scheme == "pbkdf2-sha256":
        digest = hashlib.pbkdf2_hmac("sha256", pw, salt, PBKDF2_ITERATIONS, HASH_BYTES)
        return f"$pbkdf2-sha256${PBKDF2_ITERATIONS}${_b64(salt)}${_b64(digest)}"
    raise ValueError(f"unknown hash scheme {scheme!r} (scrypt or pbkdf2-sha256)")


def _scrypt(password: bytes, salt: bytes, ln: int, r: int, p: int, dklen: int = HASH_BYTES) -> bytes:
    n = 1 << ln
    return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, dklen=dklen, maxmem=130 * r * (n + p + 2) * 2)


def parse_hash(encoded: str) -> tuple[str, dict[str, int], bytes, bytes]:
    """Split and check a hash: (scheme, parameters, salt, digest)."""
    parts = encoded.split("$")
    if len(parts) != 5 or parts[0] != "":
        raise CredentialsError("hash must look like $scrypt$ln=14,r=8,p=1$SALT$HASH or $pbkdf2-sha256$ROUNDS$SALT$HASH")
    _, scheme, params_text, salt_text, digest_text = parts
    salt, digest = _unb64(salt_text), _unb64(digest_text)
    if len(salt) < 8 or len(digest) < 16:
        raise CredentialsError("salt or hash too short")
    if scheme == "scrypt":
        pairs = [item.split("=", 1) for item in params_text.split(",")]
        if not all(len(pair) == 2 and ascii_number(pair[1]) for pair in pairs):
            raise CredentialsError(f"bad scrypt parameters {params_text!r}")
        params = {k: int(v) for k, v in pairs}
        if set(params) != {"ln", "r", "p"}:
            raise CredentialsError(f"scrypt parameters must be ln, r, p: {params_text!r}")
        if not (1 <= params["ln"] <= 24 and 1 <= params["r"] <= 64 and 1 <= params["p"] <= 16) or \
                128 * params["r"] << params["ln"] > MAX_SCRYPT_MEMORY:
            raise CredentialsError(f"scrypt parameters out of range (at most {MAX_SCRYPT_MEMORY >> 20} MiB): {params_text!r}")
        return scheme, params, salt, digest
    if scheme == "pbkdf2-sha256":
        if not ascii_number(params_text) or not 1000 <= int(params_text) <= 10_000_000:
            raise CredentialsError(f"pbkdf2 iterations must be 1000-10000000: {params_text!r}")
        return scheme, {"iterations": int(params_text)}, salt, digest
    raise CredentialsError(f"unknown hash scheme {scheme!r} (scrypt or pbkdf2-sha256)")


def verify_password(password: str | bytes, encoded: str) -> bool:
    """True when password is exactly the hashed one (constant-time comparison).

    The hash is derived in every case, also for a password that cannot
    match, so the answer costs the same.
    """
    scheme, params, salt, digest = parse_hash(encoded)
    pw = _as_bytes(password)
    if scheme == "scrypt":
        computed = _scrypt(pw, salt, params["ln"], params["r"], params["p"], len(digest))
    else:
        computed = hashlib.pbkdf2_hmac("sha256", pw, salt, params["iterations"], len(digest))
    return hmac.compare_digest(computed, digest) and not _padding_twin(pw)


def dummy_like(encoded: str) -> str:
    """A hash with encoded's scheme, parameters and sizes that no password matches."""
    _scheme, _params, salt, digest = parse_hash(encoded)
    scheme_text, params_text = encoded.split("$")[1:3]
    return f"${scheme_text}${params_text}${_b64(os.urandom(len(salt)))}${_b64(os.urandom(len(digest)))}"


def _direct(func: Callable[..., Any], *args: Any) -> Any:
    return func(*args)


class VerifiedLogins:
    """Keyed digests of verified logins in a shared anonymous mapping, one 32-byte slot each.

    Mapped when this module is imported, i.e. in the master before any fork,
    so every worker (of this and later generations) reads and writes the same
    table, without locks: a slot torn by two workers writing at once holds no
    valid digest and is only a miss.  Direct-mapped: a new login may evict an
    old one, which then costs one hash again.
    """

    DIGEST = 32

    def __init__(self, slots: int = CACHE_SLOTS) -> None:
        self.slots = slots
        self._key = os.urandom(32)
        self._table = mmap.mmap(-1, slots * self.DIGEST, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)

    def key(self, user: bytes, encoded: str, password: bytes) -> bytes:
        """Lengths first, so no two (user, hash, password) triples make the same message."""
        hashed = encoded.encode()
        message = b"".join((len(user).to_bytes(2, "big"), user, len(hashed).to_bytes(2, "big"), hashed, password))
        return hmac.new(self._key, message, hashlib.sha256).digest()

    def _offset(self, key: bytes) -> int:
        return int.from_bytes(key[:8], "big") % self.slots * self.DIGEST

    def __contains__(self, key: bytes) -> bool:
        at = self._offset(key)
        return hmac.compare_digest(self._table[at:at + self.DIGEST], key)

    def add(self, key: bytes) -> None:
        at = self._offset(key)
        self._table[at:at + self.DIGEST] = key

    def clear(self) -> None:
        self._table[:] = bytes(len(self._table))


VERIFIED = VerifiedLogins()
_NAME_KEY = os.urandom(32)  # which dummy an unknown name gets: the same in every worker


class Credentials:
    """Users and hashes from one file, checked against the shared cache of verified logins."""

    def __init__(self, users: dict[str, str], path: str = "", verified: VerifiedLogins = VERIFIED) -> None:
        self.users = users
        self.path = path
        self.verified = verified
        # One dummy per cost class (scheme, parameters, sizes), listed once per user of that class,
        # so an unknown name draws a cost as often as the users have it.
        dummies: dict[tuple[str, int, int], str] = {}
        self._dummies: list[str] = []
        for encoded in users.values():
            head, salt_text, digest_text = encoded.rsplit("$", 2)
            cost = (head, len(salt_text), len(digest_text))
            if cost not in dummies:
                dummies[cost] = dummy_like(encoded)
            self._dummies.append(dummies[cost])
        self._pending: dict[bytes, AsyncResult] = {}

    @classmethod
    def load(cls, path: str) -> Credentials:
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except OSError as exc:
            raise CredentialsError(f"cannot read credentials file {path}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise CredentialsError(f"{path}: not UTF-8 text") from None
        users: dict[str, str] = {}
        for number, line in enumerate(lines, 1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            user, sep, encoded = text.partition(":")
            where = f"{path}:{number}"
            if not sep or not user:
                raise CredentialsError(f"{where}: expected user:hash")
            if not 0 < len(user.encode()) <= 255:
                raise CredentialsError(f"{where}: user name longer than 255 bytes")
            if user in users:
                raise CredentialsError(f"{where}: user {user!r} listed twice")
            try:
                parse_hash(encoded.strip())
            except CredentialsError as exc:
                raise CredentialsError(f"{where}: user {user!r}: {exc}") from None
            users[user] = encoded.strip()
        return cls(users, path)

    def _stored(self, user: bytes) -> tuple[str | None, str]:
        """(the user's hash or None, the hash to check against: the user's or a dummy)."""
        try:
            encoded = self.users.get(user.decode("utf-8"))
        except UnicodeDecodeError:
            encoded = None
        if encoded is not None:
            return encoded, encoded
        if not self._dummies:
            return None, ""
        pick = int.from_bytes(hmac.new(_NAME_KEY, user, hashlib.sha256).digest()[:8], "big")
        return None, self._dummies[pick % len(self._dummies)]

    def check(self, user: str | bytes, password: str | bytes, offload: Offload = _direct) -> bool:
        """Verify a user's password; `offload(func, *args)` runs the hashing (e.g. in a thread pool).

        A check of a (user, password) already being hashed waits for that
        hash.  When the hashing connection's offload raises instead (it was
        refused or cut short), a waiter hashes for itself.
        """
        user_b, pw = _as_bytes(user), _as_bytes(password)
        encoded, target = self._stored(user_b)
        if not target:
            return False
        key = self.verified.key(user_b, target, pw)
        if key in self.verified:
            return True
        while (pending := self._pending.get(key)) is not None:
            answer = pending.get()
            if answer is not None:
                return bool(answer)
        pending = self._pending[key] = AsyncResult()
        answer = None
        try:
            answer = bool(offload(verify_password, pw, target)) and encoded is not None
            if answer:
                self.verified.add(key)
            return answer
        finally:
            del self._pending[key]
            pending.set(answer)
