"""End to end on the embedded default (SQLite + a local directory; no servers needed).

    python examples/quickstart.py

Formats a volume (under $TORCHJUICE_HOME, default ~/.torchjuice), writes and edits files through
the Python API, copies a directory in and out with the same code `torchjuice cp` uses, reads a
pandas parquet file through fsspec, and prints what a file is made of.
"""
from __future__ import annotations

import hashlib
import os
import tempfile

import torchjuice as tj
from torchjuice.cli.cp import copy

NAME = os.environ.get("QUICKSTART_VOLUME", "quickstart")


def main() -> None:
    try:
        tj.format(None, NAME)
        print(f"formatted embedded volume {NAME!r} under {tj.volume.home()}")
    except tj.AlreadyFormattedError:
        print(f"using existing volume {NAME!r}")
    with tj.connect(NAME) as vol:
        vol.makedirs("/demo", exist_ok=True)
        data = os.urandom(10 << 20)
        with vol.open("/demo/blob.bin", "wb") as f:
            f.write(data)
        with vol.open("/demo/blob.bin", "r+b") as f:      # overwrite in the middle
            f.seek(1 << 20)
            f.write(b"torchjuice")
        with vol.open("/demo/blob.bin", "ab") as f:       # append
            f.write(b"the end")
        expect = data[: 1 << 20] + b"torchjuice" + data[(1 << 20) + 10:] + b"the end"
        got = vol.read_bytes("/demo/blob.bin")
        assert got == expect, "read back differs"
        print(f"wrote, edited and read back {len(got):,} bytes: sha256 "
              f"{hashlib.sha256(got).hexdigest()[:16]}")
        with vol.open("/demo/notes.txt", "w") as f:
            f.write("line one\nline two\n")
        vol.rename("/demo/notes.txt", "/demo/README.txt")
        print("listing /demo:", vol.listdir("/demo"))

        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "src")
            os.makedirs(os.path.join(src, "sub"))
            for i in range(20):
                with open(os.path.join(src, "sub" if i % 2 else "", f"f{i}.bin"), "wb") as f:
                    f.write(os.urandom(100_000))
            n, size, secs = copy(src, f"juice://{NAME}/demo/copied", recursive=True)
            copy(f"juice://{NAME}/demo/copied", os.path.join(tmp, "back"), recursive=True)
            same = all(open(os.path.join(r, f), "rb").read() ==
                       open(os.path.join(r.replace(src, os.path.join(tmp, "back")), f), "rb").read()
                       for r, _, fs in os.walk(src) for f in fs)
            print(f"cp -r: {n} files, {size:,} bytes in and back out, identical: {same}")

        try:
            import pandas as pd
            df = pd.DataFrame({"step": range(1000), "loss": [1 / (i + 1) for i in range(1000)]})
            df.to_parquet(f"juice://{NAME}/demo/metrics.parquet")
            back = pd.read_parquet(f"juice://{NAME}/demo/metrics.parquet")
            print(f"pandas parquet through juice://: {len(back)} rows, equal: {back.equals(df)}")
        except ImportError:
            print("(pandas/pyarrow not installed: skipping the parquet demo)")

        info = vol.info("/demo/blob.bin")
        print(f"/demo/blob.bin: inode {info['inode']}, {info['size']:,} bytes, "
              f"{sum(len(c['slices']) for c in info['chunks'])} slices in "
              f"{len(info['chunks'])} chunk(s)")
        vol.rmtree("/demo")
    print("quickstart: OK")


if __name__ == "__main__":
    main()
