"""The sandbox job kinds (verify, validate, campaign join): filled in by stage 2."""
