"""HWF quick start: the seed's example on an embedded hub with 2 daemons.

Run it with ``make demo`` (or ``python examples/quickstart.py``).  To use a
hub you started yourself (``hwf hub`` + ``hwf daemon``), replace the
LocalCluster with ``Hub("ws://host:8765", token=...)``.
"""

import asyncio
import sys
import tempfile
from pathlib import Path

import pandas as pd

from hwf_jupyter import Artifacts, Data, Hub, LocalCluster, Stage, Task, dispatch

SOURCE = r"""
#include <stdio.h>
#include <stdlib.h>
int main(void) {
    size_t n = 200u * 1024 * 1024;           /* touch 200 MB */
    char *buf = malloc(n);
    for (size_t i = 0; i < n; i += 4096) buf[i] = (char)i;
    unsigned long sum = 0;                    /* and burn some CPU */
    for (unsigned long i = 0; i < 300000000UL; i++) sum += i ^ (sum >> 3);
    printf("checksum %lu %d\n", sum, buf[4096]);
    return 0;
}
"""


def make_task(src: Path) -> Task:
    return Task(
        Stage("build", data=[Data(src, "main.c")], cmd="gcc -O1 main.c -o main"),
        Stage("run", cmd=["./main > out.txt", "wc -c out.txt"],
              track_time=True, track_ram=True, track_cpu=True, comment="the real work"),
        Artifacts("out.txt"),
        hardware={"os": "linux", "cpu": "any", "gpu": "any", "ram": "1GB"},
    )


async def main() -> None:
    pd.set_option("display.width", 200)
    pd.set_option("display.max_columns", 20)
    workdir = Path(tempfile.mkdtemp(prefix="hwf-demo-"))
    src = workdir / "main.c"
    src.write_text(SOURCE)

    with LocalCluster(daemons=2) as cluster:
        hub = Hub(cluster.address, token=cluster.token, artifacts_dir=workdir / "hwf_artifacts")
        task = make_task(src)

        ids = await dispatch(task, hub)                   # one task, anywhere
        pool = await hub.get_hardware_pool({"os": "linux"})
        across = await dispatch(task, hub, across=pool)    # one copy per machine
        results = await hub.get_result([*ids, *across], wait=True)

        cols = ["task_id", "status", "machine", "duration_s", "queue_time_s", "attempts", "artifacts"]
        print("== tasks ==")
        print(results.to_dataframe()[cols].to_string(index=False))
        print("\n== stages ==")
        stage_cols = ["task_id", "machine", "stage", "status", "duration_s", "peak_ram_mb", "cpu_time_s", "cpu_percent"]
        print(results.to_dataframe(level="stage")[stage_cols].to_string(index=False))
        print("\n== hardware pool ==")
        pool_cols = ["name", "state", "os", "arch", "cpu", "cores", "ram_mb", "slots", "load_1m", "mem_percent"]
        print(pool.to_dataframe()[pool_cols].to_string(index=False))
        print("\n== artifacts ==")
        for r in results:
            for a in r.artifacts:
                print(f"{r.task_id} {a.name}: {a.path} ({a.size} bytes)" if a.ok else f"{r.task_id}: {a.error}")
        await hub.close()
        if not results.ok:
            for r in results.failed:
                print("FAILED", r, r.error, file=sys.stderr)
            sys.exit(1)


if __name__ == "__main__":
    asyncio.run(main())
