"""kd_trainer.data.digest.file_digest: the blake2b (16-byte) hex digest that files record, the same
text for the same bytes however they are read (checked against hashing the whole file at once)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from kd_trainer.data.digest import file_digest


@pytest.mark.parametrize("size", [0, 1, (1 << 20) - 1, 3 * (1 << 20) + 17])
def test_the_digest_is_blake2b_16_of_the_whole_file(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    (tmp_path / "f.bin").write_bytes(data)
    assert file_digest(tmp_path / "f.bin") == hashlib.blake2b(data, digest_size=16).hexdigest()
    assert file_digest(str(tmp_path / "f.bin")) == file_digest(tmp_path / "f.bin")


def test_a_known_digest_and_a_one_byte_change(tmp_path: Path) -> None:
    (tmp_path / "abc").write_bytes(b"abc")
    # BLAKE2b with a 16-byte digest of b"abc" (RFC 7693 parameters: digest length 16, no key)
    assert file_digest(tmp_path / "abc") == "cf4ab791c62b8d2b2109c90275287816"
    (tmp_path / "abd").write_bytes(b"abd")
    assert file_digest(tmp_path / "abd") != file_digest(tmp_path / "abc")


def test_a_missing_file_is_an_os_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nothing.bin"):
        file_digest(tmp_path / "nothing.bin")
