"""Tests for engine/artifact.py: round trip, verification errors, atomic replacement, cache paths.
No TVM compilation: the "libraries" are small fake files."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from importlib import metadata
from pathlib import Path

import pytest
from refqsr_engine import __version__
from refqsr_engine.engine import artifact as art
from refqsr_engine.engine.artifact import (
    ARTIFACT_FORMAT,
    REPAIR_CACHED,
    cache_dir,
    cache_key,
    cache_lock,
    cached_artifact_path,
    load_artifact,
    manifest_digest,
    sha256_file,
    write_artifact,
)
from refqsr_engine.errors import RefQSRError

TARGET = {"kind": "llvm", "mcpu": "core-avx2", "num-cores": 2}
QUERY = b"\x7fELF fake query library" + bytes(range(256))


def _make(tmp_path: Path, name: str = "art", **extra) -> tuple[Path, dict[str, bytes]]:
    src = tmp_path / "src-reference.so"
    src.write_bytes(b"\x7fELF fake reference library" * 100)
    contents = {"reference.so": src.read_bytes(), "query.so": QUERY, "params.npz": b"PK fake params"}
    files = {"reference.so": src, "query.so": QUERY, "params.npz": str(tmp_path / "params-src.npz")}
    Path(files["params.npz"]).write_bytes(contents["params.npz"])
    out = write_artifact(tmp_path / name, files, {"target": TARGET, "bits": [4, 8], **extra})
    return out, contents


def _edit_manifest(path: Path, resign: bool = True, **changes) -> None:
    """Change manifest fields; ``resign`` also updates its digest (a consistent manifest, to reach
    the checks after the digest's)."""
    man = json.loads((path / "manifest.json").read_text())
    man.update(changes)
    if resign:
        man["manifest_sha256"] = manifest_digest(man)
    (path / "manifest.json").write_text(json.dumps(man))


def test_an_edited_manifest_field_fails_the_digest(tmp_path):
    out, _ = _make(tmp_path)
    load_artifact(out)
    _edit_manifest(out, resign=False, tau=1.9)
    with pytest.raises(RefQSRError, match="digest"):
        load_artifact(out)
    with pytest.raises(RefQSRError, match="upscale ... --recompile"):
        load_artifact(out, repair=REPAIR_CACHED)
    _edit_manifest(out, resign=True)
    load_artifact(out)


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_round_trip(tmp_path):
    out, contents = _make(tmp_path)
    assert out == tmp_path / "art"
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "params.npz", "query.so", "reference.so"]
    a = load_artifact(out, target=TARGET)
    man = a.manifest
    assert man["format"] == ARTIFACT_FORMAT == "refqsr-engine/artifact-1"
    assert man["refqsr_engine"] == __version__
    assert man["tvm"] == metadata.version("apache-tvm")
    assert man["tvm_ffi"] == metadata.version("apache-tvm-ffi")
    assert man["created"].endswith("+00:00")
    assert man["target"] == TARGET and man["bits"] == [4, 8]
    assert set(man["files"]) == set(contents)
    for name, data in contents.items():
        assert man["files"][name] == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        assert a.file(name) == out / name
        assert a.file(name).read_bytes() == data
        assert sha256_file(out / name) == hashlib.sha256(data).hexdigest()
    with pytest.raises(RefQSRError, match="clustblock.so"):
        a.file("clustblock.so")
    # Only the artifact and the test's sources are left: no staging directories.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "params-src.npz", "src-reference.so"]
    # Permissions as if created normally, not mkdtemp's 0700.
    umask = os.umask(0)
    os.umask(umask)
    assert (out.stat().st_mode & 0o777) == (0o777 & ~umask)


def test_sha256_file_streams_large_file(tmp_path):
    data = os.urandom(3 * (1 << 20) + 17)  # more than one read chunk
    (tmp_path / "big").write_bytes(data)
    assert sha256_file(tmp_path / "big") == hashlib.sha256(data).hexdigest()


def test_tampered_byte_names_file(tmp_path):
    out, _ = _make(tmp_path)
    raw = bytearray((out / "query.so").read_bytes())
    raw[10] ^= 0x01  # same size, one bit different
    (out / "query.so").write_bytes(bytes(raw))
    with pytest.raises(RefQSRError) as err:
        load_artifact(out)
    msg = _one_line(err)
    assert "query.so" in msg and "SHA-256" in msg
    load_artifact(out, verify=False)  # only the size is checked without verify


def test_truncated_file_caught_without_verify(tmp_path):
    out, _ = _make(tmp_path)
    (out / "params.npz").write_bytes(b"PK")
    with pytest.raises(RefQSRError, match="params.npz"):
        load_artifact(out, verify=False)


