"""sd-scenes: declarative Stable Diffusion animations with exact incremental re-renders.

A scene file (YAML) is loaded and validated (`pipeline.scene`), expanded into per-frame jobs
(`pipeline.planner`), and rendered with caching (`pipeline.renderer`)::

    from pipeline.scene import load_scene
    from pipeline.planner import plan
    scene = load_scene("scenes/dog_cat.yaml")

Nothing imported by this package's top level pulls in torch.
"""

__version__ = "0.1.0"
