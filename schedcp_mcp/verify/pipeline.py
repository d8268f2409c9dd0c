"""Layer 1 end to end: source checks → compile → ELF checks → BTF checks → the kernel verifier.

Each stage stops the pipeline with a `rejected` report naming what is wrong; the cheap stages run
first so that most mistakes never cost a VM boot. Results are cached by the content hash of
everything that decides them (source, parameters, trusted headers, target, and the sandbox's
`build_id` — kernel, toolchain and loader), so a repeat verify answers from SQLite in milliseconds.
Infrastructure failures (no sandbox image, no qemu) raise `InfrastructureError`; they are not the
candidate's fault and are never cached.
"""

from __future__ import annotations

import contextvars
import functools
import hashlib
import json
import platform
import re
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from .. import config, store
from ..sandbox import image, scheduler
from ..sandbox.vm import GuestTimeout
from ..errors import BadInput, InfrastructureError
from . import btf as btfmod
from . import verifier
from .compile import compile_source, host_vmlinux_h
from .elfcheck import inspect_object
from .models import Layer1Report, Target, VerifyError
from .source_check import check_source

Progress = Callable[[str, float], None]
CACHE_KIND = "layer1"
CACHE_VERSION = 1  # bump when the report's meaning changes
LOAD_TIMEOUT_S = 60.0  # load + attach + detach in the guest; seconds normally


