"""Hard-negative mining (`muco mine`): embed query turns and target texts, search, filter, write a sidecar.

Modules: :mod:`~muco.mine.pipeline` (the whole run: settings, reuse of a finished sidecar, processes, writing),
:mod:`~muco.mine.search` (exact top-k over a corpus shard, the tie rule), :mod:`~muco.mine.ring` (the corpus
sharded over processes, query blocks passed around a ring), :mod:`~muco.mine.select` (filters and ranks),
:mod:`~muco.mine.summary` (statistics), :mod:`~muco.mine.stability` (how far ranks move between two sidecars),
:mod:`~muco.mine.embed` (reading shards and embedding as in training; canonical query turns or training's draws),
:mod:`~muco.mine.dist` (collectives), :mod:`~muco.data.m3t.sidecar` (the on-disk format and its reader);
:mod:`muco.cli.mine` is the command.
"""
