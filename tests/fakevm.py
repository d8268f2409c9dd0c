"""A FAKE sandbox VM for logic tests: it plays guest answers recorded once from the real VM, like an
HTTP mock transport plays recorded responses. The real-VM tests stay; this one lets the runner's round
plan, the gates, deploy and the monitor run in the fast suite, without the image or a boot.

A request is matched on its normalised command (`key`): a runner step by the phases it snaps and
the workloads it runs (`step baseline-# hackbench pipe`: round numbers dropped, so a fifth round
replays what the recorded rounds answered), any other script by its text with the shared prelude
dropped and whitespace collapsed. Answers of one key are played in recorded order; once they are used
up the last one is played again (a state the monitor polls, a round beyond the recorded ones). A
request nothing was recorded for fails the test (pytest.fail: not an Exception, so no product
`except Exception` can turn it into a verdict). `calls` lists the keys asked, in order: what a test
asserts on. `clock` advances by each answer's recorded duration, so a runner whose `time` is this
clock spends its budget as the recorded run did.

Record (once, with the built image; nice 19 on a shared machine):
    .venv/bin/python tests/fakevm.py record [scenario ...]
writes tests/data/fakevm/<scenario>.json.gz (see SCENARIOS): the meta of the run and, per request, the
script (without the shared prelude), the names of the files sent and the answer.
"""

from __future__ import annotations

import base64
import gzip
import json
import re
import sys
import time
from pathlib import Path
from types import SimpleNamespace

DATA = Path(__file__).parent / "data" / "fakevm"


# ---------------------------------------------------------------- matching


def body(script: str) -> str:
    """The script without the shared shell prelude (the runner's or the scheduler helpers')."""
    from schedcp_mcp.sandbox import scheduler
    from schedcp_mcp.validate import runner

    for prelude in (runner.LIB, scheduler.PRELUDE):
        if script.startswith(prelude):
            return script[len(prelude):]
    return script


def key(script: str) -> str:
    """The normalised command a recorded answer is found by."""
    script = body(script)
    phases = re.findall(r"(?:^|[;&|]\s*)snap ([\w-]+)", script, re.M)
    if phases:  # a runner step: its phases (round numbers dropped) and the workloads it runs
        names = re.findall(r"^echo '@@B (\S+)'", script, re.M)
        ph = list(dict.fromkeys(re.sub(r"-\d+$", "-#", p) for p in phases))
        return " ".join(["step", *ph, *dict.fromkeys(names)])
    return " ".join(script.split())


