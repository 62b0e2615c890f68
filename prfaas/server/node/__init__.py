"""The node process: one engine behind one thread (``engine_worker``), its role's parts
(``prefill``, ``decode``, ``prefix_pool``), the HTTP routes (``routes``), the process (``process``).
``NodeServer`` lives in ``prfaas.server.node.server``.  Imports torch (through the engine)."""