def _sha(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def _trusted_hash(dirs: tuple[Path, ...]) -> str:
    h = hashlib.sha256()
    for d in dirs:
        for p in sorted(Path(d).rglob("*.h")):
            h.update(str(p.relative_to(d)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


@functools.lru_cache(maxsize=1)
def _code_version() -> str:
    """A hash of layer 1's own code: a changed check must not be answered from an old cache."""
    here = Path(__file__).parent
    return _sha(b"".join(p.read_bytes() for p in sorted(here.glob("*.py"))))[:16]


def cache_key(source_sha: str, params: dict[str, str], target: str, build_id: str,
              trusted: tuple[Path, ...] = (), host_btf_sha: str = "") -> str:
    return _sha(json.dumps({"v": CACHE_VERSION, "code": _code_version(), "src": source_sha,
                            "params": sorted(params.items()),
                            "target": target, "build": build_id, "trusted": _trusted_hash(trusted),
                            "host_btf": host_btf_sha}))


def object_store() -> Path:
    """Where compiled objects are kept by content hash (layer 2 and deploy load them from here)."""
    p = config.home() / "objects"
    p.mkdir(parents=True, exist_ok=True)
    return p


def _save_object(obj: bytes) -> tuple[str, str]:
    sha = _sha(obj)
    path = object_store() / f"{sha}.bpf.o"
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(obj)
        tmp.replace(path)
    return sha, str(path)


class _BootInBackground:
    """Boot a throwaway sandbox VM while the source compiles (the boot is most of a cold verify).

    `get()` waits for it; `cancel()` kills it at once when an earlier stage already rejected the
    candidate, so a compile error is never slowed down by a boot."""

    def __init__(self):
        from ..sandbox.vm import VM

        self.vm = None
        self.error: BaseException | None = None
        self.cancelled = False
        self.t0 = time.monotonic()
        self.boot_s = 0.0

        def boot() -> None:
            try:
                self.vm = VM()
                if not self.cancelled:
                    self.vm.start()
                    self.boot_s = time.monotonic() - self.t0
            except BaseException as e:  # noqa: BLE001 — handed to the caller in get()
                self.error = e
            if self.cancelled and self.vm is not None:
                self.vm.close(graceful=False)

        # in the caller's context: the VM belongs to the caller's job (see vm.current_job)
        self.thread = threading.Thread(target=contextvars.copy_context().run, args=(boot,),
                                       name="schedcp-vm-boot", daemon=True)
        self.thread.start()

    def get(self):
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.vm

    def cancel(self) -> None:
        self.cancelled = True
        vm = self.vm
        if vm is not None:
            vm.kill()  # the booting thread then fails fast and closes it


@contextmanager
def _sandbox_vm(vm, booting: "_BootInBackground | None") -> Iterator[object]:
    """The caller's running VM, or the throwaway one booted for this verify (closed afterwards)."""
    if vm is not None:
        yield vm
        return
    fresh = booting.get()
    try:
        yield fresh
    finally:
        fresh.close()


def verify_source(source: str, *, params: dict[str, str] | None = None, target: Target = "sandbox",
                  trusted_include_dirs: tuple[Path, ...] | list[Path] = (), vm=None,
                  use_cache: bool = True, progress: Progress | None = None,
                  policy: str | None = None) -> Layer1Report:
    """Run layer 1 on BPF C `source` for `target` ("sandbox": the sched_ext VM; "host": this kernel).

    `params` set `const volatile` variables by name (the loader type-checks them against the
    object's BTF), and `map:NAME` entries size map NAME; `trusted_include_dirs` are operator-trusted header directories (CLI `-I`);
    `vm` is an already running sandbox VM to load in (saves the boot).
    """
    say = progress or (lambda msg, frac: None)
    t_start = time.monotonic()
    params = {k: str(v) for k, v in (params or {}).items()}
    trusted = tuple(Path(d).resolve() for d in trusted_include_dirs)
    if target not in ("sandbox", "host"):
        raise BadInput(f"unknown target {target!r}", "use sandbox or host")
    for k, v in params.items():
        if not re.fullmatch(r"(map:)?[A-Za-z_][A-Za-z0-9_]*", k):
            raise BadInput(f"parameter name {k!r} is not a C identifier",
                           "parameters are `const volatile` globals of the scheduler, set by name; "
                           "map:NAME=N sizes map NAME")
        if k.startswith(scheduler.MAP_SIZE_PREFIX) and not (re.fullmatch(r"[0-9]{1,10}", v)
                                                           and 0 < int(v) < 2**32):
            raise BadInput(f"map size {k}={v!r} is not a positive 32-bit integer",
                           "map:NAME=N sets the max_entries of map NAME")
    r = Layer1Report(verdict="rejected", stage="source_check", source_sha256=_sha(source),
                     params=params, target=target, policy=policy)

    def finish(stage: str, verdict: str = "rejected") -> Layer1Report:
        r.stage, r.verdict = stage, verdict
        r.total_s = round(time.monotonic() - t_start, 4)
        return r

    def timed(stage: str, t0: float) -> None:
        r.durations[stage] = round(r.durations.get(stage, 0) + time.monotonic() - t0, 4)

    # 1. untrusted-source checks: before anything else, no sandbox needed
    t0 = time.monotonic()
    say("checking the source", 0.0)
    r.errors = check_source(source, trusted_include_dirs=trusted)
    timed("source_check", t0)
    if r.errors:
        known = image.load_manifest() if target == "sandbox" else None  # (never builds)
        r.kernel_version = known.kernel_version if known else (platform.release() if target == "host" else None)
        return finish("source_check")

    if target == "host" and (missing := scheduler.host_missing()):
        # before compiling: the host target loads into this kernel, which must have sched_ext
        raise InfrastructureError(f"the host kernel {platform.release()} cannot load sched_ext "
                                  "schedulers: " + "; ".join(missing),
                                  "use --target sandbox (a VM with a sched_ext kernel)")

    # the image (kernel, toolchain, loader) decides the result: its build_id is in the cache key
    t0 = time.monotonic()
    manifest = image.ensure(progress=progress)
    if target == "sandbox":
        btf_path, kernel_version, host_btf_sha = Path(manifest.paths.vmlinux_btf), manifest.kernel_version, ""
    else:
        btf_path, kernel_version = btfmod.HOST_BTF, platform.release()
        host_btf_sha = _sha(btf_path.read_bytes()) if btf_path.exists() else ""
    r.kernel_version = kernel_version
    key = cache_key(r.source_sha256, params, target, manifest.build_id, trusted, host_btf_sha)
    timed("setup", t0)
    if use_cache:
        hit = store.cache_get(key)
        if hit is not None and hit.get("object_path") and not Path(hit["object_path"]).exists():
            hit = None  # the object was removed: layer 2 needs it, so build it again
        if hit is not None:
            cached = Layer1Report.model_validate(hit)
            cached.cached = True
            cached.policy = policy
            cached.total_s = round(time.monotonic() - t_start, 4)
            return cached

    # a cold sandbox verify: boot the VM while the cheaper stages run
    booting = _BootInBackground() if target == "sandbox" and vm is None else None

    def done(stage: str, verdict: str = "rejected") -> Layer1Report:
        if booting is not None and stage not in ("done", "verifier", "attach", "init"):
            booting.cancel()  # rejected before the VM was needed: do not wait for the boot
        report = finish(stage, verdict)
        if verdict != "error":
            store.cache_put(key, CACHE_KIND, report.model_dump(mode="json"))
        return report

    def stages() -> Layer1Report:
        # 2. compile in the toolchain chroot
        t0 = time.monotonic()
        say("compiling", 0.1)
        c = compile_source(source, manifest, trusted_include_dirs=trusted,
                           vmlinux_h=host_vmlinux_h(btf_path) if target == "host" else None)
        timed("compile", t0)
        r.warnings += c.warnings
        if not c.ok:
            r.errors = c.errors
            return done("compile")
        r.object_sha256, r.object_path = _save_object(c.object)

        # 3. what the object holds
        t0 = time.monotonic()
        say("checking the object", 0.4)
        info = inspect_object(c.object)
        r.ops_name, r.callbacks, r.license = info.ops_name, info.callbacks, info.license
        r.programs, r.hot_path_insns = info.programs, info.hot_path_insns
        r.kfuncs = sorted(set(info.kfuncs))
        timed("elf", t0)
        r.errors = [e for e in info.errors if e.severity == "error"]
        r.warnings += [e for e in info.errors if e.severity != "error"]
        if r.errors:
            return done("elf")

        # 4. against the target kernel's BTF: kfuncs, ops members, helpers
        t0 = time.monotonic()
        say("checking kfuncs against the kernel's BTF", 0.5)
        facts = btfmod.kernel_facts(btf_path)
        r.helpers = [facts.helper_ids.get(h, f"helper#{h}") for h in info.helper_ids]
        ops_type = info.ops_type or "sched_ext_ops"
        if not facts.has_sched_ext:
            raise InfrastructureError(f"the {target} kernel {kernel_version} has no sched_ext "
                                      "(no struct sched_ext_ops in its BTF)",
                                      "use --target sandbox" if target == "host" else
                                      "rebuild the sandbox: schedcp sandbox build --force")
        if ops_type not in facts.ops_members:
            r.errors.append(VerifyError(stage="btf", code="no_ops_type",
                                        message=f"kernel {kernel_version} has no struct {ops_type} "
                                        "(the scheduler needs a newer sched_ext)"))
        else:
            members = set(facts.ops_members[ops_type])
            r.missing_callbacks = [cb for cb in info.callbacks if cb not in members]
            for cb in r.missing_callbacks:
                r.errors.append(VerifyError(stage="btf", code="missing_callback",
                                            message=f"callback .{cb} is not a member of struct {ops_type} "
                                            f"in kernel {kernel_version}"))
        r.missing_kfuncs = [k for k in info.kfuncs if not facts.has_kfunc(k)]
        for k in r.missing_kfuncs:
            users = info.kfunc_callers.get(k) or [None]
            r.errors.append(VerifyError(stage="btf", code="missing_kfunc", program=users[0],
                                        message=f"kfunc {k} does not exist in kernel {kernel_version}"))
        for h in info.helper_ids:
            if h not in facts.helper_ids:
                r.errors.append(VerifyError(stage="btf", code="unknown_helper",
                                            message=f"BPF helper #{h} is unknown to kernel {kernel_version}"))
        timed("btf", t0)
        if r.errors:
            return done("btf")

        # 5. the real kernel verifier (sandbox: load, attach, detach; host: load only)
        t0 = time.monotonic()
        if target == "sandbox":
            if booting is not None:
                say("waiting for the sandbox VM to boot", 0.7)
            with _sandbox_vm(vm, booting) as v:
                timed("vm_wait", t0)
                if booting is not None:
                    r.durations["vm_boot"] = round(booting.boot_s, 4)
                t0 = time.monotonic()
                say("loading in the sandbox kernel (verifier)", 0.8)
                if not v.alive:
                    raise InfrastructureError("the sandbox VM given for this verify is not running",
                                              "start a new one (or pass none: a throwaway VM boots)")
                try:
                    verdict = verifier.run_in_vm(v, c.object, params, timeout_s=LOAD_TIMEOUT_S)
                except InfrastructureError as e:
                    if v.alive and not isinstance(e, GuestTimeout):
                        raise
                    # the guest hung or its kernel died while loading this object: say so in
                    # the report, with the kernel's last words (not cached: it may be the host)
                    timed("verifier", t0)
                    r.errors = [VerifyError(stage="verifier", message=e.message,
                                            code="timeout" if isinstance(e, GuestTimeout) else "guest_crashed")]
                    r.verifier_log = _kernel_last_words(v.console())
                    return finish("verifier", "error")
        else:
            say("loading in the host kernel (verifier)", 0.8)
            obj_path = Path(r.object_path)
            verdict = verifier.run_on_host(obj_path, params, loader=Path(manifest.paths.loader))
            r.warnings.append(VerifyError(
                stage="verifier", code="load_only", severity="note",
                message="on the host the object was loaded (every program through the kernel "
                "verifier) and unloaded without attaching: its init and runtime were not exercised; "
                "layer 2 (schedcp validate) runs it in the sandbox"))
        timed("verifier", t0)
        r.verifier_log = verdict.log
        r.verifier_accepted, r.exit = verdict.verifier_accepted, verdict.exit
        for p in r.programs:
            p.verified_insns = verdict.verified_insns.get(p.name)
        if not verdict.accepted:
            r.errors = verdict.errors
            if any(e.code in ("bad_param", "loader_usage") for e in r.errors):
                return finish("verifier", "rejected")  # a bad parameter: not worth caching
            if any(e.code == "no_sched_ext" for e in r.errors):
                raise InfrastructureError(f"the {target} kernel has no sched_ext: {r.errors[0].message}")
            return done(verdict.stage)
        say("accepted", 1.0)
        return done("done", "accepted")

    try:
        return stages()
    finally:
        if booting is not None:
            booting.cancel()  # a no-op when the VM was used (it is closed by then)


def _kernel_last_words(console: str, lines: int = 60) -> str:
    """The guest console from the first oops/panic line on (or its tail)."""
    text = console.splitlines()
    start = next((i for i, ln in enumerate(text)
                  if re.search(r"\] (BUG|Oops|general protection|Kernel panic|WARNING)", ln)), None)
    return "\n".join(text[start:start + lines] if start is not None else text[-lines:])


def verify_policy(name: str, params: dict[str, str] | None = None, **kw) -> Layer1Report:
    """Layer 1 for a repository policy: parameters are type- and range-checked against its
    policy.json (defaults fill the rest) before the source is verified."""
    from ..repository.policies import get_policy

    p = get_policy(name)
    source = p.source_text()
    if source is None:
        raise BadInput(f"policy {name} has no BPF source here ({p.kind})",
                       "only schedcp policies can be verified; scx ones run from their own binary")
    return verify_source(source, params=p.loader_params(params), policy=name, **kw)
