"""Hard-negative mining (`muco mine`): embed query turns and target texts, search, filter, write a sidecar.

Modules: :mod:`~muco.mine.pipeline` (the whole run: settings, reuse of a finished sidecar, processes, writing),
:mod:`~muco.mine.search` (chunked exact top-k), :mod:`~muco.mine.select` (filters and ranks),
:mod:`~muco.mine.summary` (statistics), :mod:`~muco.mine.embed` (reading shards and embedding as in training),
:mod:`~muco.mine.dist` (gathers), :mod:`~muco.data.m3t.sidecar` (the on-disk format and its reader);
:mod:`muco.cli.mine` is the command.
"""
