"""Sequence-parallel prefill of one long prompt across N workers (Ulysses all-to-all, ZeroC
low-rank exchange): plan.py splits heads and tokens, group.py builds the N-rank process group,
exchange.py moves and counts bytes, ulysses.py runs the layers, slices.py exports and assembles
each rank's KV, local.py runs a group in N local processes, actors.py as N Ray actors."""
