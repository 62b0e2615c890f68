"""The gateway process: the OpenAI-compatible API (``api``), admission control (``admission``),
routing with the scheduling package's policies (``router``), the live state it routes by
(``live_state``), the hand-over between a request's nodes (``handover``), the typed client of the
nodes' control plane (``node_client``) and of the global KV manager (``kv_manager``,
``kv_client``), the uvicorn server (``serve``).  Never imports torch (a test checks it)."""
