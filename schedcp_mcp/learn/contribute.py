"""Repository evolution: a validated candidate that met its goals becomes a policy directory in the
home (config.contributed_policies_dir), with provenance (parent policy, report id, source hash,
date), so later searches can find it."""

from __future__ import annotations

import json
import time

from .. import config, store
from ..errors import BadInput
from ..names import check_policy_name
from ..reports import ValidationReport, get_report, source_for
from ..repository.policies import Policy, get_policy, list_policies
from .feedback import report_feedback



def params_from_report(r: ValidationReport) -> list[dict]:
    """policy.json parameters for a raw source, at the values it was validated with: map sizes
    become `sizes_map` parameters, `const volatile` overrides parameters of that name (typed
    64-bit here; the loader checks the variable's real type)."""
    out = []
    for key, value in sorted(r.params.items()):
        v = value.strip().lower()
        if v in ("true", "false"):
            out.append({"name": key, "type": "bool", "default": v == "true",
                        "description": f"validated at {v} (report {r.id})"})
            continue
        try:
            n = int(v, 0)
        except ValueError:
            n = int(v, 10)  # "010": the loader's strtoll would read octal; keep the digits as given
        if key.startswith("map:"):
            m = key.removeprefix("map:")
            out.append({"name": f"{m}_entries", "type": "u32", "default": n, "min": 1, "sizes_map": m,
                        "description": f"max_entries of map {m} (set by the loader)"})
        else:
            out.append({"name": key, "type": "s64" if n < 0 else "u64", "default": n,
                        "description": f"validated at {value} (report {r.id})"})
    return out


def _candidate_knobs(candidate_id: str | None) -> list:
    """A generated candidate's knobs (typed, with ranges) for its policy.json."""
    if not candidate_id:
        return []
    from ..repository.provenance import get_candidate

    return get_candidate(candidate_id).knobs


def _synth_provenance(r) -> dict[str, str]:
    """policy.json provenance entries of a synthesized candidate (flat strings, like the rest)."""
    p = r.provenance
    if p is None:
        return {}
    out = {"origin": p.kind, "candidate_id": r.candidate_id or ""}
    if p.parent_candidate:
        out["parent_candidate"] = p.parent_candidate
    if p.spec:
        out["spec"] = "spec.json"
    if p.patch:
        out["patch"] = "origin.patch"
        out["patch_sha256"] = p.patch_sha256 or ""
    if p.tune_id:
        out["tune_id"] = p.tune_id
    return out


def contribute_policy(report_id: str, name: str, description: str, tags: list[str] | None = None,
                      summary: str | None = None, actor: str = "agent") -> Policy:
    check_policy_name(name)
    if any(p.name == name for p in list_policies()):
        raise BadInput(f"a policy named {name!r} already exists", "choose another name")
    if not description.strip():
        raise BadInput("a description is required", "say what the scheduler does and for which workload")
    from ..access import check_cap

    check_cap("text_chars", len(description) + len(summary or ""), actor, "characters of description")
    r = get_report(report_id)
    if not r.passed:
        raise BadInput(f"report {r.id} did not pass validation ({r.status})",
                       "only schedulers that passed layers 1 and 2 can join the repository")
    fb = report_feedback(r.id)
    if not fb.goals_met:
        raise BadInput(f"report {r.id} passed but did not meet its goals: {fb.summary}",
                       "revise the scheduler until it meets the goals")
    source = source_for(r)
    prov = r.provenance
    parent_name = r.policy or (prov.parent_policy if prov else None)
    parent = get_policy(parent_name) if parent_name else None
    knobs = parent.parameters if parent is not None else _candidate_knobs(r.candidate_id)
    params = []
    if knobs:
        for p in knobs:
            d = p.model_dump()
            if p.loader_key in r.params:
                d["default"] = p.check(r.params[p.loader_key])
            params.append(d)
    else:
        params = params_from_report(r)
    d = config.contributed_policies_dir() / name
    d.mkdir(parents=True, exist_ok=False)
    src_name = f"{name}.bpf.c"
    (d / src_name).write_text(source)
    date = time.strftime("%Y-%m-%d")
    meta = {
        "name": name,
        "summary": summary or description.strip().split(".")[0][:120],
        "description": description.strip(),
        "algorithm": parent.algorithm if parent else "contributed by an agent",
        "source": src_name,
        "ops_name": r.ops_name,
        "use_cases": parent.use_cases if parent else [],
        "tags": sorted(set(tags or (parent.tags if parent else []))),
        "limitations": parent.limitations if parent else ["validated only on the sandbox workloads"],
        "parameters": params,
        "goals": [g.metric for g in r.goals],
        "provenance": {"parent_policy": parent_name or "", "report_id": r.id,
                       "source_sha256": r.source_sha256, "artifact_sha256": r.artifact_sha256 or "",
                       "date": date, "contributed_by": actor, "reward": f"{fb.reward:+.4f}",
                       **_synth_provenance(r)},
    }
    (d / "policy.json").write_text(json.dumps(meta, indent=2) + "\n")
    if prov and prov.spec:
        (d / "spec.json").write_text(prov.spec.model_dump_json(indent=2) + "\n")
    if prov and prov.patch:
        (d / "origin.patch").write_text(prov.patch)
    (d / "README.md").write_text(
        f"# {name}\n\n{description.strip()}\n\nContributed {date} from validation report `{r.id}`"
        + (f", {prov.kind} from `{parent_name or prov.parent_candidate or 'a spec'}` (candidate "
           f"`{r.candidate_id}`{'; spec.json' if prov.spec else ''}{'; origin.patch' if prov.patch else ''})"
           if prov else f", derived from `{r.policy}`" if r.policy else "")
        + f".\n\n{fb.summary}\n")
    store.audit(actor, "contribute_policy", {"name": name, "report_id": r.id, "path": str(d)},
                r.artifact_sha256)
    return get_policy(name)
