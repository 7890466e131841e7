"""Headless rendering for the web app: VTK draws into offscreen buffers, never into a window.

The VTK wheel chooses its OpenGL window at run time: X11 when ``$DISPLAY`` is set, else EGL, else
OSMesa. On a server without a display, EGL with Mesa's software rasteriser (llvmpipe) needs no GPU;
on Debian 12 that is the packages ``libegl1 libegl-mesa0 libgl1-mesa-dri``. A GPU's EGL driver is
used instead when one is installed.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

from ..errors import AttnSegError

DEBIAN_PACKAGES = ("libegl1", "libegl-mesa0", "libgl1-mesa-dri")
_TERMINAL_COLOURS = re.compile(r"\x1b\[[0-9;]*m")


class RenderingUnavailable(AttnSegError, ValueError):
    """VTK cannot create an offscreen OpenGL context here: a setup problem the message says how to fix."""


def prefer_offscreen_window() -> None:
    """Without a display, ask VTK for its EGL window first (skips a failed X11 attempt and its warning).

    Must run before the first render window is created. An explicit ``VTK_DEFAULT_OPENGL_WINDOW``
    (e.g. ``vtkOSOpenGLRenderWindow`` for OSMesa) is left as the user set it.
    """
    if not os.environ.get("DISPLAY"):
        os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")


def render_one_frame() -> str:
    """Render one frame offscreen in this process; return the OpenGL window class VTK used.

    A missing OpenGL library can crash the process (VTK's OSMesa window segfaults without
    libOSMesa), so servers call :func:`check_offscreen_rendering`, which runs this in a child.
    """
    prefer_offscreen_window()
    import vtkmodules.vtkRenderingOpenGL2  # noqa: F401  (registers the OpenGL render window factory)
    from vtkmodules.vtkRenderingCore import vtkRenderer, vtkRenderWindow

    window = vtkRenderWindow()
    window.SetOffScreenRendering(True)
    window.SetSize(8, 8)
    window.AddRenderer(vtkRenderer())
    window.Render()
    if not window.SupportsOpenGL():
        raise RenderingUnavailable(f"{window.GetClassName()} has no OpenGL context")
    name = window.GetClassName()
    window.Finalize()
    return name


def check_offscreen_rendering(timeout_s: float = 60.0) -> str:
    """Render one frame offscreen in a child process; return the OpenGL window class VTK used.

    Raises :class:`RenderingUnavailable` naming the packages to install when no context can be made.
    """
    prefer_offscreen_window()
    probe = subprocess.run([sys.executable, "-m", __name__], capture_output=True, text=True,
                           timeout=timeout_s, env=os.environ.copy())
    if probe.returncode != 0 or not probe.stdout.strip():
        log = _TERMINAL_COLOURS.sub("", probe.stderr).strip().splitlines()
        problem = log[-1] if log else f"exit status {probe.returncode}"
        raise RenderingUnavailable(
            f"VTK cannot render offscreen on this machine ({problem[:200]}); install EGL and "
            f"Mesa's software renderer: apt-get install -y {' '.join(DEBIAN_PACKAGES)} "
            "(or libosmesa6 with VTK_DEFAULT_OPENGL_WINDOW=vtkOSOpenGLRenderWindow)")
    return probe.stdout.strip().splitlines()[-1]


if __name__ == "__main__":
    print(render_one_frame())
