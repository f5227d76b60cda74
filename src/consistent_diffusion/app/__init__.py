"""The web app (``consistent-diffusion app``): Gradio tabs over the library.

- ``jobs``: what the page runs, as plain library calls (checked uploads, a series from the form,
  a subject fine-tune, the bench, a report opened, advice); tested without a browser.
- ``ui``: the page (``build``, ``launch``), thin over ``jobs``.
"""
