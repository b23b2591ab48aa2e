"""The compiled-artifact format written by ``refqsr-engine compile`` and read before every run.

An artifact is a directory; ``refqsr-engine compile`` (``engine.compiler.compile_model``) puts in it::

    <artifact>/
        GRAPH.onnx        each exported graph that was compiled: ``sr`` (a plain SR network), or
                          ``clustblock``, ``reference`` and ``query`` (RefQSR)
        GRAPH_bB.so       the graph compiled for batch size B (a Relax VM library, weights built
                          in): B = ``--batch``, and on CPU targets also a quarter of it
        cluster.so        RefQSR only: the ClustBlock clustering kernel (eqs. (2)-(3))
        manifest.json     written last, describes everything above

``manifest.json`` holds ``format`` (``ARTIFACT_FORMAT``), ``created`` (UTC, ISO 8601), the versions
it was built with (``refqsr_engine``, ``tvm``, ``tvm_ffi``), ``files`` (``{name: {"sha256", "bytes"}}``
for every file) and what the compiler adds: ``target``, the model (name, file, SHA-256, config,
card), ``kind``, ``bits``, ``patch``, ``batch``/``batches``, the clustering kernel's buckets, per-graph
reports and the compile options. This module itself takes any set of files and keys.

A compiled library only runs under the TVM it was built with and on the target it was built for,
so ``load_artifact`` checks both and turns every mismatch into a one-line ``RefQSRError`` that
says to recompile. Writing is atomic: the new artifact is staged next to the destination and
renamed into place only once complete, so a reader never sees a half-written one.

Compiled default models are cached under ``cache_dir()``, one entry per ``cache_key(...)``.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import secrets
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from ..errors import RefQSRError

ARTIFACT_FORMAT = "refqsr-engine/artifact-1"
MANIFEST = "manifest.json"
# Keys write_artifact fills itself; a caller's manifest may not override them.
RESERVED_KEYS = ("format", "created", "refqsr_engine", "tvm", "tvm_ffi", "files", "manifest_sha256")
# Target attributes that are run-time choices, not code-generation ones, per target kind.
RUNTIME_TARGET_KEYS = {"llvm": frozenset({"num-cores", "num_cores"})}
RECOMPILE = "recompile with refqsr-engine compile"
#: what to do about a damaged entry of the cache that `upscale` keeps
REPAIR_CACHED = "repair it with refqsr-engine upscale ... --recompile"
_CHUNK = 1 << 20


# ---------------------------------------------------------------------------------------------
# versions


def _dist_version(dist: str, module: str) -> str:
    # Package metadata first: importing tvm / tvm_ffi costs seconds, and checking a manifest
    # should not. Fall back to the module for source builds that have no installed metadata.
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        pass
    try:
        mod = sys.modules.get(module) or __import__(module)
    except ImportError:
        return "none"
    return str(getattr(mod, "__version__", "unknown"))


def tvm_version() -> str:
    """Version of the installed Apache TVM (``tvm.__version__``)."""
    return _dist_version("apache-tvm", "tvm")


def tvm_ffi_version() -> str:
    """Version of the installed apache-tvm-ffi (compiled libraries link against its ABI)."""
    return _dist_version("apache-tvm-ffi", "tvm_ffi")


def package_version() -> str:
    from .. import __version__

    return __version__


# ---------------------------------------------------------------------------------------------
# hashing and names


def manifest_digest(manifest: Mapping[str, Any]) -> str:
    """SHA-256 of a manifest's fields except ``manifest_sha256`` itself (canonical JSON): the
    manifest records it, so an edited field (a tau, a bit width) is detected like an edited file."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def sha256_file(path: str | Path) -> str:
    """SHA-256 hex digest of a file, read in chunks (compiled libraries can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _is_plain_name(name: object) -> bool:
    if not isinstance(name, str) or name in ("", ".", "..") or "\0" in name:
        return False
    return "/" not in name and "\\" not in name and (os.altsep is None or os.altsep not in name)


def _check_file_name(name: object) -> None:
    if not _is_plain_name(name):
        raise ValueError(f"artifact file name must be a plain file name, got {name!r}")
    if name == MANIFEST:
        raise ValueError(f"artifact file name {MANIFEST!r} is reserved for the manifest")


# ---------------------------------------------------------------------------------------------
# writing


def _fsync_dir(path: Path) -> None:
    # Makes the renames durable; not every platform/filesystem lets a directory be opened.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _copy_file(src: Path, dst: Path) -> None:
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        shutil.copyfileobj(fin, fout, _CHUNK)
        fout.flush()
        os.fsync(fout.fileno())


def _replaceable(out_dir: Path, owned: bool = False) -> None:
    """Refuse to replace anything but an earlier artifact or an empty directory: a mistyped
    ``-o`` must not delete a user's folder. ``owned``: the directory is a cache entry, which only
    this program writes, so a damaged one (its manifest broken) may be replaced too."""
    if not out_dir.exists() and not out_dir.is_symlink():
        return
    if not out_dir.is_dir():
        raise RefQSRError(f"cannot write the artifact to {out_dir}: it exists and is not a directory")
    if owned or not any(out_dir.iterdir()):
        return
    try:
        old = json.loads((out_dir / MANIFEST).read_text(encoding="utf-8"))
        fmt = old.get("format", "") if isinstance(old, dict) else ""
    except (OSError, ValueError):
        fmt = ""
    if not (isinstance(fmt, str) and fmt.startswith("refqsr-engine/artifact-")):
        raise RefQSRError(f"refusing to replace {out_dir}: it is a non-empty directory, not a refqsr-engine artifact")


def write_artifact(
    out_dir: str | Path, files: Mapping[str, str | Path | bytes], manifest: Mapping[str, Any], owned: bool = False
) -> Path:
    """Write an artifact directory holding ``files`` (name -> source path or contents) and a
    manifest made of the standard fields plus ``manifest``; returns ``out_dir``.

    Everything is staged in a temp directory beside ``out_dir`` (same filesystem, so the final
    rename is atomic). An existing artifact is replaced only once the new one is complete; on
    any failure it stays as it was and the staging directory is removed. ``owned``: ``out_dir`` is a
    cache entry (see :func:`_replaceable`)."""
    out_dir = Path(out_dir)
    for name in files:
        _check_file_name(name)
    clash = sorted(set(manifest) & set(RESERVED_KEYS))
    if clash:
        raise ValueError(f"manifest keys {clash} are reserved (written by write_artifact)")
    if not out_dir.name or out_dir.name in (".", ".."):
        raise ValueError(f"artifact path must end in a directory name, got {str(out_dir)!r}")
    _replaceable(out_dir, owned)

    parent = out_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the artifact should look normally created
        entries: dict[str, dict[str, Any]] = {}
        for name, src in files.items():
            dst = tmp / name
            if isinstance(src, (bytes, bytearray, memoryview)):
                _write_bytes(dst, bytes(src))
            else:
                _copy_file(Path(src), dst)
            # Hash what was stored, not the source: that is what load_artifact will check.
            entries[name] = {"sha256": sha256_file(dst), "bytes": dst.stat().st_size}
        full: dict[str, Any] = {
            "format": ARTIFACT_FORMAT,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "refqsr_engine": package_version(),
            "tvm": tvm_version(),
            "tvm_ffi": tvm_ffi_version(),
            "files": entries,
            **manifest,
        }
        full["manifest_sha256"] = manifest_digest(full)
        # The manifest goes last: a staging directory with a manifest is a complete artifact.
        _write_bytes(tmp / MANIFEST, (json.dumps(full, indent=2, sort_keys=False) + "\n").encode("utf-8"))
        _fsync_dir(tmp)
        _swap_in(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    _fsync_dir(parent)
    return out_dir


def _swap_in(tmp: Path, out_dir: Path) -> None:
    """Rename ``tmp`` to ``out_dir``; an existing ``out_dir`` is moved aside first and deleted
    only after the new one is in place (or moved back if that fails)."""
    if not out_dir.exists() and not out_dir.is_symlink():
        os.rename(tmp, out_dir)
        return
    old = out_dir.with_name(f".{out_dir.name}.old-{secrets.token_hex(4)}")
    os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        try:
            os.rename(old, out_dir)
        except OSError:
            # Another writer put a complete artifact there meanwhile: ours is not needed.
            shutil.rmtree(old, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# loading


@dataclass(frozen=True)
class Artifact:
    """A loaded (and by default verified) artifact directory."""

    path: Path
    manifest: dict[str, Any] = field(repr=False)

    @property
    def files(self) -> list[str]:
        return sorted(self.manifest["files"])

    def file(self, name: str) -> Path:
        """Path of the artifact file ``name``; a RefQSRError if the artifact has none."""
        if name not in self.manifest["files"]:
            raise RefQSRError(
                f"artifact {self.path} has no {name} (it has: {', '.join(self.files) or 'nothing'}); {RECOMPILE}"
            )
        return self.path / name


def format_target(target: Mapping[str, Any] | None) -> str:
    """A target dict as a short TVM-like string, for messages: ``llvm -mcpu=core-avx2``."""
    if not isinstance(target, Mapping):
        return repr(target)
    parts = [str(target.get("kind", "?"))]
    for key in sorted(k for k in target if k != "kind"):
        value = target[key]
        if isinstance(value, Mapping):
            value = f"({format_target(value)})"
        elif isinstance(value, (list, tuple)):
            value = ",".join(map(str, value))
        parts.append(f"-{key}={value}")
    return " ".join(parts)


def _codegen_view(target: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of a target that change generated code; run-time choices dropped."""
    ignored = RUNTIME_TARGET_KEYS.get(str(target.get("kind")), frozenset())
    return {k: (_codegen_view(v) if isinstance(v, Mapping) else v) for k, v in target.items() if k not in ignored}