def test_deleted_file(tmp_path):
    out, _ = _make(tmp_path)
    (out / "reference.so").unlink()
    with pytest.raises(RefQSRError) as err:
        load_artifact(out)
    assert "missing reference.so" in _one_line(err)


def test_missing_directory_and_manifest(tmp_path):
    with pytest.raises(RefQSRError, match="not found"):
        load_artifact(tmp_path / "nope")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(RefQSRError, match="not an artifact directory"):
        load_artifact(tmp_path / "afile")
    out, _ = _make(tmp_path)
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(RefQSRError, match="unreadable"):
        load_artifact(out)
    (out / "manifest.json").unlink()
    with pytest.raises(RefQSRError, match="no manifest.json"):
        load_artifact(out)


def test_wrong_format_and_malformed_file_list(tmp_path):
    out, _ = _make(tmp_path)
    _edit_manifest(out, format="refqsr-engine/artifact-0")
    with pytest.raises(RefQSRError, match="artifact-0"):
        load_artifact(out)
    _edit_manifest(out, format=ARTIFACT_FORMAT, files={"../escape.so": {"sha256": "0", "bytes": 1}})
    with pytest.raises(RefQSRError, match="malformed"):
        load_artifact(out)


@pytest.mark.parametrize(
    "key,label,current",
    [
        ("tvm", "TVM", lambda: metadata.version("apache-tvm")),
        ("tvm_ffi", "tvm-ffi", lambda: metadata.version("apache-tvm-ffi")),
    ],
)
def test_other_tvm_version(tmp_path, key, label, current):
    out, _ = _make(tmp_path)
    _edit_manifest(out, **{key: "0.19.0"})
    with pytest.raises(RefQSRError) as err:
        load_artifact(out)
    msg = _one_line(err)
    assert f"built with {label} 0.19.0" in msg
    assert f"this is {label} {current()}" in msg
    assert "recompile with refqsr-engine compile" in msg


@pytest.mark.parametrize(
    "requested",
    [
        {"kind": "cuda", "arch": "sm_90"},
        {"kind": "llvm", "mcpu": "skylake-avx512", "num-cores": 2},
        {"kind": "llvm", "num-cores": 2},
    ],
)
def test_target_mismatch(tmp_path, requested):
    out, _ = _make(tmp_path)
    with pytest.raises(RefQSRError) as err:
        load_artifact(out, target=requested)
    msg = _one_line(err)
    assert "llvm -mcpu=core-avx2" in msg and art.format_target(requested) in msg


def test_target_num_cores_ignored_for_llvm(tmp_path):
    out, _ = _make(tmp_path)
    load_artifact(out, target={"kind": "llvm", "mcpu": "core-avx2", "num-cores": 16})
    load_artifact(out, target={"kind": "llvm", "mcpu": "core-avx2"})
    assert art.targets_match({"kind": "cuda", "arch": "sm_80"}, {"kind": "cuda", "arch": "sm_80"})
    assert not art.targets_match({"kind": "cuda", "arch": "sm_80"}, {"kind": "cuda", "arch": "sm_90"})


def test_target_requested_but_not_recorded(tmp_path):
    out = write_artifact(tmp_path / "a", {"x.so": b"x"}, {})
    load_artifact(out)
    with pytest.raises(RefQSRError, match="no target"):
        load_artifact(out, target=TARGET)


def _no_staging_left(parent: Path) -> None:
    leftovers = [p.name for p in parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_replace_existing_artifact(tmp_path):
    out, _ = _make(tmp_path)
    write_artifact(out, {"clustblock.so": b"new"}, {"target": TARGET})
    a = load_artifact(out)
    assert a.files == ["clustblock.so"]
    assert not (out / "query.so").exists()
    _no_staging_left(tmp_path)


def test_failed_write_keeps_old_artifact(tmp_path):
    out, _ = _make(tmp_path)
    before = (out / "manifest.json").read_bytes()
    with pytest.raises(FileNotFoundError):
        write_artifact(out, {"a.so": b"new", "b.so": tmp_path / "does-not-exist.so"}, {"target": TARGET})
    assert (out / "manifest.json").read_bytes() == before
    load_artifact(out, target=TARGET)
    _no_staging_left(tmp_path)


def test_failed_swap_restores_old_artifact(tmp_path, monkeypatch):
    out, _ = _make(tmp_path)
    before = (out / "manifest.json").read_bytes()
    real_rename = os.rename

    def rename(src, dst):
        if ".tmp-" in str(src):  # the step that moves the new artifact in
            raise OSError("simulated failure")
        return real_rename(src, dst)

    monkeypatch.setattr(art.os, "rename", rename)
    with pytest.raises(OSError, match="simulated"):
        write_artifact(out, {"a.so": b"new"}, {})
    assert (out / "manifest.json").read_bytes() == before
    _no_staging_left(tmp_path)


def test_unserializable_manifest_leaves_nothing(tmp_path):
    with pytest.raises(TypeError):
        write_artifact(tmp_path / "a", {"x.so": b"x"}, {"bad": object()})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["sub/x.so", "../x.so", "/abs.so", "a\\b.so", "", ".", "..", "manifest.json"])
