"""What a compiled sched_ext object contains, read on the host with pyelftools (nothing is loaded).

- the ops map: a variable in `.struct_ops.link` whose BTF type is `struct sched_ext_ops`; its `.name`
  is read from the section bytes at the member's BTF offset;
- callbacks: relocations of `.struct_ops.link` point ops members (by offset) at program symbols;
- programs: function symbols of executable sections, `st_size / 8` instruction slots each;
- kfuncs: call instructions relocated against undefined (extern) symbols;
- helpers: call instructions with src_reg 0 and no relocation (`imm` is the helper id);
- license: the NUL-terminated `license` section.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass, field

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

from . import btf as btfmod
from .models import ProgramInfo, VerifyError
from .source_check import GPL_COMPATIBLE

HOT_CALLBACKS = ("select_cpu", "select_cid", "enqueue", "dispatch", "running", "stopping")
OPS_TYPES = ("sched_ext_ops", "sched_ext_ops_cid")
BPF_CALL = 0x85
SHF_EXECINSTR = 0x4


@dataclass
class ElfInfo:
    ops_name: str | None = None
    ops_var: str | None = None
    ops_type: str | None = None  # sched_ext_ops, or sched_ext_ops_cid (cid-form, kernel 7.2+)
    programs: list[ProgramInfo] = field(default_factory=list)
    callbacks: list[str] = field(default_factory=list)
    kfuncs: list[str] = field(default_factory=list)          # strong externs: must exist
    weak_kfuncs: list[str] = field(default_factory=list)     # __weak: guarded by bpf_ksym_exists()
    helper_ids: list[int] = field(default_factory=list)
    kfunc_callers: dict[str, list[str]] = field(default_factory=dict)  # kfunc -> calling functions
    license: str | None = None
    hot_path_insns: int = 0
    errors: list[VerifyError] = field(default_factory=list)


def _err(code: str, message: str) -> VerifyError:
    return VerifyError(stage="elf", code=code, message=message)


def inspect_object(data: bytes) -> ElfInfo:
    """Read everything layer 1 reports about a BPF object; problems go to `info.errors`."""
    info = ElfInfo()
    try:
        elf = ELFFile(io.BytesIO(data))
    except ELFError as e:
        info.errors.append(_err("not_elf", f"not an ELF object: {e}"))
        return info
    if elf["e_machine"] not in ("EM_BPF", 247):
        info.errors.append(_err("not_bpf", f"not a BPF object (machine {elf['e_machine']})"))
        return info

    sections = list(elf.iter_sections())
    symtab = next((s for s in sections if isinstance(s, SymbolTableSection)), None)
    if symtab is None:
        info.errors.append(_err("no_symtab", "the object has no symbol table"))
        return info
    symbols = list(symtab.iter_symbols())
    # relocation sections by the index of the section they patch
    rels = {s["sh_info"]: s for s in sections if s["sh_type"] == "SHT_REL"}

    # -- license
    lic = elf.get_section_by_name("license")
    if lic is None:
        info.errors.append(_err("no_license", 'no "license" section: declare '
                                '`char _license[] SEC("license") = "GPL";`'))
    else:
        info.license = lic.data().split(b"\0", 1)[0].decode("utf-8", "replace")
        if info.license not in GPL_COMPATIBLE:
            info.errors.append(_err("license", f'license "{info.license}" is not GPL-compatible; '
                                    "the kernel refuses sched_ext programs that are not"))

    # -- programs and what they call
    progs: dict[tuple[int, int], ProgramInfo] = {}
    calls: dict[tuple[int, int], set[tuple[int, int]]] = {}  # (section, func start) -> call targets
    sizes = {(s["st_shndx"], s["st_value"]): s["st_size"] // 8 for s in symbols
             if s["st_info"]["type"] == "STT_FUNC" and isinstance(s["st_shndx"], int)}
    kfuncs: dict[str, bool] = {}  # name -> weak
    helpers: set[int] = set()
    for idx, sec in enumerate(sections):
        if not sec["sh_flags"] & SHF_EXECINSTR or sec["sh_size"] == 0:
            continue
        funcs = [s for s in symbols if s["st_shndx"] == idx and s["st_info"]["type"] == "STT_FUNC"]
        if sec.name != ".text":  # .text holds subprograms (BPF-to-BPF calls), not programs
            for sym in funcs:
                progs[(idx, sym["st_value"])] = ProgramInfo(
                    name=sym.name, section=sec.name, insns=sym["st_size"] // 8)
        code = sec.data()
        relocated: dict[int, object] = {}
        if idx in rels:
            for r in rels[idx].iter_relocations():
                relocated[r["r_offset"]] = symbols[r["r_info_sym"]]
        for off in range(0, len(code) - 7, 8):
            if code[off] != BPF_CALL:
                continue
            sym = relocated.get(off)
            imm = struct.unpack_from("<i", code, off + 4)[0]
            caller_fn = next((f for f in funcs if f["st_value"] <= off < f["st_value"] + f["st_size"]), None)
            if sym is not None and isinstance(sym["st_shndx"], int):
                # a BPF-to-BPF call into another section (usually .text): symbol + imm + 1 slots
                target = (sym["st_shndx"], sym["st_value"] + (imm + 1) * 8)
                calls.setdefault((idx, caller_fn["st_value"] if caller_fn else 0), set()).add(target)
            elif sym is None and code[off + 1] >> 4 == 1:
                # a BPF-to-BPF call within the section: pc + imm + 1
                calls.setdefault((idx, caller_fn["st_value"] if caller_fn else 0), set()).add(
                    (idx, off + (imm + 1) * 8))
            if sym is not None:
                if sym["st_shndx"] == "SHN_UNDEF" and sym.name:
                    kfuncs[sym.name] = sym["st_info"]["bind"] == "STB_WEAK"
                    caller = next((f.name for f in funcs
                                   if f["st_value"] <= off < f["st_value"] + f["st_size"]), sec.name)
                    users = info.kfunc_callers.setdefault(sym.name, [])
                    if caller not in users:
                        users.append(caller)
            elif code[off + 1] >> 4 == 0:
                helpers.add(imm)
    info.kfuncs = sorted(k for k, weak in kfuncs.items() if not weak)
    info.weak_kfuncs = sorted(k for k, weak in kfuncs.items() if weak)
    info.helper_ids = sorted(helpers)

    # -- the ops map and its callbacks
    link = elf.get_section_by_name(".struct_ops.link")
    if link is None:
        if elf.get_section_by_name(".struct_ops") is not None:
            info.errors.append(_err("no_struct_ops_link", 'the ops map is in SEC(".struct_ops"); '
                                    'sched_ext needs SEC(".struct_ops.link")'))
        else:
            info.errors.append(_err("no_struct_ops", "no sched_ext_ops map: define "
                                    '`SEC(".struct_ops.link") struct sched_ext_ops NAME = {...}` '
                                    "(e.g. with SCX_OPS_DEFINE)"))
    else:
        _read_ops(elf, sections, symbols, rels, link, progs, info)

    for key, prog in progs.items():
        prog.subprog_insns = sum(sizes.get(f, 0) for f in _reachable(key, calls) if f != key)
    info.programs = list(progs.values())
    info.hot_path_insns = sum(p.insns + p.subprog_insns for p in info.programs
                              if p.callback in HOT_CALLBACKS)
    return info


def _reachable(start: tuple[int, int], calls: dict) -> set[tuple[int, int]]:
    seen, todo = {start}, [start]
    while todo:
        for target in calls.get(todo.pop(), ()):
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def _read_ops(elf, sections, symbols, rels, link, progs, info: ElfInfo) -> None:
    link_idx = sections.index(link)
    btf_sec = elf.get_section_by_name(".BTF")
    if btf_sec is None:
        info.errors.append(_err("no_btf", "the object has no .BTF section (compile with -g)"))
        return
    try:
        b = btfmod.Btf(btf_sec.data())
    except ValueError as e:
        info.errors.append(_err("bad_btf", f"cannot read the object's BTF: {e}"))
        return
    hit = b.find(btfmod.DATASEC, ".struct_ops.link")
    ops_vars = []  # (var name, offset, size, struct BtfType)
    for var_id, off, size in (hit[1].members if hit else []):
        var = b.types[var_id]
        _, st = b.resolve(var.size_or_type)
        if st is not None and st.kind == btfmod.STRUCT and btfmod.essential_name(st.name) in OPS_TYPES:
            ops_vars.append((var.name, off, size, st))
    if not ops_vars:
        info.errors.append(_err("no_struct_ops", ".struct_ops.link holds no `struct sched_ext_ops`"))
        return
    if len(ops_vars) > 1:
        info.errors.append(VerifyError(stage="elf", code="many_ops", severity="warning",
                                       message=f"{len(ops_vars)} sched_ext_ops maps; reporting "
                                       f"{ops_vars[0][0]}"))
    name, base, size, st = ops_vars[0]
    info.ops_var, info.ops_type = name, btfmod.essential_name(st.name)
    data = link.data()
    by_offset = {}
    for m_name, m_type, bit_off in st.members:
        by_offset[base + bit_off // 8] = m_name
        if m_name == "name":
            _, arr = b.resolve(m_type)
            n = arr.members[2] if arr is not None and arr.kind == btfmod.ARRAY else 128
            raw = data[base + bit_off // 8: base + bit_off // 8 + n]
            info.ops_name = raw.split(b"\0", 1)[0].decode("utf-8", "replace") or None
    if link_idx in rels:
        for r in rels[link_idx].iter_relocations():
            member = by_offset.get(r["r_offset"])
            sym = symbols[r["r_info_sym"]]
            if member is None or not (base <= r["r_offset"] < base + size):
                continue
            prog = progs.get((sym["st_shndx"], sym["st_value"])) if isinstance(sym["st_shndx"], int) else None
            if prog is not None:
                prog.callback = member
            info.callbacks.append(member)
    if not info.ops_name:
        info.errors.append(_err("no_ops_name", "the sched_ext_ops map has no .name "
                                '(set `.name = "myscheduler"`)'))
