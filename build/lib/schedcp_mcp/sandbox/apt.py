"""Debian sid through apt with private state, and resolving its newest sched_ext kernel."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import InfrastructureError
from .hosttools import run_tool

KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
KERNEL_FLAVOUR = "cloud-amd64"


def debian_mirror() -> str:
    """$SCHEDCP_DEBIAN_MIRROR, else the Debian archive this machine's apt already uses (read only)."""
    env = os.environ.get("SCHEDCP_DEBIAN_MIRROR")
    if env:
        return env.rstrip("/")
    uris: list[str] = []
    sources = Path("/etc/apt/sources.list.d")
    for f in sorted(sources.glob("*.sources")) if sources.is_dir() else []:
        for line in f.read_text(errors="replace").splitlines():
            if line.strip().lower().startswith("uris:"):
                uris += line.split(":", 1)[1].split()
    legacy = Path("/etc/apt/sources.list")
    if legacy.exists():
        for line in legacy.read_text(errors="replace").splitlines():
            m = re.match(r"\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)", line)
            if m:
                uris.append(m.group(1))
    for u in uris:
        u = u.rstrip("/")
        if u.endswith("/debian") and "security" not in u:
            return u
    raise InfrastructureError("no Debian archive found in this machine's apt sources",
                              hint="set SCHEDCP_DEBIAN_MIRROR to a Debian mirror URL (…/debian)")


class Apt:
    """apt-get/apt-cache for Debian sid with a private state directory (sources list, lists, cache):
    the system's apt configuration is never read or written."""

    def __init__(self, sd: Path):
        self.dir = sd / "apt"
        for d in ("lists/partial", "cache/archives/partial", "etc"):
            (self.dir / d).mkdir(parents=True, exist_ok=True)
        if not KEYRING.exists():
            raise InfrastructureError(f"Debian archive keyring {KEYRING} is missing",
                                      hint="apt-get install debian-archive-keyring")
        self.sources = self.dir / "etc/sources.list"
        want = f"deb [signed-by={KEYRING}] {debian_mirror()} sid main\n"
        if not self.sources.exists() or self.sources.read_text() != want:
            self.sources.write_text(want)
        self.opts = [
            "-o", f"Dir::Etc::sourcelist={self.sources}", "-o", "Dir::Etc::sourceparts=-",
            "-o", f"Dir::State::Lists={self.dir / 'lists'}", "-o", f"Dir::Cache={self.dir / 'cache'}",
            "-o", "Dir::State::status=/dev/null", "-o", "APT::Architecture=amd64",
            "-o", "APT::Architectures=amd64", "-o", "Debug::NoLocking=1", "-o", "APT::Sandbox::User=root",
            "-o", "Acquire::Retries=3", "-o", "Dir::Etc::preferences=/dev/null",
            "-o", "Dir::Etc::preferencesparts=-",
        ]

    def lists_fingerprint(self) -> list:
        return sorted([p.name, p.stat().st_size, int(p.stat().st_mtime)]
                      for p in (self.dir / "lists").iterdir() if p.is_file())

    def has_lists(self) -> bool:
        return any("_Packages" in p.name for p in (self.dir / "lists").iterdir())

    def update(self) -> None:
        run_tool(["apt-get", *self.opts, "update"], "apt-get update (Debian sid lists)", timeout=600)

    def show(self, pkg: str) -> dict[str, str]:
        p = run_tool(["apt-cache", *self.opts, "show", "--no-all-versions", pkg], f"apt-cache show {pkg}")
        fields: dict[str, str] = {}
        for line in p.stdout.decode().splitlines():
            if line and not line[0].isspace() and ":" in line:
                k, v = line.split(":", 1)
                fields.setdefault(k, v.strip())
        return fields

    def search(self, regex: str) -> list[str]:
        p = run_tool(["apt-cache", *self.opts, "search", "--names-only", regex], f"apt-cache search {regex}")
        return [line.split(" - ", 1)[0] for line in p.stdout.decode().splitlines() if line]

    def download(self, pkgs: list[str], dest: Path) -> None:
        run_tool(["apt-get", *self.opts, "download", *pkgs], f"apt-get download {' '.join(pkgs)}",
             timeout=1200, cwd=dest)


def version_key(v: str) -> list:
    return [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", v)]


def resolve_kernel(apt: Apt) -> dict[str, str]:
    """The newest sid linux-image-*-cloud-amd64 and its split packages (binary: vmlinuz, base: config)."""
    images = [n for n in apt.search(rf"^linux-image-[0-9].*-{KERNEL_FLAVOUR}$") if not n.endswith("-dbg")]
    if not images:
        raise InfrastructureError(f"no linux-image-*-{KERNEL_FLAVOUR} package in Debian sid's lists")
    image = max(images, key=lambda n: version_key(n))
    abi = image[len("linux-image-"):]                      # e.g. 7.2.13+deb14-cloud-amd64
    info = apt.show(image)
    deps = info.get("Depends", "")
    binary = f"linux-binary-{abi}"
    base = f"linux-base-{abi}"
    if binary not in deps:  # older layout: the image package holds everything
        binary = base = image
    upstream = re.match(r"(\d+\.\d+)", abi).group(1)
    return {"image": image, "abi": abi, "version": info.get("Version", ""), "binary": binary,
            "base": base, "source": f"linux-source-{upstream}", "upstream": upstream}
