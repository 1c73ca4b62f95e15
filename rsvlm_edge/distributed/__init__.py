"""Running `infer` and `scene` work on a Ray cluster: actors that each hold one :class:`~rsvlm_edge.Pipeline`.

The layer is thin on purpose. The work itself is the local code's (``infer_command.answer_batch``, the scene
runner's tile function); this package only decides *where* each batch runs and makes sure every batch is answered
exactly once:

- :mod:`.settings`: what ``--ray/--actors/--threads-per-actor`` say (no Ray import, the CLI parses it);
- :mod:`.engine`: the engine dir as workers see it: by a shared path when their copy has the same manifest hash,
  else shipped once through the object store and verified against the manifest's sha256 on each worker;
- :mod:`.executor`: the actor pool; re-queues the batches of an actor that dies, so none is lost or repeated;
- :mod:`.infer`: ``rsvlm-edge infer --ray``: the local run's output, line for line, from the pool.

Ray is the optional extra ``rsvlm-edge[ray]``; only the modules below this package import it, and only when a
command asks for a cluster.
"""
