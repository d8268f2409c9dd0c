"""A deterministic newc cpio writer (the guest initramfs)."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

from ..errors import InfrastructureError


class Cpio:
    """A newc cpio archive built in memory with fixed owners and mtimes, so that its hash is stable."""

    def __init__(self) -> None:
        self.entries: dict[str, tuple[int, bytes, int]] = {}  # path -> (mode, data, rdev)

    def dir(self, path: str, mode: int = 0o755) -> None:
        path = path.strip("/")
        parts = path.split("/")
        for i in range(1, len(parts) + 1):
            p = "/".join(parts[:i])
            if p and p not in self.entries:
                self.entries[p] = (0o040000 | mode, b"", 0)

    def _parent(self, path: str) -> None:
        parent = path.rsplit("/", 1)[0] if "/" in path else ""
        if parent:
            self.dir(parent)

    def file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        path = path.strip("/")
        self._parent(path)
        self.entries[path] = (0o100000 | mode, data, 0)

    def symlink(self, path: str, target: str) -> None:
        path = path.strip("/")
        self._parent(path)
        self.entries[path] = (0o120777, target.encode(), 0)

    def chardev(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        path = path.strip("/")
        self._parent(path)
        self.entries[path] = (0o020000 | mode, b"", (major << 8) | minor)

    def from_rootfs(self, rootfs: Path, path: str, _depth: int = 0) -> None:
        """Add `path` of the rootfs, following symlinks in it and its parents (merged /usr)."""
        if _depth > 40:
            raise InfrastructureError(f"symlink loop at {path} in the rootfs")
        parts = path.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            sub = "/".join(parts[:i])
            host = rootfs / sub
            if host.is_symlink():
                target = os.readlink(host)
                if self.entries.get(sub, (0,))[0] != 0o120777:
                    self.symlink(sub, target)
                resolved = os.path.normpath(os.path.join("/" + "/".join(parts[: i - 1]), target))
                rest = "/".join(parts[i:])
                return self.from_rootfs(rootfs, resolved + ("/" + rest if rest else ""), _depth + 1)
        host = rootfs / path.strip("/")
        if host.is_dir():
            self.dir(path)
        else:
            self.file(path, host.read_bytes(), host.stat().st_mode & 0o777)

    def bytes(self) -> bytes:
        out = bytearray()
        ino = 1000

        def emit(name: str, mode: int, data: bytes, rdev: int, nlink: int) -> None:
            nonlocal ino
            ino += 1
            nb = name.encode() + b"\0"
            hdr = "070701" + "".join(f"{x:08x}" for x in (
                ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev >> 8, rdev & 0xFF, len(nb), 0))
            out.extend(hdr.encode() + nb)
            out.extend(b"\0" * (-len(out) % 4))
            out.extend(data)
            out.extend(b"\0" * (-len(out) % 4))

        for name in sorted(self.entries):
            mode, data, rdev = self.entries[name]
            emit(name, mode, data, rdev, 2 if mode & 0o040000 and not mode & 0o100000 else 1)
        emit("TRAILER!!!", 0, b"", 0, 1)
        return bytes(out)

    def gz(self, level: int = 6) -> bytes:
        return gzip.compress(self.bytes(), compresslevel=level, mtime=0)