def targets_match(built: Mapping[str, Any], requested: Mapping[str, Any]) -> bool:
    """Whether code built for ``built`` runs as intended on ``requested``: same kind, mcpu/arch,
    triple, features...; for llvm the thread count (num-cores) is ignored."""
    return _codegen_view(built) == _codegen_view(requested)


def load_artifact(
    path: str | Path, *, target: Mapping[str, Any] | None = None, verify: bool = True, repair: str = RECOMPILE
) -> Artifact:
    """Read and check the artifact at ``path``: format, the manifest's own digest, TVM / tvm-ffi
    versions, ``target`` (when given), presence and size of every file and, with ``verify``, their
    SHA-256. Every refusal is one line ending in ``repair`` (what to do about it)."""
    path = Path(path)
    if not path.exists():
        raise RefQSRError(f"artifact not found: {path}")
    if not path.is_dir():
        raise RefQSRError(f"{path} is not an artifact directory")
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise RefQSRError(f"{path} is not a refqsr-engine artifact (no {MANIFEST}); {repair}")
    try:
        man = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise RefQSRError(f"{mpath} is unreadable ({type(err).__name__}); {repair}") from None
    if not isinstance(man, dict):
        raise RefQSRError(f"{mpath} is not a manifest (not a JSON object); {repair}")
    fmt = man.get("format")
    if fmt != ARTIFACT_FORMAT:
        raise RefQSRError(f"{path} has artifact format {fmt!r}, this refqsr-engine reads {ARTIFACT_FORMAT!r}; {repair}")

    # A library built by another TVM / tvm-ffi may fail to load or misbehave: refuse it up front.
    for key, label, current in (("tvm", "TVM", tvm_version()), ("tvm_ffi", "tvm-ffi", tvm_ffi_version())):
        built = man.get(key)
        if built != current:
            raise RefQSRError(f"artifact {path} built with {label} {built}, this is {label} {current}; {repair}")

    # after the format and versions (which say more about an artifact of another build), before
    # anything the manifest says is trusted
    if man.get("manifest_sha256") != manifest_digest(man):
        raise RefQSRError(f"{mpath} fails its digest check (edited or damaged); {repair}")
    if target is not None:
        built_target = man.get("target")
        if not isinstance(built_target, Mapping):
            raise RefQSRError(f"artifact {path} records no target, {format_target(target)} was requested; {repair}")
        if not targets_match(built_target, target):
            raise RefQSRError(
                f"artifact {path} was compiled for target '{format_target(built_target)}', "
                f"but target '{format_target(target)}' was requested; {repair}"
            )

    entries = man.get("files")
    if not isinstance(entries, dict) or not all(
        _is_plain_name(n) and n != MANIFEST and isinstance(e, dict) for n, e in entries.items()
    ):
        raise RefQSRError(f"{mpath} has a malformed file list; {repair}")
    for name, entry in entries.items():
        fpath = path / name
        if not fpath.is_file():
            raise RefQSRError(f"artifact {path} is missing {name}; {repair}")
        # The size check is free and catches truncation even with verify=False.
        if fpath.stat().st_size != entry.get("bytes"):
            raise RefQSRError(f"artifact file {fpath} has the wrong size (damaged or modified); {repair}")
        if verify and sha256_file(fpath) != entry.get("sha256"):
            raise RefQSRError(f"artifact file {fpath} fails its SHA-256 check (damaged or modified); {repair}")
    return Artifact(path=path, manifest=man)


