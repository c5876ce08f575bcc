"""Bridges to other libraries: diffusers models and pipelines (:mod:`.diffusers`) and
k-diffusion-style sampler functions (:mod:`.kdiffusion`).  Imported on demand, so that
``import steindiff`` never imports diffusers."""
