"""Sequence-parallel prefill of one long prompt across N workers (Ulysses all-to-all, ZeroC
low-rank exchange). plan.py: head/token split rules; group.py: the N-rank process group;
exchange.py: all-to-all with byte counts; ulysses.py: the layers; slices.py: each rank's encoded
KV and its assembly on the decode side; rank.py: one member; result.py: a group's merged result;
local.py: N local processes/threads; actors.py: N Ray actors; serving.py: the router hook;
config.py: the `zipserve serve --prefill-group` flags."""
