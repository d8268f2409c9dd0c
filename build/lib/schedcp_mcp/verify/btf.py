"""A small reader for BTF (the kernel's BPF Type Format) and the kernel facts layer 1 needs from it.

BTF is a header, a type section and a string section (see the kernel's Documentation/bpf/btf.rst).
We parse it ourselves: it is ~100 lines, needs no toolchain, and reads the ~6 MB of a kernel's BTF
in about a second; the few facts we keep (function names, `sched_ext_ops` members, enum values) are
cached per content hash, so later checks take milliseconds.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import struct
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from .. import config
from ..errors import InfrastructureError

BTF_MAGIC = 0xEB9F
HOST_BTF = Path("/sys/kernel/btf/vmlinux")
FACTS_VERSION = 2  # bump when KernelFacts changes

# kind numbers (include/uapi/linux/btf.h)
INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT = range(1, 12)
FUNC, FUNC_PROTO, VAR, DATASEC, FLOAT, DECL_TAG, TYPE_TAG, ENUM64 = range(12, 20)


@dataclass
class BtfType:
    kind: int
    name: str
    vlen: int
    kind_flag: bool
    size_or_type: int
    # STRUCT/UNION: [(name, type_id, bit_offset)], ENUM/ENUM64: [(name, value)],
    # DATASEC: [(var_type_id, offset, size)], FUNC_PROTO: [(name, type_id)], ARRAY: (elem, idx, n)
    members: list = field(default_factory=list)


class Btf:
    """All types of one BTF blob. Type ids start at 1 (0 is void)."""

    def __init__(self, data: bytes, base: "Btf | None" = None):
        if len(data) < 24:
            raise ValueError("BTF too short")
        magic, _ver, _flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
        if magic != BTF_MAGIC:
            raise ValueError(f"not BTF (magic {magic:#x}; big-endian BTF is not supported)")
        type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", data, 8)
        self.strings = data[hdr_len + str_off: hdr_len + str_off + str_len]
        self.types: list[BtfType | None] = [None] if base is None else list(base.types)
        self._parse(data[hdr_len + type_off: hdr_len + type_off + type_len])

    def name(self, off: int) -> str:
        end = self.strings.find(b"\0", off)
        return self.strings[off:end].decode("utf-8", "replace")

    def _parse(self, t: bytes) -> None:
        pos, n = 0, len(t)
        unpack = struct.unpack_from
        while pos < n:
            name_off, info, size_or_type = unpack("<III", t, pos)
            pos += 12
            kind, vlen, kflag = (info >> 24) & 0x1F, info & 0xFFFF, bool(info >> 31)
            ty = BtfType(kind, self.name(name_off) if name_off else "", vlen, kflag, size_or_type)
            if kind == INT or kind == VAR or kind == DECL_TAG:
                pos += 4
            elif kind == ARRAY:
                ty.members = list(unpack("<III", t, pos))
                pos += 12
            elif kind in (STRUCT, UNION):
                for _ in range(vlen):
                    m_name, m_type, m_off = unpack("<III", t, pos)
                    ty.members.append((self.name(m_name), m_type, m_off & 0xFFFFFF if kflag else m_off))
                    pos += 12
            elif kind == ENUM:
                for _ in range(vlen):
                    e_name, val = unpack("<Ii", t, pos)
                    ty.members.append((self.name(e_name), val if kflag else val & 0xFFFFFFFF))
                    pos += 8
            elif kind == ENUM64:
                for _ in range(vlen):
                    e_name, lo, hi = unpack("<III", t, pos)
                    ty.members.append((self.name(e_name), (hi << 32) | lo))
                    pos += 12
            elif kind == FUNC_PROTO:
                for _ in range(vlen):
                    p_name, p_type = unpack("<II", t, pos)
                    ty.members.append((self.name(p_name) if p_name else "", p_type))
                    pos += 8
            elif kind == DATASEC:
                for _ in range(vlen):
                    ty.members.append(unpack("<III", t, pos))
                    pos += 12
            elif kind in (PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG):
                pass
            else:
                raise ValueError(f"unknown BTF kind {kind} at type {len(self.types)}")
            self.types.append(ty)

    # --- lookups ---------------------------------------------------------------------------------

    def find(self, kind: int, name: str) -> tuple[int, BtfType] | None:
        for i, ty in enumerate(self.types):
            if ty is not None and ty.kind == kind and ty.name == name:
                return i, ty
        return None

    def resolve(self, type_id: int) -> tuple[int, BtfType | None]:
        """Skip typedefs and qualifiers."""
        while type_id:
            ty = self.types[type_id]
            if ty.kind in (TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG):
                type_id = ty.size_or_type
            else:
                return type_id, ty
        return 0, None


# --- the target kernel ------------------------------------------------------------------------------

@dataclass
class KernelFacts:
    """What layer 1 checks a scheduler against: the target kernel's functions and ops members."""

    btf_sha256: str
    funcs: set[str]
    ops_members: dict[str, list[str]]  # sched_ext_ops (and _cid) -> members; {} without sched_ext
    helper_ids: dict[int, str]  # from enum bpf_func_id: 1 -> bpf_map_lookup_elem

    @property
    def has_sched_ext(self) -> bool:
        return "sched_ext_ops" in self.ops_members

    def has_kfunc(self, name: str) -> bool:
        return essential_name(name) in self.funcs