def test_bad_file_names(tmp_path, name):
    with pytest.raises(ValueError):
        write_artifact(tmp_path / "a", {name: b"x"}, {})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("key", ["format", "files", "tvm"])
def test_reserved_manifest_keys(tmp_path, key):
    with pytest.raises(ValueError, match="reserved"):
        write_artifact(tmp_path / "a", {"x.so": b"x"}, {key: "mine"})


def test_refuses_to_replace_other_things(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "holiday.png").write_bytes(b"png")
    with pytest.raises(RefQSRError, match="not a refqsr-engine artifact"):
        write_artifact(folder, {"x.so": b"x"}, {})
    assert (folder / "holiday.png").read_bytes() == b"png"
    (tmp_path / "file").write_text("x")
    with pytest.raises(RefQSRError, match="not a directory"):
        write_artifact(tmp_path / "file", {"x.so": b"x"}, {})
    empty = tmp_path / "empty"
    empty.mkdir()
    load_artifact(write_artifact(empty, {"x.so": b"x"}, {}))


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("REFQSR_ENGINE_CACHE", str(tmp_path / "c"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("REFQSR_ENGINE_CACHE")
    assert cache_dir() == tmp_path / "xdg" / "refqsr-engine"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "refqsr-engine"


def test_cache_key_stable_and_order_independent(monkeypatch, tmp_path):
    a = cache_key(model="ab" * 32, target=TARGET, bits=[4, 8], patch=96, batch=4, tvm="0.27.0")
    b = cache_key(
        tvm="0.27.0", batch=4, patch=96, bits=[4, 8], target=dict(reversed(list(TARGET.items()))), model="ab" * 32
    )
    assert a == b
    assert len(a) == 20 and int(a, 16) >= 0
    # Pinned value: the key must not change between runs or releases of this code.
    assert cache_key(model="m", patch=96) == hashlib.sha256(b'{"model":"m","patch":96}').hexdigest()[:20]
    assert cache_key(model="m", patch=96) != cache_key(model="m", patch=72)
    monkeypatch.setenv("REFQSR_ENGINE_CACHE", str(tmp_path))
    assert cached_artifact_path(a) == tmp_path / "artifacts" / a
    with pytest.raises(ValueError):
        cached_artifact_path("../x")


def test_cache_lock_excludes_second_holder(monkeypatch, tmp_path):
    monkeypatch.setenv("REFQSR_ENGINE_CACHE", str(tmp_path))
    key = cache_key(model="m")
    order: list[str] = []

    def second():
        with cache_lock(key):  # a separate open file description: flock blocks across them too
            order.append("second")

    with cache_lock(key) as entry:
        assert entry == cached_artifact_path(key)
        t = threading.Thread(target=second)
        t.start()
        time.sleep(0.2)
        order.append("first")
    t.join(5)
    assert order == ["first", "second"]
    assert (tmp_path / "artifacts" / f"{key}.lock").exists()


def test_tvm_thread_pool_defaults_to_the_usable_cpus(monkeypatch):
    """TVM alone sizes its pool by physical cores (one thread on a 2-vCPU VM); the runtime asks
    for every CPU the process may use unless the user set TVM_NUM_THREADS."""
    import os

    from refqsr_engine.engine.runtime import use_all_cpus_by_default

    monkeypatch.delenv("TVM_NUM_THREADS", raising=False)
    use_all_cpus_by_default()
    assert os.environ["TVM_NUM_THREADS"] == str(len(os.sched_getaffinity(0)))
    monkeypatch.setenv("TVM_NUM_THREADS", "1")
    use_all_cpus_by_default()
    assert os.environ["TVM_NUM_THREADS"] == "1"


def test_artifact_cache_key_follows_the_compiler_sources(monkeypatch):
    """An edited kernel or compiler pass must not reuse an artifact built by the old code."""
    from pathlib import Path

    from refqsr_engine.engine.compiler.options import CompileOptions, artifact_cache_parts, compiler_digest

    before = compiler_digest()
    assert len(before) == 64 and compiler_digest() == before
    assert artifact_cache_parts(CompileOptions())["compiler"] == before
    real = Path.read_bytes

    def edited(self: Path) -> bytes:
        data = real(self)
        return data + b"# edited\n" if self.name == "qconv_fused.py" else data

    monkeypatch.setattr(Path, "read_bytes", edited)
    assert compiler_digest() != before
