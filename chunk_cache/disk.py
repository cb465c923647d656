"""The disk tier: one safetensors file per KV entry, shared safely between processes.

Layout of a cache folder:

    manifest.json            format and version (one folder holds entries of any number of models)
    journal.jsonl            usage log (put / hit / del records) behind the eviction policy, stats and
                             the list of a chunk's variants (put records carry the entry's key fields)
    entries/ab/<digest>.safetensors
    .lock                    file lock serialising journal appends, eviction and manifest changes

Entry files are the truth; the journal only remembers keys, sizes, recompute costs and hit counts.
A writer publishes a file by temp file + fsync + rename, so a reader sees a whole entry or none.
Every file carries its key (model fingerprint, dtype, context, chunk hash), the key's digest, an
xxh3-64 of its metadata and tensor bytes (checked on every load: ~20x cheaper than sha256) and a
sha256 (checked by `ragkit cache stats --verify`); a file that fails a check is deleted and
reported as a miss, never used. Since the digest names the model, a lookup for one model never
returns another's entry, and entries of several models and dtypes live side by side.
The journal is appended to without fsync: a record lost in a crash costs a statistic, and
opening the folder reconciles the journal with the files that actually exist.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import xxhash
from filelock import FileLock
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from chunk_cache.eviction import EntryStats, EvictionPolicy, choose_victims, tick
from ragkit.errors import IndexMismatchError, InputError
from ragkit.storage import _alive, atomic_write_bytes, atomic_write_json

FORMAT = "ragkit-kv-cache"
VERSION = 2  # 2: entries of several models per folder, key fields in the journal, xxh3 checks
MANIFEST = "manifest.json"
JOURNAL = "journal.jsonl"
ENTRIES = "entries"
LOCK = ".lock"
SUFFIX = ".safetensors"
HIT_BATCH = 64  # queued hit records that trigger a journal write
DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")
_TMP_RE = re.compile(r"^\.[0-9a-f]{64}\.safetensors\.tmp-(\d+)-[0-9a-f]+$")
_FOLDER_TMP_RE = re.compile(r"^\.(?:manifest\.json|journal\.jsonl)\.tmp-(\d+)-[0-9a-f]+$")  # manifest, compaction
# Anything a damaged file can make the reader or checksum raise.
_UNREADABLE = (SafetensorError, OSError, ValueError, KeyError, TypeError, RuntimeError)

log = logging.getLogger("ragkit.chunk_cache")


class CorruptEntry(Exception):
    """An entry file that fails a check; `kind` names the check (format, checksum, model, key, unreadable)."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


CHECKSUMS = {"xxh3": xxhash.xxh3_64, "sha256": hashlib.sha256}  # fast one checked on load, strong one on --verify


