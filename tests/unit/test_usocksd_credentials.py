"""The credentials file: salted hashes, strict parsing with line numbers, the verified-pair cache."""

from __future__ import annotations

import os
import subprocess
import sys

import gevent
import pytest

from transocks.usocksd import credentials as cr
from transocks.usocksd.credentials import (
    Credentials,
    CredentialsError,
    hash_password,
    parse_hash,
    verify_password,
)


@pytest.fixture(autouse=True)
def cheap_scrypt(monkeypatch):
    """Unit tests need the format, not the cost."""
    monkeypatch.setattr(cr, "SCRYPT_LN", 4)
    monkeypatch.setattr(cr, "PBKDF2_ITERATIONS", 1000)


@pytest.mark.parametrize("scheme", ["scrypt", "pbkdf2-sha256"])
def test_hash_and_verify(scheme):
    encoded = hash_password("s3cret", scheme)
    assert encoded.startswith(f"${scheme}$")
    assert "s3cret" not in encoded and "=" not in encoded.split("$")[-1]
    assert verify_password("s3cret", encoded)
    assert verify_password(b"s3cret", encoded)
    assert not verify_password("s3cret ", encoded)
    assert not verify_password("", encoded)
    assert hash_password("s3cret", scheme) != encoded  # fresh salt each time


def test_known_vectors_stay_valid():
    # Computed with hashlib directly (salt "saltsaltsalt"): a change of encoding
    # or parameters would lock every existing user out.
    assert verify_password("pw", "$scrypt$ln=4,r=8,p=1$c2FsdHNhbHRzYWx0$"
                                 "1+T6gK8VQ/IrKHyPij8e9cV8MI8oQmDAPviwxG0/aWk")
    assert verify_password("pw", "$pbkdf2-sha256$1000$c2FsdHNhbHRzYWx0$"
                                 "4uzIwmR5CBzbkuSnP3BSItaBwmu0UF1J/6zIhqZ6Auw")


@pytest.mark.parametrize("bad", [
    "plaintext", "$md5$x$y$z", "$scrypt$ln=14,r=8$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA",
    "$scrypt$ln=30,r=8,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA", "$scrypt$ln=14,r=8,p=1$!!$aGFzaA",
    "$pbkdf2-sha256$10$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA", "$pbkdf2-sha256$1000$c2Fs$aGFzaGhhc2hoYXNoaGFzaA",
    # digits int() reads but a hash file never holds: other scripts, signs, underscores, spaces
    "$pbkdf2-sha256$\u00b2000$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA",
    "$pbkdf2-sha256$\u0661\u0660\u0660\u0660$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA",
    "$scrypt$ln=\u0661\u0664,r=8,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA",
    "$scrypt$ln=1_4,r=8,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA",
    "$scrypt$ln= 14,r=8,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA", "$scrypt$ln=+14,r=8,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA",
    "$scrypt$ln=14,r=8,p$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA",
])
def test_bad_hashes_are_refused(bad):
    with pytest.raises(CredentialsError):
        parse_hash(bad)


def write(tmp_path, text):
    path = tmp_path / "users"
    path.write_text(text)
    return str(path)


def test_file_loads_and_checks(tmp_path):
    path = write(tmp_path, f"# users\n\nalice:{hash_password('wonder')}\n  bob:{hash_password('builder', 'pbkdf2-sha256')}\n")
    creds = Credentials.load(path)
    assert set(creds.users) == {"alice", "bob"}
    assert creds.check("alice", "wonder")
    assert creds.check(b"bob", b"builder")
    assert not creds.check("alice", "builder")
    assert not creds.check("mallory", "wonder")
    assert not creds.check(b"\xff\xfe", b"x")


def cost_class(encoded: str) -> tuple:
    head, salt, digest = encoded.rsplit("$", 2)
    return head, len(salt), len(digest)