# ---------------------------------------------------------------------------------------------
# cache of compiled default models


def cache_dir() -> Path:
    """Root of the cache: ``$REFQSR_ENGINE_CACHE``, else ``$XDG_CACHE_HOME/refqsr-engine``, else
    ``~/.cache/refqsr-engine``. Not created here."""
    env = os.environ.get("REFQSR_ENGINE_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    # The XDG spec says relative values are invalid and must be ignored.
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "refqsr-engine"
    return Path.home() / ".cache" / "refqsr-engine"


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"cache_key part of type {type(obj).__name__} is not JSON-serializable")


def cache_key(**parts: Any) -> str:
    """A short stable key for a cache entry: SHA-256 of the parts as sorted JSON (so the order
    of the keyword arguments does not matter), first 20 hex digits."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=_json_default)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


def cached_artifact_path(key: str) -> Path:
    """Where the cached artifact for ``key`` lives."""
    if not _is_plain_name(key) or key.startswith("."):
        raise ValueError(f"bad cache key {key!r}")
    return cache_dir() / "artifacts" / key


@contextlib.contextmanager
def cache_lock(key: str) -> Iterator[Path]:
    """Hold an exclusive lock on the cache entry ``key`` (``<entry>.lock``) so two processes do
    not compile into it at once; yields the entry path. Blocks until the lock is free."""
    entry = cached_artifact_path(key)
    try:
        import fcntl
    except ImportError:  # no flock on this platform: atomic publishing still keeps entries whole
        yield entry
        return
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        # The lock file is never deleted: unlinking it would let a third process lock a new inode.
        f = open(entry.with_name(entry.name + ".lock"), "a+b")  # noqa: SIM115 - closed below
    except OSError as err:
        if (entry / MANIFEST).is_file():  # a read-only cache that holds the entry: reading needs no lock
            yield entry
            return
        raise RefQSRError(
            f"cannot write to the cache {cache_dir()} ({err.strerror}); set REFQSR_ENGINE_CACHE to a writable folder"
        ) from None
    with f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield entry
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