def checksum(tensors: dict[str, torch.Tensor], meta: dict[str, str], kind: str = "sha256") -> str:
    """Hash of the metadata (except the checksums) and every tensor's name, dtype, shape and bytes."""
    digest = CHECKSUMS[kind](json.dumps({k: v for k, v in meta.items() if k not in CHECKSUMS},
                                        sort_keys=True).encode())
    for name in sorted(tensors):
        tensor = tensors[name]
        digest.update(f"\0{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def encode_entry(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> bytes:
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    meta = {**meta, "format": FORMAT, "version": str(VERSION)}
    meta.update({kind: checksum(tensors, meta, kind) for kind in CHECKSUMS})
    return safetensors_bytes(tensors, metadata=meta)


def read_entry(path: Path, verify: str = "xxh3") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Memory-map an entry and check its `verify` checksum. Raises FileNotFoundError or CorruptEntry."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            meta = fh.metadata() or {}
            tensors = {name: fh.get_tensor(name) for name in fh.keys()}
        if meta.get("format") != FORMAT or meta.get("version") != str(VERSION):
            raise CorruptEntry("format", f"{meta.get('format')!r} version {meta.get('version')!r}")
        if meta.get(verify) != checksum(tensors, meta, verify):
            raise CorruptEntry("checksum", f"the stored {verify} does not match the contents")
        if "keys" not in tensors or "values" not in tensors or not meta.get("start", "").isdigit():
            raise CorruptEntry("format", "no keys, values or start")
    except FileNotFoundError:
        raise
    except _UNREADABLE as exc:
        raise CorruptEntry("unreadable", f"{type(exc).__name__}: {exc}") from None
    return tensors, meta


class DiskTier:
    """Entry files under `root`, kept within `budget` bytes; several processes may share it."""

    def __init__(self, root: Path, budget: int, policy: EvictionPolicy):
        self.root = Path(root)
        self.budget = budget
        self.policy = policy
        self.usage: dict[str, EntryStats] = {}
        self.keys: dict[str, EntryKey] = {}  # digest -> the key fields its put record named
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0
        self.dropped: dict[str, int] = {}
        self._journal_id: tuple[int, int] | None = None
        self._offset = 0  # bytes of the journal already applied to `usage`
        self._records = 0  # records in the journal, for compaction
        self._pending: list[dict] = []  # hit records not yet in the journal
        self._early_hits: dict[str, list[float]] = {}  # hit times of entries whose put record is not seen yet
        _refuse_foreign_folder(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(str(self.root / LOCK))
        with self._lock:
            self._open_manifest()
            self._sync()
            self._reconcile()
        weakref.finalize(self, _append_records, self._lock, self.root / JOURNAL, self._pending)

    # -- paths and the manifest ---------------------------------------------------------------
    def path(self, digest: str) -> Path:
        if not DIGEST_RE.match(digest):
            raise ValueError(f"not a key digest: {digest!r}")
        return self.root / ENTRIES / digest[:2] / f"{digest}{SUFFIX}"

    def _open_manifest(self) -> None:
        if read_manifest(self.root) is None:
            atomic_write_json(self.root / MANIFEST, {"format": FORMAT, "version": VERSION})

    def variants(self, model: str, dtype: str, chunk_hash: str) -> list[tuple[str, EntryKey]]:
        """(digest, key fields) of every entry of this chunk for this model and dtype, any context."""
        wanted = (model, dtype)
        return [(d, k) for d, k in self.keys.items() if k.chunk == chunk_hash and (k.model, k.dtype) == wanted]

    # -- the journal --------------------------------------------------------------------------
    def _sync(self) -> None:
        """Apply journal records other processes appended since our last look (file lock held)."""
        journal = self.root / JOURNAL
        try:
            stat = journal.stat()
        except FileNotFoundError:
            stat = None
        identity = (stat.st_dev, stat.st_ino) if stat else None
        if identity != self._journal_id or (stat and stat.st_size < self._offset):
            self.usage.clear()
            self.keys.clear()
            self._early_hits.clear()
            self.bytes, self._offset, self._records, self._journal_id = 0, 0, 0, identity
        if stat is None or stat.st_size == self._offset:
            return
        with open(journal, "rb") as fh:
            fh.seek(self._offset)
            data = fh.read()
        complete = data.rfind(b"\n") + 1  # a dead writer may have left a torn last line
        for line in data[:complete].splitlines():
            with contextlib.suppress(ValueError, TypeError, KeyError, AttributeError):
                self._apply(json.loads(line))
            self._records += 1
        self._offset += complete

    def _apply(self, record: dict) -> None:
        digest, op = record["d"], record["op"]
        if not DIGEST_RE.match(digest):
            return
        if op == "put":
            old = self.usage.get(digest)
            stats = EntryStats(nbytes=int(record["n"]), created=float(record["t"]),
                               last_used=float(record.get("u", record["t"])), cost_s=float(record.get("c", 0.0)),
                               hits=int(record.get("h", 0)), frequency=float(record.get("f", 1.0)))
            if old is not None and "h" not in record:  # the same content put again keeps its history
                stats.created, stats.hits, stats.frequency = old.created, old.hits, old.frequency
            for t in self._early_hits.pop(digest, ()):
                stats.record_hit(t)
            self.bytes += stats.nbytes - (old.nbytes if old else 0)
            self.usage[digest] = stats
            if "k" in record:
                self.keys[digest] = EntryKey(str(record["m"]), str(record["y"]), str(record["p"]), str(record["k"]))
        elif op == "hit":
            if digest in self.usage:
                self.usage[digest].record_hit(float(record["t"]))
            else:  # a reader can load a file before its writer's put record lands
                self._early_hits.setdefault(digest, []).append(float(record["t"]))
        elif op == "del" and digest in self.usage:
            self.bytes -= self.usage.pop(digest).nbytes
            self.keys.pop(digest, None)

    def _append(self, records: list[dict]) -> None:
        """Append and apply queued hits and `records` (file lock held, journal synced)."""
        records = self._pending + records
        self._pending.clear()
        if not records:
            return
        journal = self.root / JOURNAL
        payload = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records).encode()
        for record in records:
            self._apply(record)
        try:
            with open(journal, "ab") as fh:
                if fh.tell() > self._offset:  # a torn line of a dead writer: end it so ours parse
                    payload = b"\n" + payload
                    self._records += 1
                fh.write(payload)
                fh.flush()
                stat = os.fstat(fh.fileno())
        except OSError as exc:  # e.g. a full disk: statistics are lost, entries are not
            log.warning("could not append to the KV cache journal %s: %s", journal, exc)
            return
        self._journal_id, self._offset = (stat.st_dev, stat.st_ino), stat.st_size
        self._records += len(records)
        if self._records > 1000 + 4 * len(self.usage):
            self._compact()

    def _compact(self) -> None:
        """Rewrite the journal as one put record per entry; other processes see a new file and reload."""
        records = [{"op": "put", "d": d, "n": s.nbytes, "t": s.created, "u": s.last_used, "c": s.cost_s,
                    "h": s.hits, "f": s.frequency, **self._key_fields(d)} for d, s in self.usage.items()]
        payload = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records).encode()
        atomic_write_bytes(self.root / JOURNAL, payload)
        self._early_hits.clear()
        stat = (self.root / JOURNAL).stat()
        self._journal_id, self._offset, self._records = (stat.st_dev, stat.st_ino), stat.st_size, len(records)

    def _reconcile(self) -> None:
        """Make the journal list exactly the entry files present; remove temp files of dead writers."""
        present: dict[str, os.stat_result] = {}
        for path in entry_files(self.root):
            match = _TMP_RE.match(path.name)
            if match:
                if not _alive(int(match.group(1))):
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
            elif path.name.endswith(SUFFIX) and DIGEST_RE.match(path.name[:-len(SUFFIX)]):
                with contextlib.suppress(FileNotFoundError):
                    present[path.name[:-len(SUFFIX)]] = path.stat()
        for path in self.root.glob(".*.tmp-*"):  # a manifest write or journal compaction killed halfway
            match = _FOLDER_TMP_RE.match(path.name)
            if match and not _alive(int(match.group(1))):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        records = [{"op": "del", "d": d} for d in self.usage if d not in present]
        for digest, st in present.items():
            if digest not in self.usage or self.usage[digest].nbytes != st.st_size or digest not in self.keys:
                key = _header_key(self.path(digest))  # a file its writer's put record never reached
                if key is not None:
                    records.append({"op": "put", "d": digest, "n": st.st_size, "t": st.st_mtime, **key.record()})
        self._append(records)

    def _key_fields(self, digest: str) -> dict:
        key = self.keys.get(digest)
        return key.record() if key else {}

    # -- entries -------------------------------------------------------------------------------
    def write(self, digest: str, tensors: dict[str, torch.Tensor], meta: dict[str, str], cost_s: float,
              make_room: bool = True) -> bool:
        """Publish an entry file, then evict others if over budget; without `make_room`, write only an
        entry that is missing and fits as is. Returns whether the entry is on disk."""
        if not make_room:
            if digest not in self.usage:  # our view may be stale; a demotion is worth a look
                self.refresh()
            if digest in self.usage:
                return True
        data = encode_entry(tensors, {**meta, "key": digest})
        if len(data) > (self.budget if make_room else self.budget - self.bytes):
            return False
        try:
            atomic_write_bytes(self.path(digest), data)
        except OSError as exc:  # a full disk, or the folder cleared under us: the entry stays in memory
            log.warning("could not write KV cache entry %s: %s", self.path(digest), exc)
            return False
        now = tick()
        key = EntryKey(meta["model"], meta["dtype"], meta["prefix_hash"], meta["chunk_hash"])
        with self._lock:
            self._sync()
            self._append([{"op": "put", "d": digest, "n": len(data), "t": now, "c": cost_s, **key.record()}])
            victims = choose_victims(self.usage, self.bytes - self.budget, self.policy, now, keep=[digest])
            for victim in victims:
                with contextlib.suppress(FileNotFoundError):
                    self.path(victim).unlink()
            self.evictions += len(victims)
            self._append([{"op": "del", "d": v} for v in victims])
        return True

    def load(self, digest: str, model: str, verify: str = "xxh3") -> tuple[dict[str, torch.Tensor],
                                                                             dict[str, str]] | None:
        """A verified entry of `model`, or None (missing, or damaged / foreign and now deleted)."""
        entry = self._verified(digest, model, verify)
        if entry is None:
            self.misses += 1
        else:
            self.hits += 1
        return entry

    def contains(self, digest: str, model: str) -> bool:
        """Whether `load` would succeed: reads and verifies the entry, drops a bad one."""
        return self._verified(digest, model, "xxh3") is not None

    def _verified(self, digest: str, model: str | None, verify: str) -> tuple[dict[str, torch.Tensor],
                                                                            dict[str, str]] | None:
        """The entry if it passes every check (`model` None: any model's), else None."""
        try:
            tensors, meta = read_entry(self.path(digest), verify)
            if model is not None and meta.get("model") != model:
                raise CorruptEntry("model", f"written for model {meta.get('model')!r}, not {model!r}")
            if meta.get("key") != digest:
                raise CorruptEntry("key", f"holds key {meta.get('key')!r}")
        except FileNotFoundError:
            return None
        except CorruptEntry as exc:
            self.drop(digest, exc)
            return None
        return tensors, meta

    def drop(self, digest: str, reason: CorruptEntry) -> None:
        log.warning("dropping KV cache entry %s (%s); it will be recomputed", self.path(digest), reason)
        self.dropped[reason.kind] = self.dropped.get(reason.kind, 0) + 1
        with contextlib.suppress(FileNotFoundError):
            self.path(digest).unlink()
        with self._lock:
            self._sync()
            if digest in self.usage:
                self._append([{"op": "del", "d": digest}])

    def record_hits(self, digests: list[str], now: float) -> None:
        """Queue hit records; they reach the journal with the next write, refresh, batch or exit.
        (Taking the file lock costs ~1 ms, too much for every memory hit.)"""
        self._pending.extend({"op": "hit", "d": d, "t": now} for d in digests)
        if len(self._pending) >= HIT_BATCH:
            self.refresh()

    def refresh(self) -> None:
        """Catch up with other processes' records and publish queued hits."""
        with self._lock:
            self._sync()
            self._append([])

    def verify_all(self) -> int:
        """Check every entry's sha256 (any model's), dropping bad ones; returns how many passed."""
        return sum(self._verified(digest, None, "sha256") is not None for digest in list(self.usage))

    def clear(self) -> int:
        """Delete every entry and the journal, keep the manifest; returns the entries removed."""
        with self._lock:
            removed = clear_files(self.root)
            self._pending.clear()
            self._sync()
            self._open_manifest()
        return removed

    def summary(self) -> dict:
        return {"entries": len(self.usage), "bytes": self.bytes, "budget": self.budget, "hits": self.hits,
                "misses": self.misses, "evictions": self.evictions, "dropped": dict(self.dropped)}