def test_unknown_user_costs_what_a_user_of_a_scheme_in_use_costs(tmp_path):
    """Not the first user's hash: a dummy per scheme, drawn per name, stable for a name."""
    creds = Credentials.load(write(tmp_path, f"alice:{hash_password('wonder')}\n"
                                             f"bob:{hash_password('builder', 'pbkdf2-sha256')}\n"))
    classes = {cost_class(h) for h in creds.users.values()}
    seen = {}
    for n in range(64):
        calls: list[str] = []

        def offload(func, *args, calls=calls):
            calls.append(args[1])
            return func(*args)

        name = f"nobody{n}"
        assert not creds.check(name, "wonder", offload)
        assert not creds.check(name, "builder", offload)
        assert len(calls) == 2 and calls[0] == calls[1]  # one name, one dummy
        assert calls[0] not in creds.users.values()
        seen[name] = cost_class(calls[0])
    assert set(seen.values()) == classes  # both costs occur among unknown names


def test_password_is_compared_exactly(tmp_path):
    """HMAC pads a short key with zeros: goodpass and goodpass\\0 derive the same hash."""
    for scheme in ("scrypt", "pbkdf2-sha256"):
        encoded = hash_password("goodpass", scheme)
        assert verify_password("goodpass", encoded)
        for twin in (b"goodpass\0", b"goodpass\0\0\0", b"goodpass" + bytes(56), b"goodpas", b"goodpass "):
            assert not verify_password(twin, encoded), (scheme, twin)
        inner = hash_password(b"good\0pass", scheme)  # a NUL inside is an ordinary byte
        assert verify_password(b"good\0pass", inner) and not verify_password(b"good\0pass\0", inner)
    with pytest.raises(ValueError, match="NUL"):
        hash_password(b"goodpass\0")
    creds = Credentials.load(write(tmp_path, f"alice:{hash_password('goodpass')}\n"))
    assert creds.check(b"alice", b"goodpass")
    assert not creds.check(b"alice", b"goodpass\0")  # also once the real one is cached


def counting(calls):
    def offload(func, *args):
        calls.append(1)
        return func(*args)
    return offload


def test_cache_skips_hashing_for_a_verified_pair_only(tmp_path):
    creds = Credentials.load(write(tmp_path, f"alice:{hash_password('wonder')}\n"))
    calls = []
    offload = counting(calls)
    assert creds.check("alice", "wonder", offload)
    assert creds.check("alice", "wonder", offload)
    assert len(calls) == 1
    assert not creds.check("alice", "wonder2", offload)
    assert not creds.check("alice", "wonder2", offload)
    assert len(calls) == 3  # failures are never cached


def test_cache_survives_a_reload_for_unchanged_users_only(tmp_path):
    """A HUP loads a new Credentials; the verified logins are keyed by each user's stored hash."""
    alice, bob = hash_password("wonder"), hash_password("builder")
    path = write(tmp_path, f"alice:{alice}\nbob:{bob}\n")
    first = Credentials.load(path)
    assert first.check("alice", "wonder") and first.check("bob", "builder")
    write(tmp_path, f"alice:{alice}\nbob:{hash_password('builder')}\n")  # bob got a new hash (same password)
    second = Credentials.load(path)
    calls = []
    assert second.check("alice", "wonder", counting(calls)) and calls == []
    assert second.check("bob", "builder", counting(calls)) and calls == [1]
    write(tmp_path, f"bob:{bob}\n")
    third = Credentials.load(path)
    assert not third.check("alice", "wonder", counting(calls))  # removed users are not found in the cache


