"""Hard-negative mining (`muco mine`): embed query turns and target texts, search, filter, write a sidecar.

Modules: :mod:`~muco.mine.search` (chunked exact top-k), :mod:`~muco.mine.select` (filters and ranks),
:mod:`~muco.mine.summary` (statistics), :mod:`~muco.mine.embed` (reading shards and embedding as in training),
:mod:`~muco.mine.dist` (gathers), :mod:`~muco.mine.sidecar` (the on-disk format and its reader),
:mod:`~muco.cli.mine` (the command).
"""
