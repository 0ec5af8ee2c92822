"""`pipeline.compute`: the clusters a run starts, and what their shutdown leaves on stderr."""

from __future__ import annotations

import subprocess
import sys
import textwrap

# A heartbeat caught in flight by the workers' own close. The scheduler's heartbeat handler is
# made to hang, and the cluster is closed only once every worker has a heartbeat waiting on it:
# that is the moment distributed's `Worker.close` cuts the RPC under the heartbeat.
_CLOSE_UNDER_HEARTBEAT = textwrap.dedent(
    """
    import time
    from pipeline.compute import connect

    def hang_heartbeats(dask_scheduler):
        import asyncio
        dask_scheduler.heartbeats_waiting = set()

        async def heartbeat_worker(address=None, **kwargs):
            dask_scheduler.heartbeats_waiting.add(address)
            await asyncio.Event().wait()

        dask_scheduler.handlers["heartbeat_worker"] = heartbeat_worker

    def waiting(dask_scheduler):
        return len(dask_scheduler.heartbeats_waiting)

    if __name__ == "__main__":
        with connect("local", workers=2, quiet=True) as client:
            client.run_on_scheduler(hang_heartbeats)
            while client.run_on_scheduler(waiting) < 2:
                time.sleep(0.05)
        print("closed")
    """
)


def test_closing_a_cluster_under_a_heartbeat_leaves_no_traceback(tmp_path):
    script = tmp_path / "close.py"
    script.write_text(_CLOSE_UNDER_HEARTBEAT)
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "closed"
    assert "Traceback" not in done.stderr, done.stderr
