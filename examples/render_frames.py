"""Render an animation on the farm with the ``frames`` compiler, then make a GIF.

    python examples/render_frames.py [--frames 24] [--chunk 4] [--out DIR]

What a render farm does with Blender, with a small stand-in renderer
(``fractal_frame.py``, next to this file, stdlib only): the job is a frame
range cut into chunks, one task per chunk, each rendering its frames and
sending the PNGs back; progress comes from the renderer's ``Fra:N`` lines.
The frames are then assembled into an animated GIF and a contact sheet
(Pillow, on this side only).  It starts its own LocalCluster; to use a real
farm, replace it with ``Hub("ws://host:8765", token=...)``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from hwf_jupyter import Hub, LocalCluster, ResultList

RENDERER = Path(__file__).resolve().parent / "fractal_frame.py"


def job_settings(frames: int, chunk: int) -> dict[str, Any]:
    """The ``frames`` job: one ``python3 fractal_frame.py`` per frame, PNGs back."""
    return {
        "frame_start": 1,
        "frame_end": frames,
        "chunk_size": chunk,
        "command": f"python3 fractal_frame.py {{frame}} frame_{{frame:04d}}.png --frames {frames}",
        "artifacts": ["*.png"],
        "label": "julia",
        "max_retries": 1,
    }


async def render(hub: Hub, frames: int = 24, chunk: int = 4, *, verbose: bool = True) -> tuple[ResultList, list[Path]]:
    """Run the job and wait; the task results and the frames' local PNGs, in frame order."""
    ids = await hub.submit_job("frames", job_settings(frames, chunk), data=[RENDERER])
    if verbose:
        print(f"submitted {len(ids)} task(s) for {frames} frames (chunks of {chunk}) in session {ids.session_id}")

    # The ids come back in the job's order: chunk i holds frames 1+i*chunk on.
    chunks = {tid: f"frames {1 + i * chunk}-{min((i + 1) * chunk, frames)}" for i, tid in enumerate(ids)}

    def show(event: Any) -> None:  # runs on HWF's I/O thread: print and return
        if event.frame_current is not None:
            print(f"  {chunks[event.task_id]}: rendering frame {event.frame_current}")
        elif event.status in ("finished", "failed", "cancelled"):
            print(f"  {chunks[event.task_id]}: {event.status} on {event.machine}")

    watcher = await hub.watch(list(ids), on_event=show if verbose else None)
    try:
        results = await hub.get_result(list(ids), wait=True, timeout=120)
    finally:
        await watcher.close()
    failed = [r for r in results if r.status != "finished"]
    if failed:
        raise RuntimeError(f"{len(failed)} task(s) did not finish: {failed[0].task_id} {failed[0].status} "
                           f"{failed[0].error or ''}")
    return results, frame_paths(results)


def frame_paths(results: ResultList) -> list[Path]:
    """The downloaded PNGs of every task, sorted by their frame number."""
    paths = [a.path for r in results for a in r.artifacts if a.path is not None and a.path.suffix == ".png"]
    return sorted(paths, key=lambda p: p.name)


def make_gif(frames: list[Path], out: Path, *, ms_per_frame: int = 80) -> Path:
    """An animated, looping GIF of the frames (in the order given)."""
    from PIL import Image

    images = [Image.open(f).convert("RGB") for f in frames]
    images[0].save(out, save_all=True, append_images=images[1:], duration=ms_per_frame, loop=0)
    return out


def contact_sheet(frames: list[Path], out: Path, *, columns: int = 6) -> Path:
    """Every frame side by side in a grid, as a render farm's review page shows them."""
    from PIL import Image

    images = [Image.open(f).convert("RGB") for f in frames]
    w, h = images[0].size
    rows = -(-len(images) // columns)
    sheet = Image.new("RGB", (columns * w, rows * h), (20, 20, 20))
    for i, im in enumerate(images):
        sheet.paste(im, ((i % columns) * w, (i // columns) * h))
    sheet.save(out)
    return out


async def main(argv: Optional[list[str]] = None) -> Path:
    ap = argparse.ArgumentParser(description="Render frames on a LocalCluster and assemble a GIF.")
    ap.add_argument("--frames", type=int, default=24)
    ap.add_argument("--chunk", type=int, default=4)
    ap.add_argument("--out", type=Path, default=None, help="folder for the frames and the GIF (default: a temp dir)")
    args = ap.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="hwf-render-"))
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with LocalCluster(daemons=2, slots=2) as cluster:
        hub = Hub(cluster.address, token=cluster.token, artifacts_dir=out / "hwf_artifacts")
        try:
            _, pngs = await render(hub, args.frames, args.chunk)
        finally:
            await hub.close()
    gif = make_gif(pngs, out / "julia.gif")
    sheet = contact_sheet(pngs, out / "julia_sheet.png")
    print(f"{len(pngs)} frames rendered in {time.monotonic() - started:.1f}s")
    print(f"contact sheet: {sheet}")
    print(f"GIF: {gif}")
    return gif


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