class FakeClock:
    """time.monotonic() of a replay: it moves only when the fake VM answers."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s


# ---------------------------------------------------------------- replay


class FakeVM:
    """A fake of sandbox.vm.VM: plays a recorded transcript (see the module docstring). Besides run()
    it has what the runner and the deploy target touch: full, alive, kill, close, console, detach,
    kernel_version, and `named()`: a stand-in for the VM class's named-VM methods (deploy.targets)."""

    def __init__(self, scenario: str, edit=None, hang: str | None = None):
        t = json.loads(gzip.decompress((DATA / f"{scenario}.json.gz").read_bytes()))
        self.meta = t["meta"]
        self.exchanges = t["exchanges"]
        for x in self.exchanges:  # matched by today's normalisation of the recorded script
            x["key"] = key(x["script"])
        self.used = [False] * len(self.exchanges)
        self.edit = edit  # (key, answer dict) -> answer dict: a test's variation of a recorded answer
        self.hang = hang  # a key prefix: the guest stops answering there (GuestTimeout, the VM killed)
        self.calls: list[str] = []
        self.files: list[list[str]] = []
        self.clock = FakeClock()
        self.full, self.kernel_version, self.name = True, self.meta.get("kernel_version", ""), None
        self._alive, self.running_named = True, True

    def run(self, script: str, files: dict[str, bytes] | None = None, timeout_s: float = 60.0,
            outputs: list[str] | None = None):
        from schedcp_mcp.sandbox.vm import GuestResult, GuestTimeout, InfrastructureError

        if not self._alive:
            raise InfrastructureError("the sandbox VM is not running")
        k = key(script)
        self.calls.append(k)
        self.files.append(sorted(files or {}))
        if self.hang is not None and k.startswith(self.hang):  # as vm.run does on a timeout
            self.clock.now += timeout_s
            self._alive = False
            raise GuestTimeout(f"the guest command did not finish within {timeout_s:.0f} s; the VM was killed")
        same = [i for i, x in enumerate(self.exchanges) if x["key"] == k]
        if not same:
            import pytest

            pytest.fail(f"fake VM: nothing recorded for {k[:300]!r} (re-record: python tests/fakevm.py record)")
        i = next((i for i in same if not self.used[i]), same[-1])
        self.used[i] = True
        a = dict(self.exchanges[i])
        if self.edit is not None:
            a = self.edit(k, a)
        self.clock.now += a["duration_s"]
        return GuestResult(rc=a["rc"], stdout=a["stdout"], stderr=a["stderr"], duration_s=a["duration_s"],
                           outputs={n: base64.b64decode(v) for n, v in a.get("outputs", {}).items()})

    @property
    def alive(self) -> bool:
        return self._alive

    def kill(self) -> None:
        self._alive = False

    def close(self, graceful: bool = True) -> None:
        self._alive = False

    def console(self) -> str:
        return self.meta.get("console", "")

    def dmesg(self) -> str:
        return self.run("dmesg", timeout_s=30).stdout

    def detach(self) -> None:
        pass

    def named(self, build_id: str = "fake-build"):
        """What deploy.targets uses of the VM class (named_status, start_named, attach, stop_named),
        all answering with this one fake staging VM."""
        fake = self

        class Named:
            @staticmethod
            def named_status(name):
                return {"name": name, "build_id": build_id} if fake.running_named else None

            @staticmethod
            def start_named(name, **kw):
                fake.running_named = True
                return fake

            @staticmethod
            def attach(name, wait_s=60.0):
                return fake

            @staticmethod
            def stop_named(name, timeout_s=15.0):
                was, fake.running_named = fake.running_named, False
                return was

        return Named


def fake_image(build_id: str = "fake-build"):
    """What deploy.targets reads of the image module: ensure().build_id (no image is built)."""
    return SimpleNamespace(ensure=lambda *a, **k: SimpleNamespace(build_id=build_id))


# ---------------------------------------------------------------- recording (real VM, once)


class Recorder:
    """Wraps a real VM: every run() goes to it and is written down (request key, answer, duration)."""

    def __init__(self, vm, exchanges: list[dict]):
        self._vm, self._ex = vm, exchanges

    def run(self, script: str, files=None, timeout_s: float = 60.0, outputs=None):
        r = self._vm.run(script, files=files, timeout_s=timeout_s, outputs=outputs)
        self._ex.append({"script": body(script), "files": sorted(files or {}), "rc": r.rc, "stdout": r.stdout,
                         "stderr": r.stderr, "duration_s": round(r.duration_s, 3),
                         "outputs": {n: base64.b64encode(v).decode() for n, v in r.outputs.items()}})
        return r

    def dmesg(self) -> str:
        return self.run("dmesg", timeout_s=30).stdout

    def __getattr__(self, name):
        return getattr(self._vm, name)


def _write(scenario: str, meta: dict, exchanges: list[dict]) -> None:
    DATA.mkdir(parents=True, exist_ok=True)
    path = DATA / f"{scenario}.json.gz"  # gzip: the starvation phase's map dumps are ~0.5 MB of JSON
    path.write_bytes(gzip.compress(json.dumps({"meta": meta, "exchanges": exchanges}).encode(), 9, mtime=0))
    print(f"{path}: {len(exchanges)} exchanges, {path.stat().st_size} bytes", flush=True)


def _record_validation(vm, scenario: str, source: str | None, policy: str | None, workloads: list[str],
                       rounds: int) -> None:
    from schedcp_mcp.validate.runner import validate_layer1
    from schedcp_mcp.verify.pipeline import verify_policy, verify_source

    l1 = verify_policy(policy, vm=vm) if policy else verify_source(source, vm=vm)
    assert l1.accepted, l1.errors
    ex: list[dict] = []
    res = validate_layer1(l1, rounds=rounds, budget_s=0, vm=Recorder(vm, ex), workloads=workloads)
    from schedcp_mcp.validate.workloads import get_workloads

    _write(scenario, {"recorded_at": time.strftime("%Y-%m-%d"), "ops_name": l1.ops_name, "params": l1.params,
                      "workloads": workloads, "rounds": rounds, "kernel_version": vm.kernel_version,
                      # the runs per side a step's answer holds: replayed with the same (workloads.py may change)
                      "reps": {w.name: w.reps for w in get_workloads(workloads)},
                      "passed": res.passed, "failure_reason": res.failure_reason}, ex)