@dataclass(frozen=True)
class EntryKey:
    """An entry's key fields as its file and the journal record them (chunk_cache.store.CacheKey's fields)."""

    model: str
    dtype: str
    context: str  # files and journal of format 2 name it "prefix_hash" / "p"
    chunk: str

    def record(self) -> dict[str, str]:
        return {"m": self.model, "y": self.dtype, "p": self.context, "k": self.chunk}


def _header_key(path: Path) -> EntryKey | None:
    """The key fields in an entry file's header (no tensor is read); None if the header is unreadable."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            meta = fh.metadata() or {}
        return EntryKey(meta["model"], meta["dtype"], meta["prefix_hash"], meta["chunk_hash"])
    except (*_UNREADABLE, FileNotFoundError):
        return None


def _append_records(lock: FileLock, journal: Path, records: list[dict]) -> None:
    """Write queued records of a tier that is being garbage-collected or of an exiting process. A journal
    that is gone (the folder was cleared since) is not created again: its hits are moot."""
    if not records:
        return
    payload = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records).encode()
    records.clear()
    with contextlib.suppress(OSError), lock, open(journal, "r+b") as fh:
        if fh.seek(0, os.SEEK_END) > 0:
            fh.seek(-1, os.SEEK_END)
            if fh.read(1) != b"\n":
                payload = b"\n" + payload
        fh.write(payload)


def read_manifest(root: Path) -> dict | None:
    """The folder's manifest, None if there is none; IndexMismatchError if it is not ours."""
    path = Path(root) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise IndexMismatchError(f"{path}: unreadable KV cache manifest ({exc}); run `ragkit cache clear CONFIG` "
                                 "or set another cache.dir") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise IndexMismatchError(f"{path}: not a ragkit KV cache manifest; set another cache.dir")
    if manifest.get("version") != VERSION:
        raise IndexMismatchError(f"{path}: KV cache format version {manifest.get('version')} (this ragkit reads "
                                 f"{VERSION}); run `ragkit cache clear CONFIG` or set another cache.dir")
    return manifest


