"""Two (or more) loraswap replicas on this machine behind haproxy, sharing one PostgreSQL, one
Redis and one state directory for file bytes and documents: the fleet of docs/replicas.md, on
one machine. ``make fleet`` runs it; Ctrl-C stops everything it started.

    python scripts/fleet.py [--replicas 2] [--port 3000] [--dir .loraswap/fleet]
                            [--database-url postgresql://...] [--redis-url redis://...]

Without ``--database-url`` a throwaway PostgreSQL cluster is made in ``--dir`` (PostgreSQL's
``initdb`` must be installed) and removed at the end; give a URL to keep the data.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.fleet import Balancer, Replica, core_of, start_all  # noqa: E402
from tests.postgres_server import postgres  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--port", type=int, default=3000, help="the balancer's port")
    parser.add_argument("--dir", type=Path, default=ROOT / ".loraswap" / "fleet")
    parser.add_argument("--database-url", help="an existing PostgreSQL (default: a throwaway one)")
    parser.add_argument("--redis-url", help="an existing Redis (default: one started here)")
    ns = parser.parse_args()
    work = ns.dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        db_url = ns.database_url or stack.enter_context(postgres())
        redis_url = ns.redis_url
        if redis_url is None:
            redis = RedisServer(work / "redis").start()
            stack.callback(redis.stop)
            redis_url = redis.uri
        shared = work / "shared"
        env = {
            "LORASWAP_DATABASE_URL": db_url,
            "LORASWAP_LIMITS_URI": redis_url,
            "LORASWAP_FILES_URI": str(shared / "files"),
            "LORASWAP_ADAPTER_ROOTS": json.dumps([str(ROOT / "adapters")]),
        }
        replicas = [Replica(work / f"replica-{i}", env | core_of(i)) for i in range(ns.replicas)]
        print(f"starting {ns.replicas} replicas (logs: {work}/replica-*/serve.log)", flush=True)
        start_all(replicas)
        for replica in replicas:
            stack.callback(replica.stop)
        balancer = Balancer(work, [r.port for r in replicas], ns.port)
        balancer.start()
        stack.callback(balancer.stop)
        print(f"fleet ready: {balancer.url} (replicas: {', '.join(r.url for r in replicas)};"
              f" database {db_url}; redis {redis_url})", flush=True)  # fmt: skip
        stopping = []
        signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
        with contextlib.suppress(KeyboardInterrupt):
            while not stopping:
                time.sleep(1)
        print("stopping the fleet", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
