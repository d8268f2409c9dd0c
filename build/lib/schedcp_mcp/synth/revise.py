"""Revise a policy or a candidate by a unified diff, applied to a copy of its source.

GNU patch does the applying (`patch --batch --unified --fuzz=0 -o OUT SOURCE`, in a temp dir): it is
the tool every diff an agent writes is made for, it reports exactly which hunk failed and writes it
to a reject file we hand back, and it tolerates moved lines (offsets) while `--fuzz=0` refuses a hunk
whose context does not match, so a patch never lands somewhere it was not meant for. `--unified`
makes it read only unified diffs (never ed scripts, which patch would pipe to a shell), and naming
the source file explicitly means file names inside the diff are never used to write anything.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from ..errors import BadInput, InfrastructureError
from ..repository.policies import get_policy
from .provenance import Provenance, SynthResult, candidate_source, get_candidate, submit

MAX_PATCH_BYTES = 256 * 1024


class PatchRefused(BadInput):
    def __init__(self, message: str, hint: str, failed_hunks: str = ""):
        self.failed_hunks = failed_hunks
        super().__init__(message, hint)


def apply_patch(source: str, patch: str) -> str:
    """`source` with the unified diff `patch` applied, or PatchRefused naming the failing hunk."""
    if len(patch.encode()) > MAX_PATCH_BYTES:
        raise PatchRefused(f"patch is {len(patch.encode())} bytes; the limit is {MAX_PATCH_BYTES}",
                           "send a focused diff, or generate a new scheduler instead")
    lines = patch.splitlines()
    if not any(ln.startswith("@@ ") for ln in lines):
        raise PatchRefused("not a unified diff: no '@@ -a,b +c,d @@' hunk header",
                           "make it with `diff -u old.bpf.c new.bpf.c` (or git diff)")
    targets = {ln[4:].split("\t")[0].strip() for ln in lines if ln.startswith("+++ ")}
    if len(targets) > 1:
        raise PatchRefused(f"the patch changes {len(targets)} files ({', '.join(sorted(targets))})",
                           "a scheduler is one source file: send a diff of that file only")
    exe = shutil.which("patch")
    if exe is None:
        raise InfrastructureError("GNU patch is not installed", "apt-get install patch")
    with tempfile.TemporaryDirectory(prefix="schedcp-revise-") as d:
        src, out, rej = Path(d, "source.bpf.c"), Path(d, "out.bpf.c"), Path(d, "failed.rej")
        src.write_text(source)
        p = subprocess.run([exe, "--batch", "--unified", "--fuzz=0", "--no-backup-if-mismatch",
                            "--reject-file", str(rej), "-o", str(out), str(src)],
                           input=patch, capture_output=True, text=True, timeout=30, cwd=d)
        said = (p.stdout + p.stderr).replace(str(src), "source").replace(d + "/", "").strip()
        if p.returncode != 0:
            failed = rej.read_text() if rej.exists() else ""
            which = "; ".join(re.findall(r"Hunk #\d+ FAILED at \d+\.?", said)) or said[-500:]
            raise PatchRefused(f"the patch does not apply: {which}",
                               "regenerate the diff against the current source (get_policy / the "
                               "candidate's source); the failing hunk:\n" + (failed or said), failed)
        return out.read_text()


def revise(base: str, patch: str, params: dict[str, Any] | None = None, **kw) -> SynthResult:
    """Apply `patch` to the source of `base` (a policy name or a candidate id) and run layer 1."""
    if base.startswith("cand-"):
        parent = get_candidate(base)
        source = candidate_source(parent)
        prov = Provenance(kind="revised", parent_candidate=base,
                          parent_policy=parent.provenance.parent_policy, patch=patch,
                          params={k: str(v) for k, v in (params or {}).items()})
        knobs = parent.knobs
    else:
        pol = get_policy(base)
        source = pol.source_text()
        if source is None:
            raise BadInput(f"{base} has no BPF source here ({pol.kind})",
                           "revise a schedcp policy or a candidate (cand-…)")
        prov = Provenance(kind="revised", parent_policy=base, patch=patch,
                          params={k: str(v) for k, v in (params or {}).items()})
        knobs = pol.parameters
    return submit(prov, source=apply_patch(source, patch), knobs=knobs, **kw)
