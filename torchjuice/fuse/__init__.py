"""The POSIX mount (``torchjuice mount``): pyfuse3's low-level inode API over a Volume.

``torchjuice.fuse.serve(vol, mountpoint, meta_url)`` mounts and serves until unmounted;
``torchjuice.fuse.control`` finds the volume behind a mounted path (no pyfuse3 needed).
See docs/fuse.md.
"""
from .control import CONTROL_NAME, mount_info, mounted_volume
from .mount import check_fuse, serve, unmount

__all__ = ["serve", "unmount", "check_fuse", "mount_info", "mounted_volume", "CONTROL_NAME"]
