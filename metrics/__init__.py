"""Image-quality metrics (PSNR/SSIM on Y) and MATLAB-compatible bicubic resizing."""

from refqsr_engine.metrics.imresize import bicubic_degrade, imresize
from refqsr_engine.metrics.quality import psnr_y, rgb_to_y, sr_to_uint8, ssim_map, ssim_y

__all__ = ["bicubic_degrade", "imresize", "psnr_y", "rgb_to_y", "sr_to_uint8", "ssim_map", "ssim_y"]