def test_cache_is_shared_with_processes_forked_later(tmp_path):
    """Workers are forked by the master: one worker's verified login spares the others (and the next
    generation) a hash."""
    creds = Credentials.load(write(tmp_path, f"alice:{hash_password('wonder')}\n"))
    pid = os.fork()
    if pid == 0:
        os._exit(0 if creds.check("alice", "wonder") else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    calls = []
    assert creds.check("alice", "wonder", counting(calls)) and calls == []


def test_direct_mapped_cache_evicts_without_false_hits():
    cache = cr.VerifiedLogins(slots=4)
    keys = [cache.key(b"u%d" % n, "$h", b"pw") for n in range(64)]
    for k in keys:
        cache.add(k)
    assert sum(k in cache for k in keys) <= 4
    assert cache.key(b"u", "$h", b"pw") != cache.key(b"u", "$hp", b"w")  # lengths are part of the message
    assert cache.key(b"u", "$h", b"pw") not in cache


@pytest.mark.parametrize("good", [True, False])
def test_concurrent_checks_of_one_login_hash_once(tmp_path, good):
    creds = Credentials.load(write(tmp_path, f"alice:{hash_password('wonder')}\n"))
    calls = []

    def slow(func, *args):
        calls.append(1)
        gevent.sleep(0.05)
        return func(*args)

    password = "wonder" if good else "wrong"
    jobs = [gevent.spawn(creds.check, "alice", password, slow) for _ in range(20)]
    gevent.joinall(jobs, timeout=10, raise_error=True)
    assert [j.value for j in jobs] == [good] * 20
    assert len(calls) == 1


def test_a_waiter_hashes_itself_when_the_first_check_is_cut_short(tmp_path):
    creds = Credentials.load(write(tmp_path, f"alice:{hash_password('wonder')}\n"))
    calls = []

    def refused(func, *args):
        calls.append("refused")
        gevent.sleep(0.05)
        raise RuntimeError("cut short")

    def normal(func, *args):
        calls.append("hashed")
        return func(*args)

    first = gevent.spawn(creds.check, "alice", "wonder", refused)
    gevent.sleep(0)
    second = gevent.spawn(creds.check, "alice", "wonder", normal)
    gevent.joinall([first, second], timeout=10)
    assert isinstance(first.exception, RuntimeError)
    assert second.value is True
    assert calls == ["refused", "hashed"]


@pytest.mark.parametrize("text, message", [
    ("alice\n", "users:1: expected user:hash"),
    (":$scrypt$x\n", "users:1: expected user:hash"),
    ("# ok\nalice:plain\n", "users:2: user 'alice'"),
    ("alice:{h}\nalice:{h}\n", "users:2: user 'alice' listed twice"),
])
def test_file_errors_name_the_line(tmp_path, text, message):
    path = write(tmp_path, text.replace("{h}", hash_password("x")))
    with pytest.raises(CredentialsError, match=message):
        Credentials.load(path)


def test_missing_file(tmp_path):
    with pytest.raises(CredentialsError, match="cannot read credentials file"):
        Credentials.load(str(tmp_path / "nope"))


def test_hash_password_command_reads_stdin():
    out = subprocess.run([sys.executable, "-m", "transocks.usocksd", "--hash-password", "alice", "--scheme", "pbkdf2-sha256"],
                         input="wonder\n", capture_output=True, text=True, timeout=60, check=True).stdout.strip()
    user, encoded = out.split(":", 1)
    assert user == "alice"
    assert verify_password("wonder", encoded)
    bad = subprocess.run([sys.executable, "-m", "transocks.usocksd", "--hash-password", "a:b"],
                         input="x\n", capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode == 2


def test_hash_password_is_listed_in_help_and_must_come_first():
    """A command flag after settings is refused, not silently ignored by a starting daemon."""
    run = [sys.executable, "-m", "transocks.usocksd"]
    helped = subprocess.run([*run, "--help"], capture_output=True, text=True, timeout=30)
    assert "--hash-password" in helped.stdout.split("commands")[1]
    for argv in (["--workers", "2", "--hash-password", "alice"], ["--hash", "alice"], ["--workers", "2", "--hash-password=a"]):
        late = subprocess.run([*run, *argv], capture_output=True, text=True, input="pw\n", timeout=30)
        assert late.returncode == 2, argv
        assert "must be the first argument" in late.stderr, argv
    joined = subprocess.run([*run, "--hash-password=alice", "--scheme", "pbkdf2-sha256"], capture_output=True,
                            text=True, input="pw\n", timeout=30)
    assert joined.stdout.startswith("alice:$pbkdf2-sha256$"), joined.stderr
