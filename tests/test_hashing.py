"""core.hashing: the one whole-file sha256, remembered per file state."""

from __future__ import annotations

import hashlib
import os

from merge_lab.core.hashing import file_sha256, forget_file_digests


def test_digest_is_the_sha256_of_the_whole_file(tmp_path):
    f = tmp_path / "w.bin"
    data = os.urandom(3 << 20) + b"tail"
    f.write_bytes(data)
    assert file_sha256(f) == hashlib.sha256(data).hexdigest()
    assert file_sha256(str(f)) == file_sha256(tmp_path / "." / "w.bin")  # one key per resolved path


def test_a_rewritten_file_is_hashed_again_and_an_untouched_one_is_not(tmp_path, monkeypatch):
    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 100)
    first = file_sha256(f)
    st = f.stat()
    f.write_bytes(b"b" * 100)  # same size; the mtime moves on
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert file_sha256(f) == hashlib.sha256(b"b" * 100).hexdigest() != first
    opened = []
    real_open = open

    def counting_open(*a, **k):
        opened.append(a[0])
        return real_open(*a, **k)

    monkeypatch.setattr("builtins.open", counting_open)
    file_sha256(f)
    assert opened == []  # remembered: the file is not read again
    forget_file_digests()
    file_sha256(f)
    assert opened == [str(f.resolve())]