def clear_files(root: Path) -> int:
    """Remove the entries and the journal of a cache folder (caller holds its lock); returns entries removed."""
    removed = sum(1 for p in entry_files(root) if p.name.endswith(SUFFIX))
    with contextlib.suppress(FileNotFoundError):
        (root / JOURNAL).unlink()
    shutil.rmtree(root / ENTRIES, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        (root / MANIFEST).unlink()
    return removed


def _refuse_foreign_folder(root: Path) -> None:
    """Refuse to turn a file or an unrelated, non-empty folder into a cache (and so to clear it later).
    A lock file or a half-written manifest is another process creating the cache right now."""
    if root.exists() and not root.is_dir():
        raise InputError(root, "the KV cache folder is a file", hint="set cache.dir to a folder")
    if root.is_dir() and not (root / MANIFEST).exists() and not (root / ENTRIES).exists():
        if any(p.name != LOCK and not p.name.startswith(f".{MANIFEST}.tmp-") for p in root.iterdir()):
            raise InputError(root, "is not empty and is not a ragkit KV cache (no manifest.json)",
                             hint="set cache.dir to a new or empty folder")


def entry_files(root: Path) -> Iterator[Path]:
    entries = root / ENTRIES
    if not entries.is_dir():
        return
    for sub in entries.iterdir():
        if sub.is_dir() and len(sub.name) == 2:
            yield from sub.iterdir()
