"""The host server: devices connect, frames are decoded, the cloud half answers (codec_spec/PROTOCOL.md).

Modules, in the order data flows through them:

    config      ServerConfig (limits, timeouts, keys), ServerError, address / key-file / log-sink parsing
    cloud       CloudModel: a bundle's tables, decoders and cloud half (frame bytes -> result), top_k
    streams     the byte streams a connection runs on: TCP, serial
    slices      PendingTensor: the slices of one tensor while they arrive (PROTOCOL.md 10)
    connection  Connection: one stream's protocol state machine (handshake, seqs, answers in order)
    datagram    DatagramServer: datagram sessions over UDP, slices assembled by deadline, concealment
    replay      ReplayGuard: an MQTT worker's replay window and answer cache per device session
    mqtt        MqttWorker: one worker of a pool sharing a fleet's frames through an MQTT broker (PROTOCOL.md 11)
    metrics     Metrics: running totals and latency percentiles
    server      Server: accepting streams, the worker pool, the status endpoint, MQTT workers
    runner      serve() until a signal, run_in_thread() for the demo, benchmark and tests
    demo_bundle the demo's cached bundle, photos and tables (the demo, the benchmark and the tests use them)
    bench       ``python -m lwfc_host.serve.bench``: frames per second and latency with 1, 5, 20 devices
    broker      Mosquitto: a real broker on a free loopback port with a generated config (tests, fleet_bench)
    fleet_bench ``lwfc serve-bench --mqtt``: a simulated fleet, pools of worker processes, a worker killed

The names most callers need are importable from here.
"""

from lwfc_host.serve.cloud import CloudModel, top_k
from lwfc_host.serve.config import ServerConfig, ServerError, json_log_sink, load_keys, parse_hostport
from lwfc_host.serve.runner import run_in_thread, serve
from lwfc_host.serve.server import Server

__all__ = ["CloudModel", "Server", "ServerConfig", "ServerError", "json_log_sink", "load_keys", "parse_hostport",
           "run_in_thread", "serve", "top_k"]
