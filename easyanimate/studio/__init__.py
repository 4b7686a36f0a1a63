"""``easyanimate studio``: a local web page to generate with any registered model and LoRA and to browse the
curated data and the registry. ``service`` holds the logic (no Gradio, no Prefect); ``app`` builds the page.

Importing this package does not import Gradio: ``easyanimate.studio.app`` does, and the CLI imports it lazily.
"""
