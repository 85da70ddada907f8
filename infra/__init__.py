"""reelforge: raw footage to a text-to-video diffusion model.

`infra` holds how reelforge runs for real: the validated configuration, the
`reelforge` command line, logging setup and (later) cluster deployment.
"""

from model import __version__

__all__ = ["__version__"]
