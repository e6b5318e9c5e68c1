"""Diffusion: noise schedules, the `diffusion` objective, DDPM/DDIM samplers, guidance and the sampling loop.

Families compose these (the `diffusion` plugin, and later unCLIP and Kandinsky); the UNet is in
:mod:`polymodal.nn.unet`.
"""
