"""What crosses machines with a fleet job (`jobs/carry.py`), between two real stores on this machine
(two $SCHEDCP_HOMEs): a report with its compiled object (compiled here by the sandbox's clang) and
its source, and the profile it refers to. The Celery round trip is tests/test_fleet.py's."""

from __future__ import annotations

import hashlib

from schedcp_mcp import store
from schedcp_mcp.jobs import carry
from schedcp_mcp.models import Goal
from schedcp_mcp.observe.profile import get_profile, profile_workload
from schedcp_mcp.reports import get_report, new_report, save_source, source_for
from schedcp_mcp.repository.policies import get_policy
from schedcp_mcp.verify.compile import compile_source
from schedcp_mcp.verify.models import Layer1Report
from schedcp_mcp.verify.pipeline import _save_object


def test_a_report_its_object_source_and_profile_move_to_another_store(manifest, tmp_path, monkeypatch):
    src = get_policy("fifo").source_text()
    obj = compile_source(src, manifest).object
    assert obj and obj[:4] == b"\x7fELF"
    sha, path = _save_object(obj)
    save_source(src)
    l1 = Layer1Report(verdict="accepted", stage="done", source_sha256=hashlib.sha256(src.encode()).hexdigest(),
                      object_sha256=sha, object_path=path, ops_name="fifo")
    goal = Goal(metric="messaging_time_s", direction="lower", target_ratio=0.9, why="test")
    prof = profile_workload(["sleep", "0.3"], duration_s=1)
    r = new_report(l1, policy=None, params={"slice_ns": "5000000"}, profile_id=prof.id, goals=[goal])
    assert carry.referred({"report_id": "job-0123456789"}).records == []  # not a record: nothing
    b = carry.referred({"candidate": {"report_id": r.id}, "other": [1, "x"]})
    assert [x["id"] for x in b.records] == [r.id, prof.id]  # the report, and the profile it refers to
    assert list(b.objects) == [sha] and list(b.sources) == [l1.source_sha256]

    there = tmp_path / "there"
    there.mkdir()
    monkeypatch.setenv("SCHEDCP_HOME", str(there))
    assert store.get_raw(r.id) is None
    with store.capture() as written:
        assert carry.unpack(b.model_dump()) == [r.id, prof.id]
    assert list(written) == [r.id, prof.id]  # what a worker would send back, had it written it in a job
    moved = get_report(r.id)
    assert moved.object_path.startswith(str(there)) and moved.layer1.object_path == moved.object_path
    with open(moved.object_path, "rb") as f:
        assert f.read() == obj
    assert source_for(moved) == src and moved.goals == [goal] and moved.params == {"slice_ns": "5000000"}
    assert get_profile(prof.id).command == prof.command
    assert carry.unpack(None) == [] and carry.unpack({}) == []


def test_a_reply_cannot_overwrite_plant_or_mislabel_and_stores_nothing_when_refused(tmp_path):
    """What a fleet member sends back is taken only as far as the coordinator can check it."""
    import base64
    import json
    import time

    import pytest

    from schedcp_mcp.jobs.models import Job

    prof = profile_workload(["sleep", "0.2"], duration_s=1)
    now = time.time()
    job = Job(id="job-00000000aa", kind="verify", created_at=now, not_before=now, timeout_s=60, max_attempts=1,
              attempts=1, inputs={"source": "int x;"})
    outcome = {"id": "out-00000000aa", "created_at": now, "source": "sandbox", "policy": "x", "reward": 0.5,
               "goals_met": True}
    good = {"kind": "outcome", "id": "out-00000000aa", "created_at": now, "ref": None, "data": json.dumps(outcome)}
    over = store.get_raw(prof.id) | {"data": store.get_raw(prof.id)["data"].replace("sleep", "evil")}
    bad = [
        ("a profile it was not sent", [good, over], {}),
        ("a kind jobs do not make", [good, {**good, "kind": "deployment", "id": "dep-00000000aa"}], {}),
        ("an id it was not given", [good, {**good, "id": "out-1111111111",
                                           "data": json.dumps({**outcome, "id": "out-1111111111"})}], {}),
        ("data naming another id", [{**good, "data": json.dumps({**outcome, "id": "out-2222222222"})}], {}),
        ("a mislabelled object", [good], {"ab" * 32: base64.b64encode(b"\x7fELF not that").decode()}),
    ]
    for why, records, objects in bad:
        with pytest.raises(carry.Refused):
            carry.accept({"records": records, "objects": objects}, job, sent=set())
        assert store.get_raw("out-00000000aa") is None, why  # all or nothing
        assert get_profile(prof.id).command == prof.command
    assert carry.accept({"records": [good]}, job, sent=set()) == ["out-00000000aa"]


def test_a_worker_writes_no_marker_through_a_symlink(tmp_path):
    import os

    import pytest

    from schedcp_mcp.jobs.kinds import JobContext, _marker
    from schedcp_mcp.jobs.models import Job

    victim = tmp_path / "victim"
    victim.mkdir()
    link = tmp_path / "link"
    link.symlink_to(victim)
    now = 0.0
    job = Job(id="job-00000000bb", kind="noop", created_at=now, not_before=now, timeout_s=60, max_attempts=1,
              attempts=1, inputs={"marker_dir": str(link)})
    with pytest.raises(OSError):  # the directory is a symlink
        _marker(JobContext(job))
    real = tmp_path / "real"
    real.mkdir()
    (real / f"job-00000000bb.1.{os.getpid()}").symlink_to(victim / "planted")
    job.inputs["marker_dir"] = str(real)
    with pytest.raises(OSError):  # the file is a symlink someone planted
        _marker(JobContext(job))
    assert list(victim.iterdir()) == []