def essential_name(name: str) -> str:
    """The kernel name libbpf resolves an extern to: a "flavoured" `foo___v1` is `foo`, and only the
    last flavour is cut (`scx_bpf_dsq_insert___v2___compat` is the kernel's `..._insert___v2`)."""
    for i in range(len(name) - 5, -1, -1):
        s = name[i:i + 5]
        if s[0] != "_" and s[1:4] == "___" and s[4] != "_":
            return name[:i + 1]
    return name


_OPS_STRUCTS = (b"sched_ext_ops", b"sched_ext_ops_cid")
# bytes of type-specific data after the 12-byte header, by kind: fixed, per vlen member
_EXTRA = {INT: (4, 0), PTR: (0, 0), ARRAY: (12, 0), STRUCT: (0, 12), UNION: (0, 12), ENUM: (0, 8),
          FWD: (0, 0), TYPEDEF: (0, 0), VOLATILE: (0, 0), CONST: (0, 0), RESTRICT: (0, 0),
          FUNC: (0, 0), FUNC_PROTO: (0, 8), VAR: (4, 0), DATASEC: (0, 12), FLOAT: (0, 0),
          DECL_TAG: (4, 0), TYPE_TAG: (0, 0), ENUM64: (0, 12)}


def scan_kernel_facts(data: bytes, btf_sha: str = "") -> KernelFacts:
    """The facts from a kernel's BTF in one pass that decodes only the names it needs (a full
    `Btf` parse of a 6 MB kernel BTF takes ~0.5 s; this takes a fraction)."""
    magic, _v, _f, hdr_len = struct.unpack_from("<HBBI", data, 0)
    if magic != BTF_MAGIC:
        raise ValueError("not BTF")
    type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", data, 8)
    strs = data[hdr_len + str_off: hdr_len + str_off + str_len]
    t = data[hdr_len + type_off: hdr_len + type_off + type_len]

    def name(off: int) -> bytes:
        return strs[off: strs.index(b"\0", off)]

    func_offs: list[int] = []
    ops: dict[str, list[str]] = {}
    helpers: dict[int, str] = {}
    pos, n, unpack = 0, len(t), struct.unpack_from
    while pos < n:
        name_off, info, _ = unpack("<III", t, pos)
        pos += 12
        kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
        fixed, per = _EXTRA.get(kind, (None, None))
        if fixed is None:
            raise ValueError(f"unknown BTF kind {kind}")
        if kind == FUNC:
            func_offs.append(name_off)
        elif kind == STRUCT and name_off and (nm := name(name_off)) in _OPS_STRUCTS:
            ops[nm.decode()] = [name(unpack("<I", t, pos + 12 * i)[0]).decode() for i in range(vlen)]
        elif kind == ENUM and name_off and name(name_off) == b"bpf_func_id":
            for i in range(vlen):
                e_name, val = unpack("<Ii", t, pos + 8 * i)
                nm = name(e_name).decode()
                if nm.startswith("BPF_FUNC_") and nm != "BPF_FUNC_unspec":
                    helpers[val] = "bpf_" + nm[len("BPF_FUNC_"):]  # as C calls it: bpf_map_lookup_elem
        pos += fixed + per * vlen
    funcs = {name(o).decode() for o in set(func_offs)}
    return KernelFacts(btf_sha, funcs, ops, helpers)


def btf_from_vmlinux_elf(path: Path) -> bytes:
    """The .BTF section of an uncompressed vmlinux ELF."""
    from elftools.elf.elffile import ELFFile

    with open(path, "rb") as f:
        sec = ELFFile(f).get_section_by_name(".BTF")
        if sec is None:
            raise InfrastructureError(f"{path} has no .BTF section", "the kernel needs CONFIG_DEBUG_INFO_BTF=y")
        return sec.data()


def read_btf_file(path: Path) -> bytes:
    """Raw BTF from /sys/kernel/btf/vmlinux, a raw .btf file, or a vmlinux ELF."""
    data = Path(path).read_bytes()
    if data[:4] == b"\x7fELF":
        return btf_from_vmlinux_elf(path)
    if data[:6] == b"\xfd7zXZ\x00":
        return lzma.decompress(data)
    return data


@lru_cache(maxsize=8)
def _facts_for(btf_sha: str, path: str) -> KernelFacts:
    cache = config.home() / "cache" / "btf" / f"{btf_sha}.v{FACTS_VERSION}.json"
    if cache.exists():
        d = json.loads(cache.read_text())
        return KernelFacts(btf_sha, set(d["funcs"]), d["ops_members"],
                           {int(k): v for k, v in d["helper_ids"].items()})
    facts = scan_kernel_facts(read_btf_file(Path(path)), btf_sha)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(json.dumps({"funcs": sorted(facts.funcs), "ops_members": facts.ops_members,
                               "helper_ids": facts.helper_ids}))
    tmp.replace(cache)
    return facts


def kernel_facts(btf_path: Path = HOST_BTF) -> KernelFacts:
    """Facts about the kernel whose BTF is at `btf_path` (cached by the BTF's content hash)."""
    try:
        data = Path(btf_path).read_bytes()
    except OSError as e:
        raise InfrastructureError(f"cannot read kernel BTF at {btf_path}: {e}",
                                  "the target kernel needs CONFIG_DEBUG_INFO_BTF=y") from e
    return _facts_for(hashlib.sha256(data).hexdigest(), str(btf_path))
