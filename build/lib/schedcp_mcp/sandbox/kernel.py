"""Getting at a packaged kernel's parts: the ELF vmlinux inside a vmlinuz, its BTF, its boot notes,
its config."""

from __future__ import annotations

import subprocess
from pathlib import Path

from elftools.elf.elffile import ELFFile

from ..errors import InfrastructureError
from .hosttools import install_hint


def extract_vmlinux(vmlinuz: Path, out: Path) -> None:
    """extract-vmlinux for a zstd (or gzip/xz) compressed bzImage: find the payload, decompress it."""
    data = vmlinuz.read_bytes()
    for magic, cmd in ((b"\x28\xb5\x2f\xfd", ["zstd", "-dc"]), (b"\x1f\x8b\x08", ["gzip", "-dc"]),
                       (b"\xfd7zXZ\x00", ["xz", "-dc"])):
        pos = data.find(magic)
        while pos >= 0:
            try:
                p = subprocess.run(cmd, input=data[pos:], capture_output=True, timeout=120)
            except FileNotFoundError as e:
                raise InfrastructureError(f"{cmd[0]} is needed to decompress the kernel",
                                          hint=install_hint(cmd[0])) from e
            if p.stdout[:4] == b"\x7fELF":  # trailing data makes the tools exit non-zero: ignore
                out.write_bytes(p.stdout)
                return
            pos = data.find(magic, pos + 1)
    raise InfrastructureError(f"could not find a compressed ELF kernel inside {vmlinuz}")


def extract_btf(vmlinux: Path, out: Path) -> None:
    with open(vmlinux, "rb") as f:
        sec = ELFFile(f).get_section_by_name(".BTF")
        if sec is None:
            raise InfrastructureError(f"{vmlinux} has no .BTF section (kernel without CONFIG_DEBUG_INFO_BTF)")
        out.write_bytes(sec.data())


def has_pvh_entry(vmlinux: Path) -> bool:
    """Does the ELF kernel carry XEN_ELFNOTE_PHYS32_ENTRY (18), so qemu can boot it directly (PVH)?"""
    with open(vmlinux, "rb") as f:
        for sec in ELFFile(f).iter_sections():
            if sec.header.sh_type == "SHT_NOTE":
                for note in sec.iter_notes():
                    if note["n_name"] == "Xen" and note["n_type"] == 18:
                        return True
    return False


def kernel_config_has(config_path: Path, option: str) -> bool:
    return f"{option}=y" in config_path.read_text().splitlines()
