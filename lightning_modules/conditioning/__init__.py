"""Conditioners: each turns part of a batch into what the backbone consumes, owns its dropout and null value."""

from lightning_modules.conditioning.base import Conditioner, Conditions, assemble
from lightning_modules.conditioning.concat import (
           LowResolutionVideo,
           Mask,
           MaskedVideo,
           SourceVideo,
           StillImage,
           resize_video,
)
from lightning_modules.conditioning.frames import FrameFeatures, MotionBucket
from lightning_modules.conditioning.text import Text, fps_prompt
from lightning_modules.conditioning.tokens import ReferenceImage, TaskTokens

__all__ = ["Conditioner", "Conditions", "assemble", "LowResolutionVideo", "Mask", "MaskedVideo", "SourceVideo", "StillImage",
           "resize_video", "FrameFeatures", "MotionBucket", "Text", "fps_prompt", "ReferenceImage", "TaskTokens"]
