"""Lay out Twemoji's 64x64 colour PNGs as an image folder, one subfolder per emoji category.

    npm pack emoji-datasource-twitter@16.0.0 && mkdir -p /tmp/emoji && tar xzf emoji-datasource-twitter-16.0.0.tgz -C /tmp/emoji
    python examples/twemoji/make_folder.py /tmp/emoji/package /tmp/twemoji
    vaedist data prepare --set data.source=images --set data.source_path=/tmp/twemoji \
        --set data.image_size=[32,32] --set data.channels=3 --out outputs/shards-twemoji

A real set of colour images that a package registry ships (CIFAR-10 cannot be downloaded here):
npm's emoji-datasource-twitter carries Twitter's Twemoji graphics (CC-BY 4.0, (c) Twitter, Inc and
other contributors) as RGBA PNGs. Only each emoji's base image is used (its skin-tone variants are
near-duplicates), and the "Component" category (5 skin-tone swatches) is left out: 1,906 images in
9 classes. The files are copied byte for byte; vaedist's image-folder source composites their alpha
on white and resizes them.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path


def main(package_dir: str, out_dir: str) -> int:
    package, out = Path(package_dir), Path(out_dir)
    emojis = json.loads((package / "emoji.json").read_text())
    count = 0
    for emoji in emojis:
        if emoji["category"] == "Component" or not emoji.get("has_img_twitter"):
            continue
        # Folder names are the classes (sorted, so 'Activities' is class 0); keep them filesystem-safe.
        category = re.sub(r"[^A-Za-z0-9]+", "-", emoji["category"]).strip("-")
        src = package / "img" / "twitter" / "64" / emoji["image"]
        dest = out / category / emoji["image"]
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
        count += 1
    print(f"{count} images in {len({p.parent for p in out.glob('*/*.png')})} classes under {out}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(f"usage: {sys.argv[0]} PACKAGE_DIR OUT_DIR")
    sys.exit(main(sys.argv[1], sys.argv[2]))
