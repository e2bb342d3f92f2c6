"""The credentials file: salted hashes, strict parsing with line numbers, the verified-pair cache."""

from __future__ import annotations

import subprocess
import sys

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


def test_unknown_user_costs_a_hash_like_a_wrong_password(tmp_path):
    creds = Credentials.load(write(tmp_path, f"alice:{hash_password('wonder')}\n"))
    calls = []

    def offload(func, *args):
        calls.append(args[1])
        return func(*args)

    assert not creds.check("mallory", "x", offload)
    assert calls == [creds.users["alice"]]


def test_cache_skips_hashing_for_a_verified_pair_only(tmp_path):
    creds = Credentials.load(write(tmp_path, f"alice:{hash_password('wonder')}\n"))
    calls = []

    def offload(func, *args):
        calls.append(1)
        return func(*args)

    assert creds.check("alice", "wonder", offload)
    assert creds.check("alice", "wonder", offload)
    assert len(calls) == 1
    assert not creds.check("alice", "wonder2", offload)
    assert not creds.check("alice", "wonder2", offload)
    assert len(calls) == 3  # failures are never cached


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
