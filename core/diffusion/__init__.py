"""Diffusion: noise schedules, the `diffusion` objective, DDPM/DDIM samplers, guidance and the sampling loop.

Families compose these (the `diffusion` plugin, and later unCLIP and Kandinsky); the UNet is in
:mod:`polymodal.nn.unet`.
"""

from polymodal.diffusion.guidance import (
    cfg_model,
    classifier_free,
    classifier_guided,
    combine_guidance,
    reconstruction_guided,
)
from polymodal.diffusion.loop import SampleResult, invert, outpaint_canvas, reconstruct, repaint_schedule, sample
from polymodal.diffusion.objective import diffusion_loss
from polymodal.diffusion.samplers import DDIMSampler, DDPMSampler, SamplerConfig, StepOutput, make_sampler
from polymodal.diffusion.schedule import NoiseSchedule, ScheduleConfig

__all__ = [
    "DDIMSampler",
    "DDPMSampler",
    "NoiseSchedule",
    "SampleResult",
    "SamplerConfig",
    "ScheduleConfig",
    "StepOutput",
    "cfg_model",
    "classifier_free",
    "classifier_guided",
    "reconstruction_guided",
    "combine_guidance",
    "diffusion_loss",
    "invert",
    "make_sampler",
    "outpaint_canvas",
    "reconstruct",
    "repaint_schedule",
    "sample",
]
