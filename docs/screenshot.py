"""Screenshot one atlas page with Debian's Chromium (for the README): ``docs/channel-page.png``.

Usage:
    python docs/screenshot.py runs/demo/atlas L/blocks.3.1.bn1/2.html docs/channel-page.png

Serves the atlas on 127.0.0.1, loads the page with every lazy picture, takes a viewport-wide
shot of the top of the page and writes it as a palette PNG (kept under 300 KB).
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

from PIL import Image
from playwright.sync_api import sync_playwright

from convscope.serve import start_server

FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("atlas")
    parser.add_argument("page", help="page path inside the atlas, e.g. L/blocks.3.1.bn1/2.html")
    parser.add_argument("out")
    parser.add_argument("--width", type=int, default=1200)
    parser.add_argument("--height", type=int, default=1000)
    parser.add_argument("--max-kb", type=int, default=290)
    args = parser.parse_args()
    server = start_server(args.atlas, port=0)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=FLAGS)
            page = browser.new_page(viewport={"width": args.width, "height": args.height})
            page.goto(f"http://127.0.0.1:{server.server_address[1]}/{args.page}")
            page.evaluate("() => document.querySelectorAll('img[loading=lazy]').forEach(i => { i.loading = 'eager'; })")
            page.wait_for_function("() => Array.from(document.images).every(i => i.complete)")
            shot = page.screenshot(full_page=False)
            browser.close()
    finally:
        server.shutdown()
        server.server_close()
    image = Image.open(io.BytesIO(shot)).convert("RGB")
    for colors in (256, 192, 128, 96, 64):
        buffer = io.BytesIO()
        image.quantize(colors=colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
            buffer, format="PNG", optimize=True)
        if buffer.tell() <= args.max_kb * 1024:
            break
    Path(args.out).write_bytes(buffer.getvalue())
    print(f"wrote {args.out}: {image.width}x{image.height}, {colors} colours, {buffer.tell() // 1024} KB")


if __name__ == "__main__":
    main()