def _record_deploy(scenario: str) -> None:
    """deploy fifo to the staging VM, a good metric then a bad one, the monitor rolls it back."""
    import hashlib

    from schedcp_mcp.deploy import deployments, monitor, targets, tokens
    from schedcp_mcp.models import MonitorPolicy
    from schedcp_mcp.reports import new_report, save
    from schedcp_mcp.sandbox.vm import VM
    from schedcp_mcp.validate.models import Layer2Result
    from schedcp_mcp.verify.pipeline import verify_policy

    ex: list[dict] = []

    class RecordingVM:  # the VM class as deploy.targets uses it, every named VM wrapped
        named_status = staticmethod(VM.named_status)
        stop_named = staticmethod(VM.stop_named)

        @staticmethod
        def start_named(name, **kw):
            return Recorder(VM.start_named(name, **kw), ex)

        @staticmethod
        def attach(name, wait_s=60.0):
            return Recorder(VM.attach(name, wait_s=wait_s), ex)

    l1 = verify_policy("fifo")
    assert l1.accepted, l1.errors
    r = new_report(l1, policy="fifo", params=l1.params)
    r.layer2 = Layer2Result(passed=True, ops_name=l1.ops_name)
    save(r)
    targets.VM = RecordingVM
    t = targets.SandboxTarget()
    try:
        t.sh("echo 1.0 > /run/schedcp-metric")
        mon = MonitorPolicy(metric_cmd="cat /run/schedcp-metric", interval_s=1, consecutive=2)
        d = deployments.deploy(tokens.issue(r.id).token, "sandbox", monitor=mon, start_monitor=False)
        monitor.monitor_loop(d.id, max_samples=1)   # a good reading
        t.sh("echo 5.0 > /run/schedcp-metric")      # the scheduler "hurts" the metric
        d = monitor.monitor_loop(d.id, max_samples=5)
        assert d.status == "rolled_back", d
        _write(scenario, {"recorded_at": time.strftime("%Y-%m-%d"), "ops_name": l1.ops_name, "params": l1.params,
                          "object_sha256": hashlib.sha256(Path(l1.object_path).read_bytes()).hexdigest(),
                          "end_reason": d.end_reason}, ex)
    finally:
        VM.stop_named(targets.STAGING)


FIX = Path(__file__).parent / "fixtures" / "bpf_l2"
#: scenario -> (policy, source, workloads, rounds); "deploy" is the staging-VM flow
SCENARIOS = {
    "validate_fifo": ("fifo", None, ["hackbench", "pipe"], 3),
    "validate_stall": (None, FIX / "stall.bpf.c", ["hackbench"], 1),
    "validate_starve_timer": (None, FIX / "starve_timer.bpf.c", ["hackbench"], 1),
    "deploy": None,
}


def main(argv: list[str]) -> None:
    import os
    import tempfile

    if argv[:1] != ["record"]:
        sys.exit(__doc__)
    # the shared image, read where it is; the records of this run go to a home of its own
    os.environ.setdefault("SCHEDCP_SANDBOX_DIR", str(Path.home() / ".local/share/schedcp/sandbox"))
    os.environ["SCHEDCP_HOME"] = tempfile.mkdtemp(prefix="schedcp-fakevm-rec-")
    from schedcp_mcp.sandbox.vm import VM

    names = argv[1:] or list(SCENARIOS)
    vms = [n for n in names if SCENARIOS[n] is not None]
    if vms:
        with VM(full=True) as vm:
            for n in vms:
                policy, src, wls, rounds = SCENARIOS[n]
                if not vm.alive:
                    sys.exit(f"the VM died before {n}")
                _record_validation(vm, n, src.read_text() if src else None, policy, wls, rounds)
    if "deploy" in names:
        _record_deploy("deploy")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main(sys.argv[1:])
