"""The web app (``consistent-diffusion app``): Gradio tabs over the library.

- ``jobs``: what the page runs, as plain library calls (checked uploads, a series from the form,
  a subject fine-tune, the bench, a report opened, advice); tested without a browser.
- ``uploads``: the upload checks and the kept copies a manifest names; ``image_prompt``: the
  image prompt section of "Make a series" (style / subject images through IP-Adapters).
- ``ui``: the page (``build``, ``launch``), thin over ``jobs``.
"""
