"""Every KVMESH_* environment variable kvmesh reads, and what it sets.

The deploy/ files may set only these (tests/test_deploy.py checks), and the code may read no others
(the same test greps it). Where a variable feeds RuntimeConfig, it is read in the driver's process and
travels to the actors inside the config: setting it on the worker nodes alone changes nothing.
"""

from __future__ import annotations

ENV_VARS: dict[str, str] = {
    # gRPC servers (RuntimeConfig)
    "KVMESH_HOST": "interface every gRPC server binds; 0.0.0.0 on a cluster (each advertises its own address)",
    "KVMESH_TOKEN": "shared secret every call carries; required when KVMESH_HOST is not loopback",
    "KVMESH_TLS_CERT": "server certificate (PEM file) for TLS",
    "KVMESH_TLS_KEY": "its private key (PEM file)",
    "KVMESH_TLS_CA": "the CA clients trust (PEM file)",
    "KVMESH_TLS_SERVER_NAME": "the name clients expect in the servers' certificate (one cert for every node)",
    "KVMESH_STARTUP_TIMEOUT_S": "how long a session waits for its actors to start (default 180; autoscaling: more)",
    "KVMESH_MAX_MESSAGE_MB": "gRPC message size limit in MB (default 16)",
    # shared KV and tracing (RuntimeConfig)
    "KVMESH_REDIS_URL": "redis://host:6379/0 shared by the workers; unset: a private local redis-server; 'memory'",
    "KVMESH_API_KEY": "bearer key every /v1/ request to `kvmesh serve` must carry; required off loopback",
    "KVMESH_STORE_SECRET": "HMAC key of the KV records workers keep in Redis; unset: derived from KVMESH_TOKEN",
    "KVMESH_TRACE": "off, or exporters among console, otlp, memory (OTLP reads the standard OTEL_* variables)",
    # placement (RuntimeConfig.worker_placement / agent_placement, see placement.py)
    "KVMESH_WORKER_CPUS": "logical CPUs each worker reserves (default 0.5)",
    "KVMESH_WORKER_GPUS": "GPUs each worker reserves (default: 1 on a cluster with GPUs, else 0)",
    "KVMESH_WORKER_MEMORY_MB": "memory each worker reserves, in MB (default 1024)",
    "KVMESH_WORKER_RESOURCES": 'custom resources per worker, JSON (default {"kvmesh-worker": 1} where offered)',
    "KVMESH_AGENT_CPUS": "logical CPUs each agent actor reserves (default 0)",
    "KVMESH_AGENT_GPUS": "GPUs each agent actor reserves (default 0)",
    "KVMESH_AGENT_MEMORY_MB": "memory each agent actor reserves, in MB (default: none)",
    "KVMESH_AGENT_RESOURCES": 'custom resources per agent, JSON (default {"kvmesh-agent": 0.01} where offered)',
    # the inference workers (RuntimeConfig.worker, a WorkerConfig)
    "KVMESH_MODEL": "the workers' model: smollm2 (default), a .gguf file or an HF directory",
    "KVMESH_WORKER_DEVICE": "cpu or cuda (default: cuda where available)",
    "KVMESH_WORKER_WEIGHTS": "fp32, bf16, int8 or int4 (default: fp32 on CPU, bf16 on CUDA)",
    "KVMESH_WORKER_THREADS": "torch CPU threads per worker (default: its node's cores shared among its workers)",
    # Pipeline.run without a session (executor.py)
    "KVMESH_WORKERS": "workers of the default session (default 1)",
    # the engine and the CLI
    "KVMESH_CACHE_DIR": "where dequantized weights are cached (default ~/.cache/kvmesh)",
    "KVMESH_DEMO_MAX_TOKENS": "max_tokens of `kvmesh demo`'s agents",
}
