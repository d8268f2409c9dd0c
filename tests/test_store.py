"""The SQLite store: its schema migrations under concurrent first use."""


def test_processes_opening_a_new_database_at_once_all_migrate_it(tmp_path):
    """Two commands started together in a fresh home both saw schema version 0; the second failed
    with "table records already exists" (a CI run). Eight processes at once, released together."""
    import subprocess
    import sys
    import time

    db = tmp_path / "fresh.db"
    code = ("import sys, time; from pathlib import Path; from schedcp_mcp import store\n"
            "t = float(sys.argv[2]); time.sleep(max(0.0, t - time.time()))\n"
            "print(store.migrate(store.connect(Path(sys.argv[1]))))")
    go = str(time.time() + 1.5)
    procs = [subprocess.Popen([sys.executable, "-c", code, str(db), go], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(8)]
    outs = [p.communicate(timeout=60) for p in procs]
    from schedcp_mcp import store

    assert all(p.returncode == 0 for p in procs), [(p.returncode, e[-500:]) for p, (_, e) in zip(procs, outs)]
    assert {o.strip() for o, _ in outs} == {str(len(store.MIGRATIONS))}
