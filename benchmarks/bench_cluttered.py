"""digits-cluttered: time to build it from scratch, to read it back from the cache, and to load it as tensors.

Baseline measured in the same run: ``data.load("digits")`` (the bundled digits it is built from). The cache
goes to a temporary folder (``INTERTWINERS_CACHE``), so the user's cache is neither read nor written.
Also checks the build's sha256 against ``cluttered.REFERENCE_SHA256``.
Run: ``.venv/bin/python benchmarks/bench_cluttered.py [--repeat 3] [--figure docs/digits_cluttered.png]``
(``--figure``: also draw the sample figure of docs/datasets.md).

The time from a fresh clone (imports, source files compiled, an empty cache) is measured with a command, see
docs/datasets.md.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time


def best_of(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--figure", default=None, help="write a PNG of sample images here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        os.environ["INTERTWINERS_CACHE"] = folder
        from intertwiners import cluttered, data

        data.load("digits")  # imports and scikit-learn's file read once, outside the timings
        base = best_of(lambda: data.load("digits"), args.repeat)
        print(f"data.load('digits') (baseline):             {base:7.3f} s")
        built = cluttered.build()
        ok = cluttered.digest(built.arrays) == cluttered.REFERENCE_SHA256
        print(f"sha256 of the build matches the reference:  {ok}")
        t_build = best_of(cluttered.build, args.repeat)
        print(f"cluttered.build() (no cache):               {t_build:7.3f} s  ratio {t_build / base:6.1f}x")
        cluttered.write_cache(built, cluttered.cache_path())
        size = cluttered.cache_path().stat().st_size / 2**20
        t_read = best_of(cluttered.load_arrays, args.repeat)
        print(f"cluttered.load_arrays() (verified cache):   {t_read:7.3f} s  ratio {t_read / base:6.1f}x  "
              f"({size:.1f} MiB file)")
        t_load = best_of(lambda: data.load("digits-cluttered"), args.repeat)
        print(f"data.load('digits-cluttered') (cached):     {t_load:7.3f} s  ratio {t_load / base:6.1f}x")
        if args.figure:
            figure(built, args.figure)
            print(f"wrote {args.figure}")


def figure(built, path: str, columns: int = 10, rows: int = 3, zoom: int = 2, gap: int = 2) -> None:
    """A mosaic PNG: row 1, one test source digit per class (8x8, grey, upsampled); then ``rows`` of their
    cluttered test images (copies 0, 1, ...), each pixel drawn ``zoom`` x ``zoom``, a 64-colour palette."""
    import numpy as np
    from PIL import Image

    from intertwiners import cluttered

    images, _, split = cluttered.source_digits()
    y, source, x = built.y("test"), built.source("test"), built.x("test")
    n_src = len(split["test"])
    first = [int(np.flatnonzero(y[:n_src] == k)[0]) for k in range(columns)]  # copy 0 of a test digit per class
    size = x.shape[-1]
    cell = size * zoom + gap
    mosaic = np.full(((rows + 1) * cell + gap, columns * cell + gap, 3), 255, np.uint8)
    for j, i in enumerate(first):
        grey = 255 - np.kron(images[source[i]], np.ones((size // 8, size // 8))) * 255 / 16
        tiles = [np.repeat(grey[..., None], 3, axis=-1).astype(np.uint8)]
        tiles += [x[i + r * n_src].transpose(1, 2, 0) for r in range(rows)]
        for r, t in enumerate(tiles):
            big = np.kron(t, np.ones((zoom, zoom, 1), np.uint8))
            mosaic[gap + r * cell: gap + r * cell + size * zoom, gap + j * cell: gap + j * cell + size * zoom] = big
    Image.fromarray(mosaic).quantize(64).save(path, optimize=True)


if __name__ == "__main__":
    main()
