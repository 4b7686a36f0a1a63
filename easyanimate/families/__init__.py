"""Model families served beside the project's own from-scratch EasyAnimate.

Each family loads a released checkpoint with the ecosystem's own classes (diffusers, transformers, peft):

- ``v51``: EasyAnimate V5.1 (and V5.1 InP) in the layout of its ``-diffusers`` releases.
"""
