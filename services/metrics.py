"""The Prometheus endpoint: `GET /metrics` on `server.metrics_port`, nothing on any other path.

When `server.api_key` is set the scrape needs `Authorization: Bearer <key>` too (Prometheus's
`authorization` scrape setting sends it): the metrics name collections' traffic and the model. The
server binds it on `server.host`, like the gRPC port.
"""
from __future__ import annotations

import threading
from typing import Optional
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from socketserver import ThreadingMixIn

from prometheus_client import REGISTRY, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from memlm.services.auth import bearer_matches

METRICS_PATH = "/metrics"


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - wsgiref's signature; scrapes are not worth a log line
        pass


def metrics_app(api_key: Optional[str]):
    """A WSGI app serving the default registry on /metrics only, behind `api_key` when given."""
    prometheus = make_wsgi_app(REGISTRY)
    expected = f"Bearer {api_key}".encode() if api_key else None

    def app(environ, start_response):
        def reply(status: str, body: str, headers=()):
            start_response(status, [("Content-Type", "text/plain; charset=utf-8"), *headers])
            return [body.encode()]

        if environ.get("PATH_INFO") != METRICS_PATH:
            return reply("404 Not Found", f"not found: metrics are served on {METRICS_PATH}\n")
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            return reply("405 Method Not Allowed", "use GET\n", [("Allow", "GET, HEAD")])
        if expected is not None and not bearer_matches(environ.get("HTTP_AUTHORIZATION", ""), expected):
            return reply("401 Unauthorized", "send `Authorization: Bearer <api key>`\n",
                         [("WWW-Authenticate", 'Bearer realm="memlm metrics"')])
        return prometheus(environ, start_response)

    return app


def start_metrics_server(host: str, port: int, api_key: Optional[str]) -> WSGIServer:
    """Serve /metrics from a daemon thread; returns the server (`.shutdown()` stops it)."""
    httpd = make_server(host, port, metrics_app(api_key), _ThreadingWSGIServer, handler_class=_QuietHandler)
    threading.Thread(target=httpd.serve_forever, name="memlm-metrics", daemon=True).start()
    return httpd


class StoreCollector(Collector):
    """Per-collection gauges, read from the store at each scrape (LMDB counts are O(1) stats)."""

    def __init__(self, store, guard=None) -> None:
        self._store, self._guard = store, guard

    def collect(self):
        labels = ["collection"]
        fams = {
            "documents": GaugeMetricFamily("memlm_collection_documents", "Documents stored", labels=labels),
            "chunks": GaugeMetricFamily("memlm_collection_chunks", "Chunks stored", labels=labels),
            "index_vectors": GaugeMetricFamily("memlm_collection_index_vectors", "Vectors in the FAISS index", labels=labels),
            "pending_ops": GaugeMetricFamily(
                "memlm_collection_pending_ops", "Index operations logged but not yet in the index file", labels=labels),
            "available": GaugeMetricFamily(
                "memlm_collection_available", "1 when the collection serves, 0 when it is unavailable (see Describe)",
                labels=labels),
        }
        lag = GaugeMetricFamily("memlm_collection_memory_lag", "Acknowledged writes a memory mode's derived memory "
                                "of the collection has not applied yet", labels=["collection", "mode"])
        memory_bytes = GaugeMetricFamily(
            "memlm_collection_memory_bytes", "Bytes on disk of a collection's derived memory, by folder (kv: knn's "
            "KV memory, kv-landmark: landmark's, ...)", labels=["collection", "folder"])
        for config in self._store.list_collections():
            try:
                st = self._store.describe(config.name)
            except Exception:  # noqa: BLE001 - dropped between the list and the describe
                continue
            for key, fam in fams.items():
                value = float(st.problem is None) if key == "available" else float(getattr(st, key))
                fam.add_metric([config.name], value)
            for mode, n in st.memory_lag.items():
                lag.add_metric([config.name, mode], float(n))
            for folder, size in _derived_folder_bytes(self._store, config.name).items():
                memory_bytes.add_metric([config.name, folder], float(size))
        yield from fams.values()
        yield lag
        yield memory_bytes
        if self._guard is not None:
            yield GaugeMetricFamily("memlm_calls_in_flight", "RPCs being served (health checks aside)",
                                    value=self._guard.in_flight)


def _derived_folder_bytes(store, collection: str) -> dict[str, int]:
    """{folder: bytes} for each folder of the collection's derived files (KV memories and the like;
    the index snapshots beside them are not counted). Empty for a store without such folders."""
    try:
        root = store.collection_dir(collection)
    except Exception:  # noqa: BLE001 - dropped meanwhile, or a store that keeps no files
        return {}
    sizes: dict[str, int] = {}
    for folder in (p for p in root.iterdir() if p.is_dir()) if root.is_dir() else ():
        sizes[folder.name] = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    return sizes
