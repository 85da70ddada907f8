"""reelforge: raw footage to a text-to-video diffusion model.

`infra` holds how reelforge runs for real: the validated configuration, the
`reelforge` command line, logging setup and (later) cluster deployment.
"""

__version__ = "0.1.0"
