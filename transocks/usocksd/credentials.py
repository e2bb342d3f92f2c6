"""The user/password file (RFC 1929 authentication): salted hashes, never plain text.

One ``user:hash`` per line; blank lines and lines starting with # are ignored.
Two hash formats, both from hashlib so nothing else is needed:

  $scrypt$ln=14,r=8,p=1$<salt>$<hash>        (the default: memory-hard)
  $pbkdf2-sha256$<iterations>$<salt>$<hash>

salt and hash are base64 without padding.  ``usocksd --hash-password``
prints one.  Why a cache: transocks opens one SOCKS connection per redirected
connection, so every connection authenticates; a deliberately slow hash on
each would cap a worker at a few dozen connections a second.  A verified pair
is remembered (as a keyed digest, per worker, emptied by a reload), and
hashing runs off the event loop.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

SCRYPT_LN = 14
SCRYPT_R = 8
SCRYPT_P = 1
MAX_SCRYPT_MEMORY = 256 << 20
PBKDF2_ITERATIONS = 600_000
SALT_BYTES = 16
HASH_BYTES = 32
CACHE_SIZE = 4096

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


def hash_password(password: str | bytes, scheme: str = "scrypt") -> str:
    """A fresh salted hash of password in one of the two formats."""
    salt = os.urandom(SALT_BYTES)
    pw = _as_bytes(password)
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
        try:
            params = {k: int(v) for k, v in (item.split("=", 1) for item in params_text.split(","))}
        except ValueError:
            raise CredentialsError(f"bad scrypt parameters {params_text!r}") from None
        if set(params) != {"ln", "r", "p"}:
            raise CredentialsError(f"scrypt parameters must be ln, r, p: {params_text!r}")
        if not (1 <= params["ln"] <= 24 and 1 <= params["r"] <= 64 and 1 <= params["p"] <= 16) or \
                128 * params["r"] << params["ln"] > MAX_SCRYPT_MEMORY:
            raise CredentialsError(f"scrypt parameters out of range (at most {MAX_SCRYPT_MEMORY >> 20} MiB): {params_text!r}")
        return scheme, params, salt, digest
    if scheme == "pbkdf2-sha256":
        if not params_text.isdigit() or not 1000 <= int(params_text) <= 10_000_000:
            raise CredentialsError(f"pbkdf2 iterations must be 1000-10000000: {params_text!r}")
        return scheme, {"iterations": int(params_text)}, salt, digest
    raise CredentialsError(f"unknown hash scheme {scheme!r} (scrypt or pbkdf2-sha256)")


def verify_password(password: str | bytes, encoded: str) -> bool:
    """True when password matches the hash (constant-time comparison)."""
    scheme, params, salt, digest = parse_hash(encoded)
    pw = _as_bytes(password)
    if scheme == "scrypt":
        computed = _scrypt(pw, salt, params["ln"], params["r"], params["p"], len(digest))
    else:
        computed = hashlib.pbkdf2_hmac("sha256", pw, salt, params["iterations"], len(digest))
    return hmac.compare_digest(computed, digest)


def _direct(func: Callable[..., Any], *args: Any) -> Any:
    return func(*args)


class Credentials:
    """Users and hashes from one file, checked with a cache of verified pairs."""

    def __init__(self, users: dict[str, str], path: str = "") -> None:
        self.users = users
        self.path = path
        # An unknown user costs the same hashing as a wrong password: no user enumeration by timing.
        self._dummy = next(iter(users.values()), None)
        self._key = os.urandom(32)
        self._verified: OrderedDict[bytes, None] = OrderedDict()

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

    def _cache_key(self, user: bytes, password: bytes) -> bytes:
        return hmac.new(self._key, len(user).to_bytes(2, "big") + user + password, hashlib.sha256).digest()

    def check(self, user: str | bytes, password: str | bytes, offload: Offload = _direct) -> bool:
        """Verify a user's password; `offload(func, *args)` runs the hashing (e.g. in a thread pool)."""
        user_b, pw = _as_bytes(user), _as_bytes(password)
        key = self._cache_key(user_b, pw)
        if key in self._verified:
            self._verified.move_to_end(key)
            return True
        try:
            encoded = self.users.get(user_b.decode("utf-8"))
        except UnicodeDecodeError:
            encoded = None
        target = encoded or self._dummy
        ok = target is not None and bool(offload(verify_password, pw, target)) and encoded is not None
        if ok:
            self._verified[key] = None
            if len(self._verified) > CACHE_SIZE:
                self._verified.popitem(last=False)
        return ok
