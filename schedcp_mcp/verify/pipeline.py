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
from ..repository.policies import get_policy
from ..sandbox.vm import VM, GuestTimeout, restore_enabled
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


PACKAGE = Path(__file__).parent.parent


def source_files(*dirs: str) -> list[Path]:
    """The package's sources under `dirs` (Python, C, headers, shell), sorted: what a verdict's code is."""
    return [p for d in dirs for p in sorted((PACKAGE / d).rglob("*")) if p.suffix in (".py", ".c", ".h", ".sh")]


def files_hash(files: list[Path]) -> str:
    """A short hash of files' paths (relative to the package) and contents: a code version for cache
    and job keys, so a changed check is never answered from an older result."""
    h = hashlib.sha256()
    for p in files:
        h.update(str(p.relative_to(PACKAGE)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]


def code_files() -> list[Path]:
    """What layer 1's verdict depends on besides its input: verify/ and sandbox/ (sources of both)."""
    return source_files("verify", "sandbox")


@functools.lru_cache(maxsize=1)
def _code_version() -> str:
    """A hash of layer 1's own code and of the sandbox that runs it (the loader, its watchdog, the
    VM): a changed check must not be answered from an old cache (a layer-1 watchdog change was once
    answered with the old verdict until --no-cache)."""
    return files_hash(code_files())


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


def stored_bytes(sha: str | None, suffix: str) -> bytes | None:
    """`<sha><suffix>` from the object store by its hash (never a path a record names), only if its
    bytes still hash to it. A compiled object (.bpf.o) or a scheduler program (.prog)."""
    if not sha or not re.fullmatch(r"[0-9a-f]{64}", sha):
        return None
    try:
        data = (object_store() / f"{sha}{suffix}").read_bytes()
    except OSError:
        return None
    return data if hashlib.sha256(data).hexdigest() == sha else None


def _save_object(obj: bytes) -> tuple[str, str]:
    sha = _sha(obj)
    path = object_store() / f"{sha}.bpf.o"
    if not path.exists():
        config.write_private(path, obj)  # a fresh file renamed in: never through a symlink
    return sha, str(path)


class _BootInBackground:
    """Start a throwaway sandbox VM while the source compiles (the boot is most of a cold verify):
    restored from the image's saved idle-guest state when there is a usable one (see
    sandbox/vmstate.py), else booted (and the state saved for the next verify).

    `get()` waits for it; `cancel()` kills it at once when an earlier stage already rejected the
    candidate, so a compile error is never slowed down by a boot."""

    def __init__(self):
        self.vm = None
        self.error: BaseException | None = None
        self.cancelled = False
        self.t0 = time.monotonic()
        self.boot_s = 0.0

        def boot() -> None:
            try:
                self.vm = VM(restore=restore_enabled())
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
    object's BTF), and `map:NAME` entries size map NAME; `trusted_include_dirs` are operator-trusted
    header directories (CLI `-I`); `vm` is an already running sandbox VM to load in (saves the boot).
    """
    if target not in ("sandbox", "host"):
        raise BadInput(f"unknown target {target!r}", "use sandbox or host")
    run = _Layer1(source, _checked_params(params), target,
                  tuple(Path(d).resolve() for d in trusted_include_dirs), policy,
                  progress or (lambda msg, frac: None))
    if not run.source_ok():
        return run.finish("source_check")
    if target == "host" and (missing := scheduler.host_missing()):
        # before compiling: the host target loads into this kernel, which must have sched_ext
        raise InfrastructureError(f"the host kernel {platform.release()} cannot load sched_ext "
                                  "schedulers: " + "; ".join(missing),
                                  "use --target sandbox (a VM with a sched_ext kernel)")
    run.setup()
    if use_cache and (hit := run.cached()) is not None:
        return hit
    # a cold sandbox verify: boot the VM while the cheaper stages run
    run.booting = _BootInBackground() if target == "sandbox" and vm is None else None
    try:
        return run.stages(vm)
    finally:
        if run.booting is not None:
            run.booting.cancel()  # a no-op when the VM was used (it is closed by then)


def _checked_params(params: dict[str, str] | None) -> dict[str, str]:
    params = {k: str(v) for k, v in (params or {}).items()}
    for k, v in params.items():
        if not re.fullmatch(r"(map:)?[A-Za-z_][A-Za-z0-9_]*", k):
            raise BadInput(f"parameter name {k!r} is not a C identifier",
                           "parameters are `const volatile` globals of the scheduler, set by name; "
                           "map:NAME=N sizes map NAME")
        if k.startswith(scheduler.MAP_SIZE_PREFIX) and not (re.fullmatch(r"[0-9]{1,10}", v)
                                                           and 0 < int(v) < 2**32):
            raise BadInput(f"map size {k}={v!r} is not a positive 32-bit integer",
                           "map:NAME=N sets the max_entries of map NAME")
    return params


class _Layer1:
    """One layer-1 run: the report it fills, stage by stage, with each stage's time."""

    def __init__(self, source: str, params: dict[str, str], target: Target, trusted: tuple[Path, ...],
                 policy: str | None, say: Progress):
        self.source, self.params, self.target, self.trusted, self.say = source, params, target, trusted, say
        self.t_start = time.monotonic()
        self.r = Layer1Report(verdict="rejected", stage="source_check", source_sha256=_sha(source),
                              params=params, target=target, policy=policy)
        self.booting: _BootInBackground | None = None
        self.key = ""

    def finish(self, stage: str, verdict: str = "rejected") -> Layer1Report:
        self.r.stage, self.r.verdict = stage, verdict
        self.r.total_s = round(time.monotonic() - self.t_start, 4)
        return self.r

    def done(self, stage: str, verdict: str = "rejected") -> Layer1Report:
        """Finish, and cache the verdict (a verdict is about the candidate; errors are not)."""
        if self.booting is not None and stage not in ("done", "verifier", "attach", "init"):
            self.booting.cancel()  # rejected before the VM was needed: do not wait for the boot
        report = self.finish(stage, verdict)
        if verdict != "error":
            store.cache_put(self.key, CACHE_KIND, report.model_dump(mode="json"))
        return report

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.r.durations[stage] = round(self.r.durations.get(stage, 0) + time.monotonic() - t0, 4)

    # 1. untrusted-source checks: before anything else, no sandbox needed
    def source_ok(self) -> bool:
        self.say("checking the source", 0.0)
        with self.timed("source_check"):
            self.r.errors = check_source(self.source, trusted_include_dirs=self.trusted)
        if self.r.errors:
            known = image.load_manifest() if self.target == "sandbox" else None  # (never builds)
            self.r.kernel_version = known.kernel_version if known else (
                platform.release() if self.target == "host" else None)
        return not self.r.errors

    # the image (kernel, toolchain, loader) decides the result: its build_id is in the cache key
    def setup(self) -> None:
        with self.timed("setup"):
            self.manifest = image.ensure(progress=self.say)
            if self.target == "sandbox":
                self.btf_path, host_btf_sha = Path(self.manifest.paths.vmlinux_btf), ""
                self.r.kernel_version = self.manifest.kernel_version
            else:
                self.btf_path, self.r.kernel_version = btfmod.HOST_BTF, platform.release()
                host_btf_sha = _sha(self.btf_path.read_bytes()) if self.btf_path.exists() else ""
            self.key = cache_key(self.r.source_sha256, self.params, self.target, self.manifest.build_id,
                                 self.trusted, host_btf_sha)

    def cached(self) -> Layer1Report | None:
        hit = store.cache_get(self.key)
        if hit is None or (hit.get("object_path") and not Path(hit["object_path"]).exists()):
            return None  # an object that was removed: layer 2 needs it, so build it again
        cached = Layer1Report.model_validate(hit)
        cached.cached, cached.policy = True, self.r.policy
        cached.total_s = round(time.monotonic() - self.t_start, 4)
        return cached

    def stages(self, vm) -> Layer1Report:
        c = self.compile()
        if c is None:
            return self.done("compile")
        info = self.inspect(c.object)
        if self.r.errors:
            return self.done("elf")
        self.check_btf(info)
        if self.r.errors:
            return self.done("btf")
        verdict = self.load(c.object, vm)
        if verdict is None:
            return self.finish("verifier", "error")  # the guest hung or died: not cached
        if not verdict.accepted:
            self.r.errors = verdict.errors
            if any(e.code in ("bad_param", "loader_usage") for e in self.r.errors):
                return self.finish("verifier", "rejected")  # a bad parameter: not worth caching
            if any(e.code == "no_sched_ext" for e in self.r.errors):
                raise InfrastructureError(f"the {self.target} kernel has no sched_ext: {self.r.errors[0].message}")
            return self.done(verdict.stage)
        self.say("accepted", 1.0)
        return self.done("done", "accepted")

    # 2. compile in the toolchain chroot
    def compile(self):
        self.say("compiling", 0.1)
        with self.timed("compile"):
            c = compile_source(self.source, self.manifest, trusted_include_dirs=self.trusted,
                               vmlinux_h=host_vmlinux_h(self.btf_path) if self.target == "host" else None)
        self.r.warnings += c.warnings
        if not c.ok:
            self.r.errors = c.errors
            return None
        self.r.object_sha256, self.r.object_path = _save_object(c.object)
        return c

    # 3. what the object holds
    def inspect(self, obj: bytes):
        r = self.r
        self.say("checking the object", 0.4)
        with self.timed("elf"):
            info = inspect_object(obj)
        r.ops_name, r.callbacks, r.license = info.ops_name, info.callbacks, info.license
        r.programs, r.hot_path_insns = info.programs, info.hot_path_insns
        r.kfuncs = sorted(set(info.kfuncs))
        r.errors = [e for e in info.errors if e.severity == "error"]
        r.warnings += [e for e in info.errors if e.severity != "error"]
        return info

    # 4. against the target kernel's BTF: kfuncs, ops members, helpers
    def check_btf(self, info) -> None:
        r, kv = self.r, self.r.kernel_version
        self.say("checking kfuncs against the kernel's BTF", 0.5)
        with self.timed("btf"):
            facts = btfmod.kernel_facts(self.btf_path)
        r.helpers = [facts.helper_ids.get(h, f"helper#{h}") for h in info.helper_ids]
        ops_type = info.ops_type or "sched_ext_ops"
        if not facts.has_sched_ext:
            raise InfrastructureError(f"the {self.target} kernel {kv} has no sched_ext "
                                      "(no struct sched_ext_ops in its BTF)",
                                      "use --target sandbox" if self.target == "host" else
                                      "rebuild the sandbox: schedcp sandbox build --force")
        if ops_type not in facts.ops_members:
            r.errors.append(VerifyError(stage="btf", code="no_ops_type",
                                        message=f"kernel {kv} has no struct {ops_type} "
                                        "(the scheduler needs a newer sched_ext)"))
        else:
            members = set(facts.ops_members[ops_type])
            r.missing_callbacks = [cb for cb in info.callbacks if cb not in members]
            for cb in r.missing_callbacks:
                r.errors.append(VerifyError(stage="btf", code="missing_callback",
                                            message=f"callback .{cb} is not a member of struct {ops_type} "
                                            f"in kernel {kv}"))
        r.missing_kfuncs = [k for k in info.kfuncs if not facts.has_kfunc(k)]
        for k in r.missing_kfuncs:
            users = info.kfunc_callers.get(k) or [None]
            r.errors.append(VerifyError(stage="btf", code="missing_kfunc", program=users[0],
                                        message=f"kfunc {k} does not exist in kernel {kv}"))
        for h in info.helper_ids:
            if h not in facts.helper_ids:
                r.errors.append(VerifyError(stage="btf", code="unknown_helper",
                                            message=f"BPF helper #{h} is unknown to kernel {kv}"))

    # 5. the real kernel verifier (sandbox: load, attach, detach; host: load only)
    def load(self, obj: bytes, vm) -> verifier.VerifierVerdict | None:
        verdict = self._load_in_sandbox(obj, vm) if self.target == "sandbox" else self._load_on_host()
        if verdict is None:
            return None
        r = self.r
        r.verifier_log = verdict.log
        r.verifier_accepted, r.exit = verdict.verifier_accepted, verdict.exit
        for p in r.programs:
            p.verified_insns = verdict.verified_insns.get(p.name)
        return verdict

    def _load_in_sandbox(self, obj: bytes, vm) -> verifier.VerifierVerdict | None:
        t0 = time.monotonic()
        if self.booting is not None:
            self.say("waiting for the sandbox VM to boot", 0.7)
        with _sandbox_vm(vm, self.booting) as v:
            self.r.durations["vm_wait"] = round(time.monotonic() - t0, 4)
            if self.booting is not None:
                # the VM's start: vm_restore when restored from a saved state, vm_boot when booted
                path = "vm_restore" if v.boot_path == "restore" else "vm_boot"
                self.r.durations[path] = round(self.booting.boot_s, 4)
                if v.state_save_s:
                    self.r.durations["vm_state_save"] = round(v.state_save_s, 4)
            self.say("loading in the sandbox kernel (verifier)", 0.8)
            if not v.alive:
                raise InfrastructureError("the sandbox VM given for this verify is not running",
                                          "start a new one (or pass none: a throwaway VM boots)")
            with self.timed("verifier"):
                try:
                    return verifier.run_in_vm(v, obj, self.params, timeout_s=LOAD_TIMEOUT_S)
                except InfrastructureError as e:
                    if v.alive and not isinstance(e, GuestTimeout):
                        raise
                    # the guest hung or its kernel died while loading this object: say so in
                    # the report, with the kernel's last words (not cached: it may be the host)
                    self.r.errors = [VerifyError(stage="verifier", message=e.message,
                                                 code="timeout" if isinstance(e, GuestTimeout) else "guest_crashed")]
                    self.r.verifier_log = _kernel_last_words(v.console())
                    return None

    def _load_on_host(self) -> verifier.VerifierVerdict:
        self.say("loading in the host kernel (verifier)", 0.8)
        with self.timed("verifier"):
            verdict = verifier.run_on_host(Path(self.r.object_path), self.params,
                                           loader=Path(self.manifest.paths.loader))
        self.r.warnings.append(VerifyError(
            stage="verifier", code="load_only", severity="note",
            message="on the host the object was loaded (every program through the kernel "
            "verifier) and unloaded without attaching: its init and runtime were not exercised; "
            "layer 2 (schedcp validate) runs it in the sandbox"))
        return verdict


def _kernel_last_words(console: str, lines: int = 60) -> str:
    """The guest console from the first oops/panic line on (or its tail)."""
    text = console.splitlines()
    start = next((i for i, ln in enumerate(text)
                  if re.search(r"\] (BUG|Oops|general protection|Kernel panic|WARNING)", ln)), None)
    return "\n".join(text[start:start + lines] if start is not None else text[-lines:])


def verify_policy(name: str, params: dict[str, str] | None = None, **kw) -> Layer1Report:
    """Layer 1 for a repository policy: parameters are type- and range-checked against its
    policy.json (defaults fill the rest) before the source is verified."""
    p = get_policy(name)
    source = p.source_text()
    if source is None:
        raise BadInput(f"policy {name} has no BPF source here ({p.kind})",
                       "only schedcp policies can be verified; scx ones run from their own binary")
    return verify_source(source, params=p.loader_params(params), policy=name, **kw)
