"""Running the host's build tools (apt, mmdebstrap, zstd, chroot, ...) with errors that say what to
install."""

from __future__ import annotations

import subprocess

from ..errors import InfrastructureError


def run_tool(argv: list[str], what: str, timeout: float = 900, **kw) -> subprocess.CompletedProcess:
    try:
        p = subprocess.run(argv, capture_output=True, timeout=timeout, **kw)
    except FileNotFoundError as e:
        raise InfrastructureError(f"{what}: {argv[0]} is not installed", hint=install_hint(argv[0])) from e
    except subprocess.TimeoutExpired as e:
        raise InfrastructureError(f"{what}: timed out after {timeout:.0f} s") from e
    if p.returncode != 0:
        err = (p.stderr or b"").decode(errors="replace").strip()[-2000:]
        raise InfrastructureError(f"{what} failed (exit {p.returncode}): {err}")
    return p


def install_hint(tool: str) -> str:
    pkg = {"mmdebstrap": "mmdebstrap", "apt-get": "apt", "dpkg-deb": "dpkg", "zstd": "zstd",
           "qemu-system-x86_64": "qemu-system-x86", "unshare": "util-linux"}.get(tool, tool)
    return f"install it, e.g. `apt-get install {pkg}`"
