"""`make screenshots` (tools/screenshots.py) runs: the three PNGs of the README, of the sizes the
README shows (desktop 1280 wide, the whole page; a phone 390x844 at 2 device pixels per CSS
pixel), light and dark not the same picture."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

from paths import REPO

PNG = b"\x89PNG\r\n\x1a\n"


def size(path: Path) -> tuple[int, int]:
    """Width and height of a PNG file, from its IHDR chunk."""
    head = path.read_bytes()[:24]
    assert head[:8] == PNG and head[12:16] == b"IHDR", f"{path} is not a PNG file"
    width, height = struct.unpack(">II", head[16:24])
    return width, height


def test_screenshots_of_the_demo_fleet_light_dark_and_phone(chromium: str,
                                                            tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "tools.screenshots", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=240, check=False, cwd=REPO)
    assert done.returncode == 0, done.stderr
    names = ("grid-light.png", "grid-dark.png", "grid-phone.png")
    assert done.stdout.splitlines() == [f"wrote {tmp_path / n}" for n in names]
    light, dark, phone = (tmp_path / n for n in names)
    assert size(light)[0] == size(dark)[0] == 1280
    assert size(light)[1] >= 900 and size(dark)[1] >= 900
    assert size(phone) == (780, 1688)
    assert light.read_bytes() != dark.read_bytes()
