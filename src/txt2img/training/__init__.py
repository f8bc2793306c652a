"""Training and evaluation: the Shapes-64 procedural data set (``shapes``), a deterministic reader of its
attributes from pixels (``attributes``), the prompt-following evaluation built on them (``evaluate``) and
a data set of users' own captioned images (``folder_data``). This package may import txt2img's inference
modules; they never import it, so sampling needs nothing from here.
"""
