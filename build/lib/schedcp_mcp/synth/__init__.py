"""Synthesis: three ways to a new candidate, cheapest first.

- reconfigure a repository policy's knobs (rodata, checked against policy.json);
- revise a policy or candidate by a unified diff;
- generate a scheduler from algorithm primitives (`primitives.py`, rendered by `render.py` from the
  jinja2 template in `templates/`).

Each ends in a layer-1-checked candidate with its provenance (`candidates.py`); `tune.py` searches a
policy's knobs in the sandbox.
"""
